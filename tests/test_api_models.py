"""Models: base and tuned listings, download, and embedding through both endpoints."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.db.models import Job, JobStatus, Recommendation, TunedModel
from app.ids import new_id
from tests.api_support import Api, Caller

pytest_plugins = ["tests.api_fixtures"]


@pytest.fixture(scope="session")
def tuned_archive(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuned model archive as the worker writes it: the exported folder under `<id>/`."""
    from ml_core.student import Student

    student = Student.load(model_store / "tiny-student")
    # A visibly different model: the tuned weights are the base's, scaled.
    with __import__("torch").no_grad():
        for parameter in student.model.parameters():
            parameter.mul_(1.5)
    folder = tmp_path_factory.mktemp("tuned") / "model"
    student.save(folder)
    archive = folder.parent / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="mdl_archive_root")
    return archive


def _tuned_model(api: Api, caller: Caller, archive: Path | None) -> str:
    """A succeeded job and its tuned model row (+ archive in the store), as the worker leaves
    them."""
    job = caller.job(caller.corpus()["id"])
    model_id = new_id("mdl")
    key = f"models/{model_id}/model.tar.gz"
    if archive is not None:
        api.app.state.store.put_file(key, archive)
    with api.session() as session:
        session.add(TunedModel(
            id=model_id, tenant_id=caller.tenant_id, job_id=job["id"], name=f"{job['id']}-tuned",
            base_model="tiny-student", object_key=key, folder_key=f"models/{model_id}/model/",
            dim=32, metrics={"ndcg@10": 0.5}, recommended=True,
        ))
        row = session.get(Job, job["id"])
        row.status, row.model_id, row.recommended = (
            JobStatus.SUCCEEDED, model_id, Recommendation.TUNED
        )
        session.commit()
    return model_id


