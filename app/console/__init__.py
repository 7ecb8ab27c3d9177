"""The console: a few server-rendered pages under /console for people (sign in with an API
key, corpora, jobs with live progress, reports, models, an embedding box), served by the API
process itself with no build step and nothing loaded from elsewhere."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.console import web
from app.console.jobs import router as jobs_router
from app.console.router import router


def install_console(app: FastAPI) -> None:
    """Add the console's routes, its same-origin static files and its error pages to `app`."""
    app.include_router(router)
    app.include_router(jobs_router)
    app.mount(web.PREFIX + "/static", StaticFiles(directory=web.HERE / "static"),
              name="console-static")
    app.add_exception_handler(web.SignInRequired, web.sign_in_redirect)
    app.add_exception_handler(web.PageError, web.error_page)
