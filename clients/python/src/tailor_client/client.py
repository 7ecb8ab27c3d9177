"""`Client`: the Tailor API as Python methods."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tailor_client.resources import (
    ApiKeys,
    Corpora,
    EmbeddingJobs,
    EvalSets,
    Jobs,
    Models,
    QuerySets,
)
from tailor_client.transport import Transport
from tailor_client.types import (
    EmbedResponse,
    Health,
    InputType,
    OpenAIEmbeddingResponse,
    Readiness,
    RerankModel,
    RerankResponse,
)
from tailor_client.webhooks import Webhooks

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


class Client:
    """A connection to one Tailor API with one API key.

    >>> client = Client("http://127.0.0.1:8000", api_key="tlr_...")
    >>> corpus = client.corpora.upload("corpus.jsonl")
    >>> job = client.jobs.create(corpus["id"], preset="quick")
    >>> job = client.jobs.wait(job["id"])
    >>> client.models.download(job["model_id"], "my-retriever")

    `base_url` and `api_key` default to the environment's TAILOR_BASE_URL and TAILOR_API_KEY.
    Failed requests are retried (`max_retries` times, with backoff, honouring Retry-After);
    errors raise `tailor_client.APIError` subclasses that carry the API's `code` and `detail`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        **transport_options: Any,
    ) -> None:
        self.base_url = (base_url or os.environ.get("TAILOR_BASE_URL") or DEFAULT_BASE_URL)
        self.base_url = self.base_url.rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("TAILOR_API_KEY")
        self.transport = Transport(
            self.base_url, api_key, timeout=timeout, max_retries=max_retries,
            **transport_options,
        )
        self.corpora = Corpora(self.transport)
        self.eval_sets = EvalSets(self.transport)
        self.query_sets = QuerySets(self.transport)
        self.jobs = Jobs(self.transport)
        self.models = Models(self.transport)
        self.embedding_jobs = EmbeddingJobs(self.transport)
        self.api_keys = ApiKeys(self.transport)
        self.webhooks = Webhooks(self.transport)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(
        self, model: str, inputs: str | Sequence[str], *, input_type: InputType = "passage"
    ) -> EmbedResponse:
        """Vectors for texts, in input order, from a base model (name) or a tuned one
        (`mdl_...`); queries and passages get the model's own prefixes."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        return self.transport.json(
            "POST", "/v1/embed", json={"model": model, "inputs": texts, "input_type": input_type}
        )

    def embeddings(
        self,
        model: str,
        input: str | Sequence[str],
        *,
        input_type: InputType | None = None,
        encoding_format: str = "float",
        dimensions: int | None = None,
    ) -> OpenAIEmbeddingResponse:
        """The OpenAI-compatible /v1/embeddings (passages unless `input_type="query"`)."""
        body: dict[str, Any] = {
            "model": model,
            "input": input if isinstance(input, str) else list(input),
            "encoding_format": encoding_format,
            "input_type": input_type,
            "dimensions": dimensions,
        }
        return self.transport.json(
            "POST", "/v1/embeddings", json={k: v for k, v in body.items() if v is not None}
        )

    def rerank(
        self,
        model: str,
        query: str,
        documents: str | Sequence[str],
        *,
        top_n: int | None = None,
        return_documents: bool = False,
        raw_scores: bool = False,
    ) -> RerankResponse:
        """Order documents by relevance to the query with a cross-encoder (a teacher from
        `rerank_models()`): results most relevant first, each with its index in `documents`
        and a score in 0..1 (the model's raw score with `raw_scores`)."""
        body: dict[str, Any] = {
            "model": model, "query": query,
            "documents": [documents] if isinstance(documents, str) else list(documents),
            "return_documents": return_documents, "raw_scores": raw_scores,
        }
        if top_n is not None:
            body["top_n"] = top_n
        return self.transport.json("POST", "/v1/rerank", json=body)

    def rerank_models(self) -> list[RerankModel]:
        """The models /v1/rerank serves."""
        return self.transport.json("GET", "/v1/rerank/models")["data"]

    def health(self) -> Health:
        """Liveness: the API process answers."""
        return self.transport.json("GET", "/healthz")

    def ready(self) -> Readiness:
        """Readiness: database, broker and object store answer (a ServerError `not_ready`
        names the failing ones in `context["failed"]` otherwise)."""
        return self.transport.json("GET", "/readyz")