def test_models_lists_base_students_and_the_tenants_tuned_models(api: Api) -> None:
    caller = api.tenant()
    listing = caller.get("/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["tiny-student"]  # teacher/generator are not
    assert listing["data"][0] | {"licence": None} == {
        "id": "tiny-student", "kind": "base", "name": "tiny-student", "base_model": None,
        "dim": 32, "job_id": None, "metrics": {}, "recommended": None, "licence": None,
        "metadata": {}, "created_at": None,
    }
    model_id = _tuned_model(api, caller, archive=None)
    listing = caller.get("/v1/models").json()
    assert listing["count"] == 2
    assert [m["id"] for m in listing["data"]] == ["tiny-student", model_id]
    assert [m["id"] for m in caller.get("/v1/models", params={"offset": 1}).json()["data"]] == [
        model_id
    ]
    tuned = caller.get(f"/v1/models/{model_id}").json()
    assert tuned["kind"] == "tuned"
    assert (tuned["base_model"], tuned["recommended"]) == ("tiny-student", True)
    assert caller.get(f"/v1/jobs/{tuned['job_id']}").json()["model_id"] == model_id
    assert caller.get("/v1/models/tiny-student").json()["kind"] == "base"
    for missing in ("tiny-teacher", "nope", "mdl_" + "0" * 24):
        assert caller.get(f"/v1/models/{missing}").status_code == 404


def test_download_streams_the_archive_from_a_local_store(
    sqlite_api: Api, tuned_archive: Path
) -> None:
    caller = sqlite_api.tenant()
    model_id = _tuned_model(sqlite_api, caller, tuned_archive)
    response = caller.get(f"/v1/models/{model_id}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{model_id}.tar.gz"' in response.headers["content-disposition"]
    assert response.content == tuned_archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        assert "mdl_archive_root/modules.json" in tar.getnames()
    assert caller.get("/v1/models/tiny-student/download").status_code == 404


def test_download_with_an_onnx_export_whose_vectors_match(
    sqlite_api: Api, tuned_archive: Path, tmp_path: Path
) -> None:
    from ml_core.export import onnx_sentence_embeddings
    from ml_core.student import Student

    caller = sqlite_api.tenant()
    model_id = _tuned_model(sqlite_api, caller, tuned_archive)
    response = caller.get(f"/v1/models/{model_id}/download", params={"onnx": "true"})
    assert response.status_code == 200, response.text
    assert f'filename="{model_id}-onnx.tar.gz"' in response.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert {"mdl_archive_root/onnx/model.onnx", "mdl_archive_root/modules.json"} <= set(names)
    texts = ["boundary layer transition", "supersonic wind tunnel tests"]
    served = _vectors(caller.post("/v1/embed", json={"model": model_id, "inputs": texts}).json())
    student = Student.load(tmp_path / "mdl_archive_root")
    batch = student.tokenizer(student.encoding_texts(texts, "passage"), padding=True,
                              return_tensors="np")
    onnx_vectors = onnx_sentence_embeddings(tmp_path / "mdl_archive_root/onnx/model.onnx",
                                            dict(batch))
    np.testing.assert_allclose(onnx_vectors, served, atol=1e-5)
    # Built once, then kept beside the archive.
    assert f"models/{model_id}/model-onnx.tar.gz" in sqlite_api.stored()
    again = caller.get(f"/v1/models/{model_id}/download", params={"onnx": "true"})
    assert again.content == response.content


def _vectors(response_json: dict) -> np.ndarray:
    return np.array([row["embedding"] for row in response_json["data"]], dtype=np.float32)


def test_embed_with_base_and_tuned_models(sqlite_api: Api, tuned_archive: Path) -> None:
    caller = sqlite_api.tenant()
    texts = ["boundary layer transition", "supersonic wind tunnel"]
    queries = caller.post("/v1/embed", json={"model": "tiny-student", "inputs": texts,
                                              "input_type": "query"})
    assert queries.status_code == 200, queries.text
    body = queries.json()
    assert (body["model"], body["dim"]) == ("tiny-student", 32)
    assert [row["index"] for row in body["data"]] == [0, 1]
    q = _vectors(body)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)  # the spec normalizes
    p = _vectors(caller.post("/v1/embed", json={"model": "tiny-student", "inputs": texts}).json())
    assert not np.allclose(q, p)  # "query: " and "passage: " prefixes differ

    from ml_core.student import Student

    reference = Student.load(sqlite_api.settings.model_store / "tiny-student")
    assert np.allclose(q, reference.encode_queries(texts), atol=1e-5)

    model_id = _tuned_model(sqlite_api, caller, tuned_archive)
    tuned = caller.post("/v1/embed", json={"model": model_id, "inputs": texts,
                                            "input_type": "query"})
    assert tuned.status_code == 200, tuned.text
    t = _vectors(tuned.json())
    assert t.shape == (2, 32) and not np.allclose(t, q)
    unpacked = Student.load(sqlite_api.settings.embed_cache_dir / model_id / "mdl_archive_root")
    assert np.allclose(t, unpacked.encode_queries(texts), atol=1e-5)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny-student", "inputs": []},
        {"model": "tiny-student", "inputs": ["x"] * 2049},
        {"model": "tiny-student", "inputs": [""]},
        {"model": "tiny-student", "inputs": ["x" * 16_385]},
        {"model": "tiny-student", "inputs": ["x"], "input_type": "document"},
    ],
)
def test_embed_input_limits(sqlite_api: Api, body: dict) -> None:
    response = sqlite_api.tenant().post("/v1/embed", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


def test_embed_unknown_models_are_not_found(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    for model in ("nope", "tiny-teacher", "mdl_" + "0" * 24):
        response = caller.post("/v1/embed", json={"model": model, "inputs": ["x"]})
        assert response.status_code == 404, model


def test_openai_shape_base64_and_query_selection(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    floats = caller.post("/v1/embeddings", json={"model": "tiny-student", "input": "wind tunnel"})
    assert floats.status_code == 200, floats.text
    body = floats.json()
    assert body["object"] == "list" and body["model"] == "tiny-student"
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    passage = np.array(body["data"][0]["embedding"], dtype=np.float32)
    encoded = caller.post("/v1/embeddings", json={
        "model": "tiny-student", "input": ["wind tunnel"], "encoding_format": "base64",
    }).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, passage)
    by_field = caller.post("/v1/embeddings", json={
        "model": "tiny-student", "input": "wind tunnel", "input_type": "query",
    }).json()
    by_suffix = caller.post("/v1/embeddings", json={
        "model": "tiny-student:query", "input": "wind tunnel",
    }).json()
    assert by_suffix["model"] == "tiny-student:query"
    query = np.array(by_field["data"][0]["embedding"], dtype=np.float32)
    assert np.allclose(query, by_suffix["data"][0]["embedding"])
    assert not np.allclose(query, passage)
    mismatch = caller.post("/v1/embeddings", json={
        "model": "tiny-student", "input": "x", "dimensions": 8,
    })
    assert mismatch.status_code == 422
    assert mismatch.json()["error"]["param"] == "dimensions"


def test_the_model_cache_keeps_the_most_recent_models(sqlite_api: Api, tuned_archive: Path) -> None:
    caller = sqlite_api.tenant()
    models = sqlite_api.app.state.embedding_models
    models.capacity = 1
    model_id = _tuned_model(sqlite_api, caller, tuned_archive)
    for name in ("tiny-student", model_id, "tiny-student"):
        assert caller.post("/v1/embed", json={"model": name, "inputs": ["x"]}).status_code == 200
        assert list(models._loaded) == [name if name.startswith("mdl_") else f"base:{name}"]


def test_the_official_openai_sdk_works_unchanged(sqlite_api: Api, served: str) -> None:
    import httpx
    from openai import OpenAI

    caller = sqlite_api.tenant()
    assert httpx.get(f"{served}/healthz").json() == {"status": "ok"}
    client = OpenAI(base_url=f"{served}/v1", api_key=caller.key, max_retries=0)
    # The SDK asks for base64 by default and decodes it; `input_type` rides in extra_body.
    passages = client.embeddings.create(model="tiny-student", input=["wind tunnel", "airfoil"])
    assert len(passages.data) == 2 and len(passages.data[0].embedding) == 32
    assert passages.usage.total_tokens > 0
    queries = client.embeddings.create(
        model="tiny-student", input="wind tunnel", extra_body={"input_type": "query"}
    )
    direct = caller.post("/v1/embed", json={"model": "tiny-student", "inputs": ["wind tunnel"],
                                            "input_type": "query"}).json()
    assert np.allclose(queries.data[0].embedding, direct["data"][0]["embedding"], atol=1e-6)
    float_format = client.embeddings.create(
        model="tiny-student", input="airfoil", encoding_format="float"
    )
    assert np.allclose(float_format.data[0].embedding, passages.data[1].embedding, atol=1e-6)
    from openai import AuthenticationError, NotFoundError

    with pytest.raises(NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{served}/v1", api_key="tlr_wrong", max_retries=0).embeddings.create(
            model="tiny-student", input="x"
        )


def test_download_answers_head_and_byte_ranges(sqlite_api: Api, tuned_archive: Path) -> None:
    caller = sqlite_api.tenant()
    model_id = _tuned_model(sqlite_api, caller, tuned_archive)
    url = f"/v1/models/{model_id}/download"
    whole = tuned_archive.read_bytes()
    head = sqlite_api.client.head(url, headers=caller.headers)
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(whole)
    assert head.headers["accept-ranges"] == "bytes"
    def ranged(spec: str) -> Any:
        return sqlite_api.client.get(url, headers={**caller.headers, "Range": spec})

    part = ranged("bytes=10-109")
    assert part.status_code == 206
    assert part.content == whole[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{len(whole)}"
    tail = ranged("bytes=-100")
    assert (tail.status_code, tail.content) == (206, whole[-100:])
    past = ranged(f"bytes={len(whole) + 10}-")
    assert past.status_code == 416
    assert past.json()["error"] == "range_not_satisfiable"
    assert past.headers["content-range"] == f"bytes */{len(whole)}"
    # A Range the server cannot read is ignored: the whole archive (RFC 9110).
    assert (ranged("lines=1-2").status_code, ranged("lines=1-2").content) == (200, whole)
    assert sqlite_api.client.head(url).status_code == 401


def test_a_model_that_cannot_be_loaded_is_a_503_without_internal_names(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    model_id = _tuned_model(sqlite_api, caller, archive=None)  # its row, but no archive
    response = caller.post("/v1/embed", json={"model": model_id, "inputs": ["wing"]})
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "unavailable"
    assert body["request_id"] == response.headers["x-request-id"]
    assert "models/" not in body["detail"] and "tar.gz" not in body["detail"]
    assert "/" not in body["detail"].replace("/v1", "")


def test_uploaded_and_tuned_models_are_listed_together_newest_first(api: Api) -> None:
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import UploadedModel

    caller = api.tenant()
    tuned = _tuned_model(api, caller, archive=None)
    uploaded = new_id("mdl")
    with api.session() as session:
        session.add(UploadedModel(
            id=uploaded, tenant_id=caller.tenant_id, name="ours", filename="ours.tar.gz",
            object_key=f"models/{uploaded}/model.tar.gz", folder_key=f"models/{uploaded}/model/",
            size_bytes=1, sha256="0" * 64, dim=32, spec={}, created_at=utcnow() + timedelta(1),
        ))
        session.commit()
    listing = caller.get("/v1/models").json()
    assert [m["id"] for m in listing["data"]] == ["tiny-student", uploaded, tuned]
    assert listing["count"] == 3
    assert [m["id"] for m in caller.get("/v1/models", params={"offset": 2}).json()["data"]] == [
        tuned]
    assert [m["id"] for m in caller.get("/v1/models", params={"limit": 2}).json()["data"]] == [
        "tiny-student", uploaded]
    assert caller.get(f"/v1/models/{uploaded}").json()["kind"] == "uploaded"
    assert api.tenant("other").get(f"/v1/models/{uploaded}").status_code == 404
