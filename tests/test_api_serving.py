"""Serving over real HTTP: batching across requests, truncation, Matryoshka dimensions, and the
OpenAI compatibility real clients need (the official SDK and LangChain's OpenAIEmbeddings)."""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.embeddings.batching import Batcher
from tests.api_support import Api
from tests.test_api_models import _tuned_model

pytest_plugins = ["tests.api_fixtures"]

LONG = "boundary layer transition on a swept wing at high mach numbers " * 30


def _vectors(body: dict) -> np.ndarray:
    return np.array([row["embedding"] for row in body["data"]], dtype=np.float32)


def test_concurrent_requests_are_batched_and_answered_with_their_own_vectors(
    sqlite_api: Api, served: str
) -> None:
    from ml_core.student import Student

    caller = sqlite_api.tenant()
    models = sqlite_api.app.state.embedding_models
    models._batcher = Batcher(token_budget=8192, max_wait_s=0.2)  # room for company
    texts = [f"wind tunnel test number {i} of a swept wing" for i in range(16)]

    def one(text: str) -> np.ndarray:
        response = httpx.post(f"{served}/v1/embed", headers=caller.headers, timeout=60,
                              json={"model": "tiny-student", "inputs": [text],
                                    "input_type": "query"})
        assert response.status_code == 200, response.text
        return _vectors(response.json())[0]

    with ThreadPoolExecutor(16) as pool:
        got = np.stack(list(pool.map(one, texts)))
    reference = Student.load(sqlite_api.settings.model_store / "tiny-student")
    np.testing.assert_allclose(got, reference.encode_queries(texts), atol=1e-5)
    assert models.batcher.batched_rows == 16 and models.batcher.batches < 16


