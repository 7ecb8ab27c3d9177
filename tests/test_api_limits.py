"""Per-key rate limits (in the process on the embedded default, in Redis in production), the
slowing down of addresses that send wrong keys, and per-tenant quotas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app.db.models import Job, JobStatus, Tenant
from app.ratelimit import MemoryLimiter, Rate, RedisLimiter
from app.tenants.key_cache import KEYS
from tests.api_support import Api, corpus_bytes, start_api
from tests.service_stack import REDIS_TEST_URL

pytest_plugins = ["tests.api_fixtures"]

SLOW = {"rate_limit_per_second": 0.01, "rate_limit_burst": 3}


def _redis_settings() -> dict[str, Any]:
    # A prefix of its own: the test's buckets meet nobody else's in the shared database.
    return {"redis_url": REDIS_TEST_URL, "broker_key_prefix": f"test-{uuid.uuid4().hex}:"}


@pytest.fixture(params=["memory", "redis"])
def limited_api(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str,
                model_store: Path, broker_dir: Path) -> Iterator[Api]:
    """Three requests per key, then (nearly) none: in the process, and in real Redis."""
    extra = dict(SLOW, **(_redis_settings() if request.param == "redis" else {}))
    yield from start_api(tmp_path, sqlite_url, model_store, **extra)


def test_a_key_past_its_rate_gets_429_with_retry_after(limited_api: Api) -> None:
    expected = RedisLimiter if limited_api.settings.redis_url else MemoryLimiter
    assert isinstance(limited_api.app.state.limiter, expected)
    caller, other = limited_api.tenant(), limited_api.tenant("other")
    for remaining in (2, 1, 0):
        response = caller.get("/v1/corpora")
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit"] == "3"
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
        assert int(response.headers["x-ratelimit-reset"]) > 0
    refused = caller.get("/v1/corpora")
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert (body["error"], body["limit"]) == ("rate_limited", "requests")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert body["request_id"] == refused.headers["x-request-id"]
    # Documented on the routes, with its headers.
    assert "429" in limited_api.app.openapi()["paths"]["/v1/corpora"]["get"]["responses"]
    # Each key has its own bucket.
    assert other.get("/v1/corpora").status_code == 200


def test_api_processes_share_their_buckets_in_redis(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path
) -> None:
    extra = dict(SLOW, **_redis_settings())
    first = start_api(tmp_path / "a", sqlite_url, model_store, **extra)
    second = start_api(tmp_path / "b", sqlite_url, model_store, **extra)
    one, two = next(first), next(second)
    caller = one.tenant()
    statuses = [api.client.get("/v1/corpora", headers=caller.headers).status_code
                for api in (one, two, one, two)]
    assert statuses == [200, 200, 200, 429]
    for rest in (first, second):
        next(rest, None)


def test_the_redis_bucket_is_atomic_under_concurrent_takes() -> None:
    limiter = RedisLimiter(REDIS_TEST_URL, prefix=f"test-{uuid.uuid4().hex}:")
    rate = Rate(per_second=0.001, burst=25)
    with ThreadPoolExecutor(16) as pool:
        decisions = list(pool.map(lambda _: limiter.take("key:k", rate), range(100)))
    assert sum(d.allowed for d in decisions) == 25
    limiter.client.delete(*limiter.client.keys(f"{limiter.prefix}*"))


def test_an_unreachable_redis_lets_requests_through(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path
) -> None:
    extra = dict(SLOW, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    for api in start_api(tmp_path, sqlite_url, model_store, **extra):
        caller = api.tenant()
        assert [caller.get("/v1/corpora").status_code for _ in range(5)] == [200] * 5


@pytest.fixture(params=["memory", "redis"])
def guarded_api(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str,
                model_store: Path, broker_dir: Path) -> Iterator[Api]:
    extra = {"auth_failure_burst": 3, "auth_failures_per_minute": 0.01,
             **(_redis_settings() if request.param == "redis" else {})}
    yield from start_api(tmp_path, sqlite_url, model_store, **extra)


def test_an_address_sending_wrong_keys_is_slowed_down(guarded_api: Api) -> None:
    known = guarded_api.tenant()
    assert known.get("/v1/corpora").status_code == 200  # verified before the attack
    wrong = {"Authorization": "Bearer tlr_" + "x" * 40}
    assert [guarded_api.client.get("/v1/corpora", headers=wrong).status_code
            for _ in range(3)] == [401] * 3
    # The address learns nothing more, not even whether a right key is right...
    blocked = guarded_api.client.get("/v1/corpora", headers=wrong)
    assert blocked.status_code == 429
    assert (blocked.json()["limit"], int(blocked.headers["retry-after"]) >= 1) == (
        "auth_failures", True)
    KEYS.clear()
    fresh = guarded_api.tenant("fresh")
    assert fresh.get("/v1/corpora").status_code == 429
    # ...while a request without a key is still just unauthorized.
    assert guarded_api.client.get("/v1/corpora").status_code == 401


def test_a_key_verified_a_moment_ago_is_not_held_up_by_its_address(guarded_api: Api) -> None:
    known = guarded_api.tenant()
    assert known.get("/v1/corpora").status_code == 200
    wrong = {"Authorization": "Bearer tlr_" + "y" * 40}
    for _ in range(4):
        guarded_api.client.get("/v1/corpora", headers=wrong)
    assert known.get("/v1/corpora").status_code == 200  # from the key cache


@pytest.fixture
def quota_api(tmp_path: Path, database_url: str, model_store: Path,
              broker_dir: Path) -> Iterator[Api]:
    yield from start_api(tmp_path, database_url, model_store, max_concurrent_jobs=2,
                         max_stored_bytes=3 * len(corpus_bytes(5)))


def test_concurrent_jobs_are_a_quota_named_in_its_429(quota_api: Api) -> None:
    caller = quota_api.tenant()
    corpus = caller.corpus(5)
    first = caller.job(corpus["id"])
    caller.job(corpus["id"])
    refused = caller.post("/v1/jobs", json={"corpus_id": corpus["id"], "preset": "quick",
                                            "base_model": "tiny-student",
                                            "teacher": "tiny-teacher",
                                            "generator": "tiny-generator"})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert (body["error"], body["quota"], body["limit"], body["used"]) == (
        "quota_exceeded", "concurrent_jobs", 2, 2)
    assert "concurrent_jobs" in body["detail"]
    # Bulk embedding jobs count too.
    embedding = caller.post("/v1/embedding-jobs", json={"corpus_id": corpus["id"],
                                                        "model": "tiny-student"})
    assert embedding.status_code == 429 and embedding.json()["quota"] == "concurrent_jobs"
    assert caller.post(f"/v1/jobs/{first['id']}/cancel").status_code == 200
    caller.job(corpus["id"])  # a finished job frees its place
    # Another tenant has its own count; an operator can raise one tenant's limit.
    other = quota_api.tenant("other")
    other.job(other.corpus(2)["id"])
    with quota_api.session() as session:
        session.get(Tenant, caller.tenant_id).max_concurrent_jobs = 3
        session.commit()
    KEYS.clear()  # the tenant's row is cached with its key
    caller.job(corpus["id"])
    with quota_api.session() as session:
        active = session.query(Job).filter(Job.tenant_id == caller.tenant_id,
                                           Job.status == JobStatus.QUEUED).count()
    assert active == 3


def test_stored_bytes_are_a_quota_named_in_its_403(quota_api: Api) -> None:
    caller = quota_api.tenant()
    corpora = [caller.corpus(5) for _ in range(3)]
    refused = caller.upload_corpus(corpus_bytes(5))
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert (body["error"], body["quota"]) == ("quota_exceeded", "stored_bytes")
    assert body["used"] == 3 * len(corpus_bytes(5)) and body["requested"] == len(corpus_bytes(5))
    assert not [key for key in quota_api.stored() if key.count("/") and "corpora/" in key
                and not any(c["id"] in key for c in corpora)]
    assert caller.delete(f"/v1/corpora/{corpora[0]['id']}").status_code == 204
    assert caller.upload_corpus(corpus_bytes(5)).status_code == 201


def test_the_embedding_routes_keep_the_rate_limit_on_their_fast_path(limited_api: Api) -> None:
    # /v1/embed and /v1/embeddings authorize a cached key on the event loop (in-process
    # buckets) or on a worker thread (Redis buckets): the same limit, headers and 429 either way.
    caller = limited_api.tenant()
    embed = {"model": "tiny-student", "inputs": ["wing"]}
    openai = {"model": "tiny-student", "input": "wing"}
    for remaining, (path, body) in zip((2, 1, 0), [("/v1/embed", embed),
                                                    ("/v1/embeddings", openai),
                                                    ("/v1/embed", embed)], strict=True):
        response = caller.post(path, json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining"] == str(remaining)
        assert response.headers["x-request-id"].startswith("req_")
    refused = caller.post("/v1/embeddings", json=openai)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]
