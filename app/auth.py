"""Who is calling, and whether they may: the key (from the cache when it can), its scope, its
rate limit, and the slowing down of addresses that keep sending wrong keys."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from app.db.models import KeyScope, Tenant
from app.errors import InsufficientScope, TooManyRequests, Unauthorized
from app.logs import bind
from app.ratelimit import Limiter, MemoryLimiter, Rate, RedisLimiter
from app.settings import Settings
from app.tenants.key_cache import VerifiedKey
from app.tenants.service import cached_key, is_expired, verify_key

# The routes an `embed` key may call (route templates); a `train` key may call every route.
EMBED_ROUTES = frozenset({"/v1/embed", "/v1/embeddings", "/v1/rerank", "/v1/rerank/models"})


def shared_redis_url(settings: Settings) -> str | None:
    """The Redis the API processes share: `redis_url`, else the broker's when it is Redis."""
    if settings.redis_url:
        return settings.redis_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return None


def limiter_for(settings: Settings) -> Limiter:
    """Buckets in the shared Redis (production), else in this process (the embedded default)."""
    url = shared_redis_url(settings)
    if url is None:
        return MemoryLimiter()
    return RedisLimiter(url, prefix=f"{settings.broker_key_prefix}tailor:")


def _client_address(request: Request) -> str:
    # Behind a proxy, run uvicorn with --proxy-headers (and --forwarded-allow-ips) so this is
    # the client's address, not the proxy's.
    return request.client.host if request.client else "unknown"


def _route_path(request: Request) -> str:
    return getattr(request.scope.get("route"), "path", "")


def authorize(request: Request, session: Session, key: str | None) -> Tenant:
    """The tenant whose key `key` may call this route now; 401, 403 or 429 otherwise."""
    settings: Settings = request.app.state.settings
    limiter: Limiter = request.app.state.limiter
    if key is None:
        raise Unauthorized("missing bearer API key")
    # A key this process verified a moment ago costs neither a database nor a Redis round trip.
    verified = cached_key(key, settings.api_key_cache_ttl_s)
    if verified is None:
        failures = Rate(settings.auth_failures_per_minute / 60, settings.auth_failure_burst)
        address = f"auth:{_client_address(request)}"
        # An address that sent too many wrong keys learns nothing more until its bucket refills,
        # not even whether a key is right; and costs no more database lookups meanwhile.
        blocked = limiter.take(address, failures, cost=0)
        if not blocked.allowed:
            raise TooManyRequests(
                "too many requests with invalid API keys from this address; retry later",
                headers={"Retry-After": blocked.headers()["Retry-After"]}, limit="auth_failures",
            )
        verified = verify_key(session, key, settings.api_key_cache_ttl_s)
        if verified is None:
            limiter.take(address, failures)
            raise Unauthorized("invalid or revoked API key")
    admit(request, verified)
    return session.merge(verified.tenant, load=False)


def authorize_cached(request: Request, key: str | None) -> Tenant | None:
    """`authorize` without a session or a thread when it can be: the key verified a moment
    ago in this process and the rate limit kept in this process. The tenant is a detached copy
    (its columns loaded). None when the full check is needed (`authorize` on a worker thread)."""
    settings: Settings = request.app.state.settings
    if key is None:
        raise Unauthorized("missing bearer API key")
    if settings.rate_limit_per_second > 0 and not isinstance(request.app.state.limiter,
                                                             MemoryLimiter):
        return None  # a Redis round trip: not on the event loop
    verified = cached_key(key, settings.api_key_cache_ttl_s)
    if verified is None:
        return None
    admit(request, verified)
    return verified.tenant


def admit(request: Request, verified: VerifiedKey) -> None:
    """Whether the verified key may call this route now: its expiry, scope and rate limit
    (401, 403 or 429); binds its ids to the request's log lines."""
    settings: Settings = request.app.state.settings
    if is_expired(verified):
        raise Unauthorized("expired API key")
    bind(tenant_id=verified.tenant_id, key_id=verified.key_id)
    if verified.scope == KeyScope.EMBED and _route_path(request) not in EMBED_ROUTES:
        raise InsufficientScope(
            f"this key's scope is embed: it may call {', '.join(sorted(EMBED_ROUTES))} only; "
            f"use a train key", scope=verified.scope.value, required=KeyScope.TRAIN.value,
        )
    if settings.rate_limit_per_second > 0:
        limiter: Limiter = request.app.state.limiter
        rate = Rate(settings.rate_limit_per_second, settings.rate_limit_burst)
        decision = limiter.take(f"key:{verified.key_id}", rate)
        headers = decision.headers()
        request.state.rate_limit_headers = headers
        if not decision.allowed:
            raise TooManyRequests(
                f"rate limit of this key exceeded ({rate.per_second:g} requests a second, "
                f"bursts of {rate.burst}); retry in {headers['Retry-After']} s",
                headers=headers, limit="requests",
            )