def test_truncate_cuts_or_refuses_long_inputs(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    cut = caller.post("/v1/embed", json={"model": "tiny-student", "inputs": ["short", LONG]})
    assert cut.status_code == 200, cut.text
    assert cut.json()["truncated"] == 1 and cut.json()["tokens"] > 128
    refused = caller.post("/v1/embed", json={"model": "tiny-student", "inputs": ["short", LONG],
                                             "truncate": False})
    assert refused.status_code == 422
    assert refused.json()["field"] == "inputs.1"
    assert "limit of 128 tokens" in refused.json()["detail"]
    openai = caller.post("/v1/embeddings", json={"model": "tiny-student", "input": [LONG],
                                                 "truncate": False})
    assert openai.status_code == 422 and openai.json()["error"]["param"] == "input.0"
    assert caller.post("/v1/embeddings", json={"model": "tiny-student",
                                               "input": LONG}).json()["truncated"] == 1


@pytest.mark.parametrize(
    ("payload", "param", "message"),
    [
        ({"input": []}, "input", "at least one input"),
        ({"input": ["x"] * 2049}, "input", "at most 2048"),
        ({"input": ["ok", ""]}, "input", "input[1] is an empty string"),
        ({"input": ["ok", 3]}, "input", "input[1] must be a string"),
        ({"input": [[1, 2], []]}, "input", "input[1] is an empty list of token ids"),
        ({"input": [[1, 2]] * 2049}, "input", "at most 2048"),
        ({"input": [[100_000_000]]}, "input.0", "not in OpenAI's cl100k_base"),
        ({"input": "x", "dimensions": 8}, "dimensions", "not trained to be truncated"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", "float"),
    ],
)
def test_openai_route_errors_have_openai_shape(
    sqlite_api: Api, payload: dict, param: str, message: str
) -> None:
    response = sqlite_api.tenant().post("/v1/embeddings", json={"model": "tiny-student",
                                                                **payload})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"], error


def test_openai_token_id_inputs_embed_the_text_they_encode(sqlite_api: Api) -> None:
    from app.embeddings.openai_compat import token_encoding

    caller = sqlite_api.tenant()
    texts = ["wind tunnel", "heat transfer in a boundary layer"]
    ids = [token_encoding().encode(t) for t in texts]
    by_text = _vectors(caller.post("/v1/embeddings", json={"model": "tiny-student",
                                                           "input": texts}).json())
    by_ids = caller.post("/v1/embeddings", json={"model": "tiny-student", "input": ids})
    assert by_ids.status_code == 200, by_ids.text
    np.testing.assert_allclose(_vectors(by_ids.json()), by_text, atol=1e-6)
    one = caller.post("/v1/embeddings", json={"model": "tiny-student", "input": ids[0]})
    np.testing.assert_allclose(_vectors(one.json())[0], by_text[0], atol=1e-6)


@pytest.fixture(scope="module")
def matryoshka_archive(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuned model whose spec says it was trained to be cut to 16 and 8 dimensions."""
    from ml_core.student import Student

    student = Student.load(model_store / "tiny-student")
    student.spec = student.spec.model_copy(update={"matryoshka_dims": (16, 8)})
    folder = student.save(tmp_path_factory.mktemp("matryoshka") / "model")
    archive = folder.parent / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="mdl_archive_root")
    return archive


def test_dimensions_cut_and_renormalise_a_matryoshka_model(
    sqlite_api: Api, matryoshka_archive: Path
) -> None:
    caller = sqlite_api.tenant()
    model_id = _tuned_model(sqlite_api, caller, matryoshka_archive)
    full = _vectors(caller.post("/v1/embed", json={"model": model_id, "inputs": ["airfoil"]})
                    .json())
    short = caller.post("/v1/embeddings", json={"model": model_id, "input": "airfoil",
                                                "dimensions": 16})
    assert short.status_code == 200, short.text
    cut = _vectors(short.json())
    assert cut.shape == (1, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    too_many = caller.post("/v1/embed", json={"model": model_id, "inputs": ["x"],
                                              "dimensions": 64})
    assert too_many.status_code == 422 and too_many.json()["field"] == "dimensions"


def test_the_openai_sdk_sees_openai_errors(sqlite_api: Api, served: str) -> None:
    from openai import NotFoundError, OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=f"{served}/v1", api_key=sqlite_api.tenant().key, max_retries=0)
    with pytest.raises(UnprocessableEntityError) as empty:
        client.embeddings.create(model="tiny-student", input=[])
    assert "must hold at least one input" in empty.value.message
    assert (empty.value.param, empty.value.code) == ("input", "validation_error")
    with pytest.raises(NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.code == "model_not_found"
    assert "no-such-model" in missing.value.message
    many = client.embeddings.create(model="tiny-student", input=["airfoil"] * 2048)
    assert len(many.data) == 2048 and many.usage.prompt_tokens > 0


@pytest.fixture
def tiktoken_cache(tmp_path: Path) -> Iterator[None]:
    """cl100k_base where tiktoken looks for it (LangChain's client loads it by URL; the cache
    holds it under the URL's sha1, so nothing is downloaded)."""
    import hashlib

    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    data = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copy(data, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tmp_path)
    yield
    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved


def test_langchain_openai_embeddings_work_with_their_defaults(
    sqlite_api: Api, served: str, tiktoken_cache: None
) -> None:
    from langchain_openai import OpenAIEmbeddings

    caller = sqlite_api.tenant()
    # Defaults: LangChain tokenizes with cl100k_base and sends token ids.
    embeddings = OpenAIEmbeddings(model="tiny-student", base_url=f"{served}/v1",
                                  api_key=caller.key, max_retries=0)
    texts = ["the pressure distribution on a thin wing", "shock waves and heat flux"]
    documents = np.array(embeddings.embed_documents(texts), dtype=np.float32)
    direct = _vectors(caller.post("/v1/embed", json={"model": "tiny-student",
                                                     "inputs": texts}).json())
    np.testing.assert_allclose(documents, direct, atol=1e-5)
    queries = OpenAIEmbeddings(model="tiny-student:query", base_url=f"{served}/v1",
                               api_key=caller.key, max_retries=0)
    query = np.array(queries.embed_query("thin wing pressure"), dtype=np.float32)
    as_query = _vectors(caller.post("/v1/embed", json={"model": "tiny-student",
                                                       "inputs": ["thin wing pressure"],
                                                       "input_type": "query"}).json())
    np.testing.assert_allclose(query, as_query[0], atol=1e-5)
