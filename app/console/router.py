"""Console pages: sign in and out, corpora, models and the embedding box (jobs: app.console.jobs).

Every page reads and writes through the same services as the /v1 routes, scoped to the
signed-in tenant; every POST checks the session's CSRF token before it does anything.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Form, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.console import sessions
from app.console.web import (
    LIST_LIMIT,
    PREFIX,
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    CurrentUser,
    check_csrf,
    clear_cookie,
    explain_error,
    not_found,
    page,
    redirect,
    safe_next,
    set_cookie,
)
from app.corpora import service as corpora
from app.deps import Page, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.embeddings.router import embed_texts, source_for
from app.embeddings.schemas import EmbedRequest
from app.embeddings.service import EmbeddingModels
from app.errors import AppError, InvalidCorpus, NotFound
from app.models import service as models
from app.models.router import download_model
from app.quotas import check_storage
from app.reports import report_css
from app.uploads import UploadRules, form_text, multipart_form, spool, upload_folder

router = APIRouter(prefix=PREFIX, include_in_schema=False)

# The embedding box ranks a handful of passages, not a corpus.
MAX_PASSAGES = 20

CsrfField = Annotated[str, Form(alias="csrf_token")]


@router.get("")
def console_home() -> Response:
    return redirect(PREFIX + "/jobs")


@router.get("/report.css")
def console_report_css() -> Response:
    # The report page's stylesheet, same-origin, for the report shown inside the console.
    return Response(report_css(), media_type="text/css",
                    headers={"Cache-Control": "public, max-age=3600"})


# ---------------------------------------------------------------------------------------------
# Sign in / out


def _sign_in_page(
    request: Request, next_path: str, error: str = "", status_code: int = 200
) -> Response:
    token = sessions.new_sign_in_token()
    response = page(request, "sign_in.html", status_code=status_code, next=next_path,
                    error=error, sign_in_token=token)
    set_cookie(response, request, SIGN_IN_COOKIE, token, max_age=3600)
    return response


@router.get("/sign-in")
def sign_in_form(request: Request, next: str | None = None) -> Response:
    return _sign_in_page(request, safe_next(next))


@router.post("/sign-in")
def sign_in(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    csrf: CsrfField = "",
    next: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not sessions.same_token(expected, csrf):
        return _sign_in_page(request, safe_next(next), "The sign-in form expired: try again.",
                             403)
    try:
        token = sessions.open_session(session, api_key.strip())
    except sessions.ScopeRefused as refused:
        message = f"That key's scope is {refused}: the console needs a train key."
        return _sign_in_page(request, safe_next(next), message, 403)
    if token is None:
        # The key is neither logged nor echoed back into the form.
        return _sign_in_page(request, safe_next(next), "That API key is not valid.", 401)
    response = redirect(safe_next(next))
    set_cookie(response, request, SESSION_COOKIE, token,
               max_age=int(sessions.LIFETIME.total_seconds()))
    clear_cookie(response, request, SIGN_IN_COOKIE)
    return response


@router.post("/sign-out")
def sign_out(
    request: Request, session: SessionDep, user: CurrentUser, csrf: CsrfField = ""
) -> Response:
    check_csrf(user, csrf)
    sessions.close_session(session, user.session_token)
    response = redirect(PREFIX + "/sign-in")
    clear_cookie(response, request, SESSION_COOKIE)
    return response


# ---------------------------------------------------------------------------------------------
# Corpora


def _corpora_page(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    offset: int = 0,
    error: str = "",
    status_code: int = 200,
    added: str = "",
) -> Response:
    rows, count = corpora.list_corpora(session, user.tenant, Page(offset, LIST_LIMIT))
    return page(request, "corpora.html", user, status_code, corpora=rows, count=count,
                offset=offset, limit=LIST_LIMIT, error=error, added=added, nav="corpora")


@router.get("/corpora")
def corpora_page(
    request: Request, session: SessionDep, user: CurrentUser, offset: int = 0, added: str = ""
) -> Response:
    return _corpora_page(request, session, user, max(0, offset), added=added)


@router.post("/corpora")
async def upload_corpus(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    settings: SettingsDep,
    store: StoreDep,
) -> Response:
    # The session row was read above; give the connection back while the file streams in.
    await run_in_threadpool(session.commit)
    rules = UploadRules.of(settings, InvalidCorpus)
    try:
        async with upload_folder(settings.upload_dir) as folder, \
                multipart_form(request, rules.max_bytes) as form:
            check_csrf(user, form_text(form, "csrf_token", max_length=200))
            name = form_text(form, "name")
            upload = await spool(form, "file", folder, "corpus.jsonl", rules)
            await run_in_threadpool(check_storage, session, user.tenant, settings, upload.size)
            corpus = await run_in_threadpool(
                corpora.create_corpus, session, store, user.tenant, upload, name
            )
    except AppError as exc:
        message, status = explain_error(exc)
        return await run_in_threadpool(
            _corpora_page, request, session, user, 0, message, status
        )
    return redirect(f"{PREFIX}/corpora?added={corpus.id}")


# ---------------------------------------------------------------------------------------------
# Models


@router.get("/models")
def models_page(
    request: Request, session: SessionDep, user: CurrentUser, registry: RegistryDep,
    offset: int = 0,
) -> Response:
    rows, count = models.list_models(session, user.tenant, registry, Page(max(0, offset), 100))
    return page(request, "models.html", user, models=rows, count=count, nav="models")


@router.get("/models/{model_id}/download")
def console_download(
    model_id: str, session: SessionDep, user: CurrentUser, store: StoreDep,
    settings: SettingsDep,
) -> Response:
    # The API's own handler: the same archive, or the same presigned S3 redirect.
    try:
        return download_model(model_id, session, user.tenant, store, settings)
    except NotFound as exc:
        raise not_found(exc) from None


# ---------------------------------------------------------------------------------------------
# Embedding box


def _embed_page(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    registry: RegistryDep,
    status_code: int = 200,
    **context: object,
) -> Response:
    rows, _ = models.list_models(session, user.tenant, registry, Page(0, 100))
    context.setdefault("form", {})
    return page(request, "embed.html", user, status_code, models=rows, nav="embed", **context)


@router.get("/embed")
def embed_page(
    request: Request, session: SessionDep, user: CurrentUser, registry: RegistryDep,
    model: str = "",
) -> Response:
    return _embed_page(request, session, user, registry, form={"model": model})


@router.post("/embed")
async def embed_try(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    registry: RegistryDep,
    model: Annotated[str, Form(max_length=200)] = "",
    query: Annotated[str, Form(max_length=16_384)] = "",
    passages: Annotated[str, Form(max_length=100_000)] = "",
    csrf: CsrfField = "",
) -> Response:
    check_csrf(user, csrf)
    form = {"model": model, "query": query, "passages": passages}
    texts = [line.strip() for line in passages.splitlines() if line.strip()]
    encoder: EmbeddingModels = request.app.state.embedding_models
    try:
        if not query.strip():
            raise ValueError("write a query")
        if len(texts) > MAX_PASSAGES:
            raise ValueError(f"at most {MAX_PASSAGES} passages, one per line")
        body = EmbedRequest(model=model, inputs=[query.strip()], input_type="query")
        # The /v1/embed path itself: the same model lookup, tokenization and batching.
        source = await source_for(request, user.tenant, registry, body.model)
        vectors, _ = await embed_texts(encoder, source, body.inputs, "query", True, None,
                                       "query")
        query_vector = vectors[0]
        ranked = []
        if texts:
            passage_vectors, _ = await embed_texts(encoder, source, texts, "passage", True,
                                                   None, "passages")
            scores = passage_vectors @ query_vector / (
                np.linalg.norm(passage_vectors, axis=1) * np.linalg.norm(query_vector) + 1e-12
            )
            ranked = sorted(zip(texts, scores.tolist(), strict=True), key=lambda r: -r[1])
    except (ValueError, ValidationError, AppError) as exc:
        message, status = explain_error(exc)
        return await run_in_threadpool(_embed_page, request, session, user, registry, status,
                                       form=form, error=message)
    result = {
        "dim": int(query_vector.shape[0]),
        "norm": float(np.linalg.norm(query_vector)),
        "head": [float(v) for v in query_vector[:8]],
        "ranked": ranked,
    }
    return await run_in_threadpool(_embed_page, request, session, user, registry, form=form,
                                   result=result)
