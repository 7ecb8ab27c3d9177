"""What every console page shares: the signed-in user, cookies, CSRF checks and rendering.

Pages are server-rendered Jinja2 templates with a same-origin stylesheet and one small
same-origin script (live job progress); the Content-Security-Policy below lets nothing else
load or run, so an injected tag could neither fetch nor execute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app.console import sessions
from app.db.models import Tenant
from app.deps import SessionDep
from app.errors import AppError, NotFound
from app.reports.page import metric_name

HERE = Path(__file__).resolve().parent
PREFIX = "/console"
SESSION_COOKIE = "tailor_console"
SIGN_IN_COOKIE = "tailor_console_sign_in"
# Rows per list page.
LIST_LIMIT = 50

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Pages show a tenant's data: never kept by a shared cache or the back-forward cache.
    "Cache-Control": "no-store",
}


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _size(value: int | None) -> str:
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = _when
templates.env.filters["size"] = _size
templates.env.filters["metric"] = metric_name
templates.env.filters["signed"] = lambda value, digits=4: f"{float(value):+.{digits}f}"
templates.env.filters["fixed"] = lambda value, digits=4: f"{float(value):.{digits}f}"
templates.env.filters["percent"] = lambda value: f"{100 * float(value or 0):.0f}%"


class SignInRequired(Exception):
    """No live console session: the browser is sent to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class PageError(Exception):
    """A console request that ends on an error page (HTML, not the API's JSON)."""

    def __init__(self, status_code: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.title = title
        self.message = message


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in browser: its tenant and the session's CSRF token."""

    tenant: Tenant
    session_token: str
    csrf: str


def _console_user(request: Request, session: SessionDep) -> ConsoleUser:
    token = request.cookies.get(SESSION_COOKIE, "")
    row = sessions.find_session(session, token) if token else None
    if row is None:
        raise SignInRequired(request.url.path)
    return ConsoleUser(
        tenant=row.api_key.tenant, session_token=token, csrf=sessions.csrf_token(token)
    )


CurrentUser = Annotated[ConsoleUser, Depends(_console_user)]


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if path and path.startswith(PREFIX + "/") and not path.startswith("//") and "\\" not in path:
        return path
    return PREFIX + "/jobs"


async def sign_in_redirect(request: Request, exc: Exception) -> Response:
    """SignInRequired -> 303 to the sign-in page, remembering the page asked for."""
    assert isinstance(exc, SignInRequired)
    target = f"{PREFIX}/sign-in?next={quote(safe_next(exc.next_path), safe='/')}"
    return RedirectResponse(target, status_code=303)


async def error_page(request: Request, exc: Exception) -> Response:
    """PageError -> its status with a short page saying what happened."""
    assert isinstance(exc, PageError)
    return page(request, "error.html", status_code=exc.status_code, title=exc.title,
                message=exc.message)


def check_csrf(user: ConsoleUser, presented: str | None) -> None:
    """Refuse a POST without this session's CSRF token (403) before anything is done."""
    if not sessions.csrf_ok(user.session_token, presented):
        raise PageError(403, "Form refused", "This form is out of date or was sent from "
                        "another site, so nothing was done. Go back, reload the page and try "
                        "again.")


def not_found(exc: NotFound) -> PageError:
    """An API 404 (another tenant's id looks exactly like a missing one) as a page."""
    return PageError(404, "Not found", exc.detail)


def explain_error(exc: Exception) -> tuple[str, int]:
    """An API error, an invalid form or a bad value as (one sentence for the page, status)."""
    if isinstance(exc, AppError):
        where = [f"{k} {exc.context[k]}" for k in ("line", "field") if exc.context.get(k)]
        return exc.detail + (f" ({', '.join(where)})" if where else ""), exc.status_code
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first.get("loc", ()))
        message = str(first.get("msg", "invalid"))
        return (f"{field}: {message}" if field else message), 422
    return str(exc), 422


def secure(request: Request) -> bool:
    """Served over TLS (directly, or behind a proxy that uvicorn trusts for the scheme)."""
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    """A console cookie: HttpOnly, SameSite=Strict, Secure over TLS, sent to /console only."""
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict",
        secure=secure(request),
    )


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name, path=PREFIX, httponly=True, samesite="strict", secure=secure(request)
    )


def page(
    request: Request,
    name: str,
    user: ConsoleUser | None = None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """Render a template with the console's security headers."""
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": user.csrf if user else "", **context},
        status_code=status_code,
        headers=SECURITY_HEADERS,
    )


def redirect(path: str) -> RedirectResponse:
    """After a successful POST: 303 so a reload does not submit the form again."""
    return RedirectResponse(path, status_code=303, headers={"Cache-Control": "no-store"})
