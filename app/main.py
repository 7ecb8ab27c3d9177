"""The FastAPI application: `create_app(settings)` and the module-level `app` for uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from app.api_docs import document_common_responses
from app.api_keys.router import router as api_keys_router
from app.auth import limiter_for
from app.console import install_console
from app.corpora.router import router as corpora_router
from app.db.session import make_engine, make_session_factory
from app.embedding_jobs.router import router as embedding_jobs_router
from app.embeddings.router import openai_router
from app.embeddings.router import router as embeddings_router
from app.embeddings.service import EmbeddingModels
from app.embeddings.shortcut import EmbeddingShortcut
from app.errors import install_error_handlers
from app.eval_sets.router import router as eval_sets_router
from app.health.router import router as health_router
from app.jobs.router import router as jobs_router
from app.logs import configure_logging
from app.metrics import router as metrics_router
from app.models.router import router as models_router
from app.query_sets.router import router as query_sets_router
from app.request_context import RequestContextMiddleware
from app.rerank.router import router as rerank_router
from app.rerank.service import Rerankers
from app.settings import Settings, get_settings
from app.storage import object_store_from_url
from app.webhooks.router import router as webhooks_router

DESCRIPTION = """\
Fine-tuning as a service for dense retrievers. Upload a corpus, start a job, and Tailor
generates synthetic queries, scores candidates with a cross-encoder teacher and distills a
specialized embedding model; then embed with it (also through an OpenAI-compatible endpoint)
or download it as a sentence-transformers folder.

Every route except the health probes needs `Authorization: Bearer <api key>`. Errors share one
shape: `{"error": code, "detail": message, "request_id": id, ...context}`. Every response carries
`X-Request-ID` (yours when you send a valid one); authenticated responses carry
`X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` for the key, and a 429
says how long to wait in `Retry-After`.
"""


def _version() -> str:
    try:
        return version("tailor")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app wired to `settings` (default: the environment). The schema comes from Alembic."""
    settings = settings or get_settings()
    configure_logging(settings.log_format, settings.log_level)
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.embedding_models.close()
        engine.dispose()

    app = FastAPI(
        title="Tailor",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # Operation ids are the handler names (create_job, list_corpora...): SDK-friendly.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.store = object_store_from_url(settings.object_store_url, settings)
    app.state.embedding_models = EmbeddingModels(settings, app.state.store)
    # Teachers share the embedding models' encoder threads: one pool of compute for both.
    app.state.rerankers = Rerankers(lambda: app.state.embedding_models.batcher)
    app.state.limiter = limiter_for(settings)
    install_error_handlers(app)
    # Added first, so it runs inside the request context (ids, headers, log line, metrics).
    app.add_middleware(EmbeddingShortcut)
    app.add_middleware(RequestContextMiddleware)
    for router in (
        health_router,
        metrics_router,
        corpora_router,
        eval_sets_router,
        query_sets_router,
        jobs_router,
        models_router,
        embeddings_router,
        openai_router,
        embedding_jobs_router,
        rerank_router,
        api_keys_router,
        webhooks_router,
    ):
        app.include_router(router)
    install_console(app)
    document_common_responses(app)
    return app


app = create_app()
