"""The evaluation report as a page: static HTML with inline SVG charts, no script, no fetches.

Needs no app or HTTP imports, so the API (GET /v1/jobs/{id}/report.html) and the worker (the
report.html it writes next to an archived model) render the same page.
"""

from app.reports.page import (
    STAGE_FILES,
    render_report_from_stages,
    render_report_html,
    report_csp,
    report_css,
    report_fragment,
)

__all__ = [
    "STAGE_FILES",
    "render_report_from_stages",
    "render_report_html",
    "report_csp",
    "report_css",
    "report_fragment",
]
