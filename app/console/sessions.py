"""Console sign-in: a random session token in the browser, only its hash in the database.

Signing in checks the API key once (app.tenants.service.authenticate) and opens a session row
tied to that key; the key itself is kept nowhere, neither in the cookie nor in the database. A
stolen database copy holds only token hashes; a revoked key or signing out ends the session at
once; and no server secret has to be configured or shared between API processes.

Forms carry a CSRF token derived from the session token (HMAC), so it needs no storage either
and changes with every sign-in. The sign-in form itself, which has no session yet, uses a
double-submit token: a random value in a short-lived cookie and in the form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, ConsoleSession, KeyScope
from app.ids import api_key_lookup_prefix, hash_api_key
from app.tenants.service import authenticate

# A session lasts a working day; signing in again is cheap, a long-lived stolen cookie is not.
LIFETIME = timedelta(hours=12)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ScopeRefused(Exception):
    """A valid key whose scope cannot sign in: the console uploads, starts jobs and shows
    them, which is a `train` key's business; an `embed` key serves a search service."""


def open_session(session: Session, api_key: str) -> str | None:
    """A new session token for a valid, active `train` key; None for an invalid, revoked or
    expired key, ScopeRefused for an `embed` key. The session ends by the key's expiry."""
    tenant = authenticate(session, api_key)
    if tenant is None:
        return None
    key_row = session.scalar(
        select(ApiKey).where(
            ApiKey.prefix == api_key_lookup_prefix(api_key),
            ApiKey.key_hash == hash_api_key(api_key),
            ApiKey.revoked_at.is_(None),
        )
    )
    if key_row is None:
        return None
    if key_row.scope != KeyScope.TRAIN:
        raise ScopeRefused(key_row.scope.value)
    now = utcnow()
    expires_at = now + LIFETIME
    if key_row.expires_at is not None:
        expires_at = min(expires_at, key_row.expires_at)
    # Expired rows go here, on sign-in, so the table never grows past the live sessions.
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    token = secrets.token_urlsafe(32)
    session.add(ConsoleSession(
        token_hash=_token_hash(token), api_key_id=key_row.id, created_at=now,
        expires_at=expires_at,
    ))
    session.flush()
    return token


def find_session(session: Session, token: str) -> ConsoleSession | None:
    """The live session of `token`: not expired, not signed out, its key neither revoked nor
    expired."""
    if not token or len(token) > 128:
        return None
    row = session.get(ConsoleSession, _token_hash(token))
    now = utcnow()
    if row is None or row.expires_at <= now or row.api_key.revoked_at is not None:
        return None
    if row.api_key.expires_at is not None and row.api_key.expires_at <= now:
        return None
    return row


def close_session(session: Session, token: str) -> None:
    """Sign out: the token stops working everywhere at once."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == _token_hash(token)))


def csrf_token(session_token: str) -> str:
    """The session's CSRF token: an HMAC of a fixed label under the session token, so a page
    can show it but another site cannot compute it."""
    return hmac.new(session_token.encode(), b"console-csrf", hashlib.sha256).hexdigest()


def same_token(expected: str | None, presented: str | None) -> bool:
    """Whether two tokens are present and equal (constant-time)."""
    return bool(expected) and bool(presented) and hmac.compare_digest(
        str(expected).encode(), str(presented).encode()
    )


def csrf_ok(session_token: str, presented: str | None) -> bool:
    """Whether a submitted form carries this session's CSRF token."""
    return same_token(csrf_token(session_token), presented)


def new_sign_in_token() -> str:
    """The sign-in form's double-submit token (cookie and hidden field)."""
    return secrets.token_urlsafe(24)
