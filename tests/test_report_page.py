"""The report as a page: what it says, that it fetches nothing, and the route that serves it."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from app.db.models import Job, JobStatus
from app.reports import STAGE_FILES, render_report_from_stages, render_report_html
from app.reports.charts import difference_bins
from tests.api_support import Api
from tests.report_samples import sample_history, sample_report

pytest_plugins = ["tests.api_fixtures"]


def _svgs(html: str) -> list[ET.Element]:
    return [ET.fromstring(svg) for svg in re.findall(r"<svg\b.*?</svg>", html, re.S)]


def _text(html: str) -> str:
    """The page's visible words, tags dropped and whitespace collapsed."""
    body = re.sub(r"<(svg|style|title|desc)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


def test_the_page_leads_with_the_recommendation_then_the_numbers_behind_it() -> None:
    report = sample_report(queries=120, shift=0.04)
    html = render_report_html(report, sample_history(best_epoch=3), facts=[("job", "job_1")])
    text = _text(html)
    sig = report["significance"]
    assert report["recommended"] == "tuned" and sig["ci95"][0] > 0
    assert text.index("Use the tuned model") < text.index("Base vs tuned")
    base, tuned = report["base"]["ndcg@10"], report["tuned"]["ndcg@10"]
    assert f"from {base:.4f} to {tuned:.4f}" in text
    low, high = sig["ci95"]
    assert f"[{low:+.4f}, {high:+.4f}]" in text
    # The counts are the report's paired comparison, and the chart draws the same split.
    assert (f"Of {sig['queries']} queries, {sig['better']} got better, {sig['worse']} got "
            f"worse and {sig['same']} are unchanged") in text
    outcome = next(s for s in _svgs(html) if "got better" in s.findtext("{*}title", ""))
    assert f"{sig['better']} queries better" in outcome.findtext("{*}desc", "")
    # Every query is in exactly one bar of the distribution.
    bins = difference_bins([r["tuned"] - r["base"] for r in report["per_query"].values()])
    assert sum(b.count for b in bins) == len(report["per_query"])
    assert [b.count for b in bins if b.kind == "same"] == [sig["same"]]
    for name, row in report["per_query_type"].items():
        assert f"{name} {row['base']['queries']}" in text
    assert "kept: epoch 3" in html
    assert "Recipe" in text and "minilm-l6" in text


def test_a_kept_base_and_a_loss_are_said_plainly() -> None:
    kept = render_report_html(sample_report(base_kept=True), sample_history(best_epoch=0))
    assert "Keep the base model" in kept and "never beat the base model" in kept
    assert "kept: the base model" in kept
    worse = sample_report(shift=-0.08, seed=3)
    assert worse["recommended"] == "base" and worse["gain"]["ndcg@10"] < 0
    text = _text(render_report_html(worse))
    assert "Keep the base model" in text and "The tuned model is worse" in text
    for warning in worse["warnings"]:
        assert warning in text


def test_the_page_fetches_nothing_and_pins_its_only_stylesheet() -> None:
    report = sample_report()
    report["warnings"].append('<script src="https://evil.example/x.js"></script>')
    html = render_report_html(report, sample_history())
    # Text from the report is escaped, never markup.
    assert "<script" not in html and "&lt;script" in html
    links = re.findall(r"""<[^>]*\b(?:src|href|xlink:href)\s*=\s*["']([^"']*)""", html)
    assert links == ["data:,"]  # the empty favicon, so a browser does not ask for one
    assert "@import" not in html and "url(" not in html
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp is not None
    policy = html_lib.unescape(csp.group(1))
    assert "default-src 'none'" in policy and f"style-src 'sha256-{digest}'" in policy
    assert "script-src" not in policy  # none at all: default-src 'none' applies
    for svg in _svgs(html):  # well-formed, titled for screen readers
        assert svg.findtext("{*}title")


def test_a_report_with_only_the_summary_still_renders() -> None:
    report = {
        "base": {"ndcg@10": 0.31, "queries": 12}, "tuned": {"ndcg@10": 0.42, "queries": 12},
        "gain": {"ndcg@10": 0.11}, "recommended": "tuned", "warnings": [],
        "per_query_type": {}, "teacher_check": None, "judgements": "synthetic",
        "base_kept": False,
    }
    text = _text(render_report_html(report))
    assert "Use the tuned model" in text and "0.3100" in text and "+0.1100" in text
    assert "Per query" not in text and "Training" not in text
    # A report from before the retrieval set-ups (no "version") has no such section, and one
    # whose section is of a later layout than this page knows is left out, not misread.
    assert "Retrieval set-ups" not in text
    later = {**report, "version": 3, "retrievers": {"version": 99, "rows": [{"id": "x"}]}}
    assert "Retrieval set-ups" not in _text(render_report_html(later))


def _set_status(api: Api, job_id: str, status: JobStatus) -> None:
    with api.session() as session:
        session.get(Job, job_id).status = status
        session.commit()


def test_the_route_serves_a_succeeded_jobs_page_to_its_tenant_only(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    url = f"/v1/jobs/{job['id']}/report.html"
    assert sqlite_api.client.get(url).status_code == 401
    response = caller.get(url)
    assert response.status_code == 409
    assert response.json()["error"] == "invalid_state" and response.json()["status"] == "queued"
    _set_status(sqlite_api, job["id"], JobStatus.SUCCEEDED)
    assert caller.get(url).status_code == 404  # succeeded, but no report written
    store = sqlite_api.app.state.store
    report = sample_report(queries=60)
    store.put_bytes(f"jobs/{job['id']}/evaluate/report.json", json.dumps(report).encode())
    response = caller.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "Use the tuned model" in response.text and job["id"] in response.text
    assert "Training" not in _text(response.text)  # no history stored yet
    store.put_bytes(f"jobs/{job['id']}/distill/history.json",
                    json.dumps(sample_history(best_epoch=2)).encode())
    assert "kept: epoch 2" in caller.get(url).text
    other = sqlite_api.tenant("other")
    assert other.get(url).status_code == 404


def test_the_worker_can_render_the_page_from_a_jobs_stage_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="report.json"):
        render_report_from_stages(tmp_path)
    for name, (stage, file_name) in STAGE_FILES.items():
        (tmp_path / stage).mkdir()
        body = {"report": sample_report(), "history": sample_history(best_epoch=1),
                "filter_summary": {"generated": 90, "kept": 61, "by_type": {}}}[name]
        (tmp_path / stage / file_name).write_text(json.dumps(body))
    html = render_report_from_stages(tmp_path, facts=[("model", "mdl_1")])
    assert "kept: epoch 1" in html and "61 of 90 generated queries" in html
    assert "mdl_1" in html
