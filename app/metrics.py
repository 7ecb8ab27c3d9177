"""The API's Prometheus metrics and its `/metrics` route (docs/operations.md, "Metrics").

Request latency by route template (never the raw path: ids would make a series per resource),
the sizes of the embedding micro-batches, and the embedding model cache's hits and misses.
One API process keeps them in memory; several processes behind one port (gunicorn workers) set
PROMETHEUS_MULTIPROC_DIR and each scrape then sums every process's files.
"""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

# A request that matched no route is counted under one label, not its path.
UNMATCHED_ROUTE = "<unmatched>"

REQUEST_SECONDS = Histogram(
    "tailor_http_request_duration_seconds",
    "Time from request to the end of its response, by route template and status.",
    ("method", "route", "status"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_INPUTS = Histogram(
    "tailor_embed_batch_inputs",
    "Inputs (rows) in each micro-batch an encoder ran (embedding and rerank requests share it).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCH_TOKENS = Histogram(
    "tailor_embed_batch_padded_tokens",
    "Padded tokens (rows x longest row) in each micro-batch an encoder ran.",
    buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
MODEL_CACHE = Counter(
    "tailor_embed_model_cache_total",
    "Embedding model lookups: `hit` (already loaded) or `miss` (loaded for this request).",
    ("result",),
)


def observe_request(method: str, route: str | None, status: int, seconds: float) -> None:
    """Count one finished request."""
    REQUEST_SECONDS.labels(method, route or UNMATCHED_ROUTE, str(status)).observe(seconds)


def observe_batch(rows: int, padded_tokens: int) -> None:
    """Count one micro-batch run by an encoder."""
    BATCH_INPUTS.observe(rows)
    BATCH_TOKENS.observe(padded_tokens)


def _registry() -> CollectorRegistry:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format. Open to anyone unless TAILOR_METRICS_TOKEN is set; then only to
    `Authorization: Bearer <token>` (the scraper's)."""
    from app.errors import Unauthorized  # app.errors imports this module (via request_context)

    token = request.app.state.settings.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("/metrics needs the scrape token: Authorization: Bearer <token>")
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
