"""POST /v1/rerank: Cohere's shape, the teacher's scores, authenticated, batched."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from app.embeddings.batching import Batcher
from tests.api_support import Api

pytest_plugins = ["tests.api_fixtures"]

QUERY = "pressure distribution on a swept wing"
DOCUMENTS = ["the pressure on a swept wing at high speed", "insulin resistance in mice",
             "heat transfer in a boundary layer", "wing pressure distribution measured"]


def _teacher_scores(api: Api, query: str, documents: list[str]) -> np.ndarray:
    from ml_core.registry import ModelRegistry
    from ml_core.teacher import load_teacher

    teacher = load_teacher("tiny-teacher", ModelRegistry(api.settings.model_store))
    return teacher.score([(query, d) for d in documents])


def test_rerank_orders_documents_by_the_teachers_scores(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    response = caller.post("/v1/rerank", json={"model": "tiny-teacher", "query": QUERY,
                                               "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    raw = _teacher_scores(sqlite_api, QUERY, DOCUMENTS)
    assert [r["index"] for r in results] == list(np.argsort(-raw, kind="stable"))
    expected = 1 / (1 + np.exp(-raw.astype(np.float64)))
    for result in results:
        assert abs(result["relevance_score"] - expected[result["index"]]) < 1e-5
        assert result["document"] is None
    top = caller.post("/v1/rerank", json={
        "model": "tiny-teacher", "query": QUERY, "top_n": 2, "return_documents": True,
        "raw_scores": True, "documents": [{"text": d} for d in DOCUMENTS]}).json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert top[0]["document"]["text"] == DOCUMENTS[top[0]["index"]]
    assert abs(top[0]["relevance_score"] - raw[top[0]["index"]]) < 1e-4


def test_rerank_refuses_what_it_cannot_serve(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    for model in ("tiny-student", "no-such-teacher"):
        response = caller.post("/v1/rerank", json={"model": model, "query": "q",
                                                   "documents": ["d"]})
        assert response.status_code == 404, model
    for body, field in (
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "", "documents": ["d"]}, "query"),
        ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["d"] * 2049}, "documents"),
    ):
        response = caller.post("/v1/rerank", json={"model": "tiny-teacher", **body})
        assert response.status_code == 422, body
        assert response.json()["field"] == field
    anonymous = sqlite_api.client.post("/v1/rerank", json={"model": "tiny-teacher",
                                                           "query": "q", "documents": ["d"]})
    assert anonymous.status_code == 401
    listing = caller.get("/v1/rerank/models").json()
    assert [m["id"] for m in listing["data"]] == ["tiny-teacher"]


def test_concurrent_rerank_requests_share_batches(sqlite_api: Api, served: str) -> None:
    caller = sqlite_api.tenant()
    batcher = Batcher(token_budget=8192, max_wait_s=0.2)
    sqlite_api.app.state.embedding_models._batcher = batcher
    queries = [f"{QUERY} {i}" for i in range(8)]

    def one(query: str) -> list[float]:
        response = httpx.post(f"{served}/v1/rerank", headers=caller.headers, timeout=60,
                              json={"model": "tiny-teacher", "query": query,
                                    "documents": DOCUMENTS, "raw_scores": True})
        assert response.status_code == 200, response.text
        scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        return [scores[i] for i in range(len(DOCUMENTS))]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, queries))
    for query, scores in zip(queries, got, strict=True):
        np.testing.assert_allclose(scores, _teacher_scores(sqlite_api, query, DOCUMENTS),
                                   atol=1e-4)
    assert batcher.batched_rows == 8 * len(DOCUMENTS) and batcher.batches < 8
