"""Lifecycle of what a tenant stores: names and metadata on jobs and models (set, change,
filter), deletion of jobs, bulk embedding jobs, models, eval sets, query sets and corpora (what
depends on them, what goes from the store and the caches), and the retention sweep."""

from __future__ import annotations

import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.db.base import utcnow
from app.db.models import EmbeddingJob, Job, JobStatus, TunedModel
from app.ids import new_id
from app.jobs import retention
from tests.api_support import Api, Caller, job_body, qrels_bytes, queries_bytes

pytest_plugins = ["tests.api_fixtures"]


def _patch(caller: Caller, url: str, body: dict[str, Any]) -> Any:
    return caller.api.client.patch(url, headers=caller.headers, json=body)


def _set_status(api: Api, model: type, job_id: str, status: JobStatus, **values: Any) -> None:
    with api.session() as session:
        row = session.get(model, job_id)
        row.status = status
        row.finished_at = values.pop("finished_at", utcnow())
        for name, value in values.items():
            setattr(row, name, value)
        session.commit()


def _eval_set(caller: Caller, corpus_id: str) -> dict[str, Any]:
    response = caller.post(
        "/v1/eval-sets", data={"corpus_id": corpus_id},
        files={"queries": ("q.jsonl", queries_bytes(["q1"])),
               "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
    )
    assert response.status_code == 201, response.text
    return response.json()


def _query_set(caller: Caller, corpus_id: str) -> dict[str, Any]:
    response = caller.post("/v1/query-sets", data={"corpus_id": corpus_id},
                           files={"queries": ("log.jsonl", queries_bytes(["q1", "q2"]))})
    assert response.status_code == 201, response.text
    return response.json()


def _tuned_model(api: Api, caller: Caller, job_id: str) -> str:
    model_id = new_id("mdl")
    api.app.state.store.put_bytes(f"models/{model_id}/model.tar.gz", b"archive")
    api.app.state.store.put_bytes(f"models/{model_id}/model/config.json", b"{}")
    with api.session() as session:
        session.add(TunedModel(
            id=model_id, tenant_id=caller.tenant_id, job_id=job_id, name="tuned",
            base_model="tiny-student", object_key=f"models/{model_id}/model.tar.gz",
            folder_key=f"models/{model_id}/model/", dim=32,
        ))
        session.commit()
    return model_id


def test_jobs_take_a_name_and_metadata_change_them_and_filter_by_them(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    first = caller.job(corpus["id"], name="nightly", metadata={"team": "search", "v": "3"})
    second = caller.job(corpus["id"], metadata={"team": "ads"})
    assert (first["name"], first["metadata"]) == ("nightly", {"team": "search", "v": "3"})
    assert (second["name"], second["metadata"]) == (None, {"team": "ads"})

    def ids(**params: str) -> list[str]:
        response = caller.get("/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["data"]]

    assert ids(**{"metadata[team]": "search"}) == [first["id"]]
    assert ids(**{"metadata[team]": "search", "metadata[v]": "4"}) == []
    assert ids(name="nightly") == [first["id"]]
    assert ids() == [second["id"], first["id"]]

    changed = _patch(caller, f"/v1/jobs/{second['id']}", {"name": "weekly",
                                                          "metadata": {"team": "search"}})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["metadata"]) == ("weekly", {"team": "search"})
    assert ids(**{"metadata[team]": "search"}) == [second["id"], first["id"]]
    # Left out: kept; metadata replaces the whole set.
    kept = _patch(caller, f"/v1/jobs/{second['id']}", {"metadata": {}}).json()
    assert (kept["name"], kept["metadata"]) == ("weekly", {})
    # Another tenant's job is as absent as a missing one.
    assert _patch(api.tenant("other"), f"/v1/jobs/{first['id']}", {"name": "x"}).status_code \
        == 404


@pytest.mark.parametrize(("metadata", "names"), [
    ({f"k{i}": "v" for i in range(17)}, "at most 16 pairs"),
    ({"k" * 65: "v"}, "longer than 64"),
    ({"team": "v" * 513}, "value of key 'team'"),
    ({"team": 3}, "string"),
])
def test_metadata_past_its_limits_is_refused_naming_the_field(
    api: Api, metadata: dict[str, Any], names: str
) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], metadata=metadata))
    assert response.status_code == 422
    assert response.json()["field"].startswith("metadata")
    assert names in response.json()["detail"]
    job = caller.job(corpus["id"])
    patched = _patch(caller, f"/v1/jobs/{job['id']}", {"metadata": metadata})
    assert patched.status_code == 422 and patched.json()["field"].startswith("metadata")
    assert caller.get("/v1/jobs", params={"metadata[]": "x"}).status_code == 422
    assert caller.get("/v1/jobs", params={"metadataX": "x"}).json()["field"] == "metadataX"


def test_deleting_a_queued_job_cancels_it_and_removes_its_objects(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    job = caller.post("/v1/jobs", json=job_body(corpus["id"]),
                      headers={"Idempotency-Key": "k1"}).json()
    store = api.app.state.store
    store.put_bytes(f"jobs/{job['id']}/prepare/manifest.json", b"{}")
    assert caller.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert caller.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert caller.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert caller.get("/v1/jobs").json()["count"] == 0
    assert store.list(f"jobs/{job['id']}/") == []
    with api.session() as session:
        row = session.get(Job, job["id"])
        assert row.status == JobStatus.CANCELLED and row.purged_at is not None
    # The key is free again: the same request makes a new job.
    again = caller.post("/v1/jobs", json=job_body(corpus["id"]),
                        headers={"Idempotency-Key": "k1"})
    assert again.status_code == 201 and again.json()["id"] != job["id"]


def test_a_running_job_deleted_stops_first_and_its_objects_go_once_it_has(api: Api) -> None:
    caller = api.tenant()
    job = caller.job(caller.corpus()["id"])
    _set_status(api, Job, job["id"], JobStatus.RUNNING, finished_at=None)
    store = api.app.state.store
    store.put_bytes(f"jobs/{job['id']}/distill.partial/state.pt", b"state")
    assert caller.delete(f"/v1/jobs/{job['id']}").status_code == 204
    with api.session() as session:
        assert session.get(Job, job["id"]).status == JobStatus.CANCELLING
    assert retention.sweep_objects(store, retention_s=3600) == []  # still stopping
    assert store.list(f"jobs/{job['id']}/") != []
    _set_status(api, Job, job["id"], JobStatus.CANCELLED)  # what the worker records
    assert retention.sweep_objects(store, retention_s=3600) == [job["id"]]
    assert store.list(f"jobs/{job['id']}/") == []
    assert retention.sweep_objects(store, retention_s=3600) == []  # once


def test_the_sweep_keeps_a_failed_jobs_objects_for_the_retention_then_removes_them(
    api: Api, tmp_path: Path
) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    old, recent, done, running = (caller.job(corpus["id"]) for _ in range(4))
    long_ago = utcnow() - timedelta(hours=2)
    _set_status(api, Job, old["id"], JobStatus.FAILED, finished_at=long_ago)
    _set_status(api, Job, recent["id"], JobStatus.CANCELLED)
    _set_status(api, Job, done["id"], JobStatus.SUCCEEDED, finished_at=long_ago)
    _set_status(api, Job, running["id"], JobStatus.RUNNING, finished_at=None)
    store = api.app.state.store
    work = tmp_path / "work"
    for job in (old, recent, done, running):
        store.put_bytes(f"jobs/{job['id']}/prepare/manifest.json", b"{}")
        (work / job["id"] / "prepare").mkdir(parents=True)
    (work / "job_unknown").mkdir()
    assert retention.sweep_objects(store, retention_s=3600) == [old["id"]]
    assert sorted(key.split("/")[1] for key in store.list("jobs/")) == sorted(
        [recent["id"], done["id"], running["id"]])
    # Work folders: the succeeded job's goes at once (its outputs are stored), the failed one's
    # past the retention; a running job's and one this database does not know stay.
    assert sorted(retention.sweep_work_folders(work, retention_s=3600)) == sorted(
        [old["id"], done["id"]])
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [recent["id"], running["id"], "job_unknown"])


def test_the_sweep_removes_unpacked_copies_of_deleted_models_only(
    api: Api, tmp_path: Path
) -> None:
    caller = api.tenant()
    job = caller.job(caller.corpus()["id"])
    kept = _tuned_model(api, caller, job["id"])
    cache = tmp_path / "cache"
    for name in (kept, "mdl_deleted0000000000000000", "base:tiny-student", "onnx"):
        (cache / name).mkdir(parents=True)
    assert retention.sweep_model_cache(cache) == ["mdl_deleted0000000000000000"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([kept, "base:tiny-student", "onnx"])


def test_models_are_renamed_filtered_and_deleted_with_their_objects_and_cached_copies(
    api: Api,
) -> None:
    caller = api.tenant()
    job = caller.job(caller.corpus()["id"])
    _set_status(api, Job, job["id"], JobStatus.SUCCEEDED)
    model_id = _tuned_model(api, caller, job["id"])
    changed = _patch(caller, f"/v1/models/{model_id}", {"name": "legal-v2",
                                                        "metadata": {"team": "legal"}})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["name"], changed.json()["metadata"]) == ("legal-v2",
                                                                    {"team": "legal"})
    listed = caller.get("/v1/models", params={"metadata[team]": "legal"}).json()
    assert [m["id"] for m in listed["data"]] == [model_id] and listed["count"] == 1
    assert [m["id"] for m in caller.get("/v1/models", params={"name": "tiny-student"})
            .json()["data"]] == ["tiny-student"]
    assert _patch(caller, "/v1/models/tiny-student", {"name": "x"}).status_code == 404

    # A job not yet finished that tunes it again holds it.
    user = caller.job(job["corpus_id"])
    with api.session() as session:
        row = session.get(Job, user["id"])
        row.recipe = {**row.recipe, "student": model_id}
        session.commit()
    refused = caller.delete(f"/v1/models/{model_id}")
    assert refused.status_code == 409 and refused.json()["job_ids"] == [user["id"]]
    _set_status(api, Job, user["id"], JobStatus.FAILED)

    cached = Path(api.settings.embed_cache_dir) / model_id
    cached.mkdir(parents=True)
    assert caller.delete(f"/v1/models/{model_id}").status_code == 204
    assert caller.get(f"/v1/models/{model_id}").status_code == 404
    assert api.app.state.store.list(f"models/{model_id}/") == []
    assert not cached.exists()
    assert caller.get(f"/v1/jobs/{job['id']}").status_code == 200  # the job that tuned it stays


@pytest.mark.parametrize("kind", ["eval-sets", "query-sets"])
def test_a_set_is_deleted_once_no_unfinished_job_uses_it(api: Api, kind: str) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    made = (_eval_set if kind == "eval-sets" else _query_set)(caller, corpus["id"])
    field = "eval_set_id" if kind == "eval-sets" else "query_set_id"
    job = caller.job(corpus["id"], **{field: made["id"]})
    refused = caller.delete(f"/v1/{kind}/{made['id']}")
    assert refused.status_code == 409
    assert refused.json()["error"] == "in_use" and refused.json()["job_ids"] == [job["id"]]
    _set_status(api, Job, job["id"], JobStatus.SUCCEEDED)
    assert caller.delete(f"/v1/{kind}/{made['id']}").status_code == 204
    assert caller.get(f"/v1/{kind}/{made['id']}").status_code == 404
    assert caller.get(f"/v1/{kind}").json()["count"] == 0
    folder = kind.replace("-", "_")
    assert api.app.state.store.list(f"{folder}/{made['id']}/") == []
    assert caller.get(f"/v1/jobs/{job['id']}").json()[field] == made["id"]


def test_deleting_a_corpus_names_its_unfinished_jobs_or_cancels_them_with_cascade(
    api: Api,
) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    eval_set = _eval_set(caller, corpus["id"])
    jobs = [caller.job(corpus["id"]) for _ in range(2)]
    _set_status(api, Job, jobs[1]["id"], JobStatus.RUNNING, finished_at=None)
    refused = caller.delete(f"/v1/corpora/{corpus['id']}")
    assert refused.status_code == 409
    assert sorted(refused.json()["job_ids"]) == sorted(job["id"] for job in jobs)
    assert "cascade=true" in refused.json()["detail"]
    assert caller.get(f"/v1/corpora/{corpus['id']}").status_code == 200

    assert caller.delete(f"/v1/corpora/{corpus['id']}",
                         params={"cascade": "true"}).status_code == 204
    statuses = [caller.get(f"/v1/jobs/{job['id']}").json()["status"] for job in jobs]
    assert statuses == ["cancelled", "cancelling"]
    assert caller.get(f"/v1/eval-sets/{eval_set['id']}").status_code == 404
    store = api.app.state.store
    assert store.list(f"corpora/{corpus['id']}/") == []
    assert store.list(f"eval_sets/{eval_set['id']}/") == []


def test_a_bulk_embedding_job_is_named_filtered_and_deleted_with_its_vectors(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    created = caller.post("/v1/embedding-jobs", json={"corpus_id": corpus["id"],
                                                      "model": "tiny-student",
                                                      "metadata": {"index": "v1"}})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["metadata"] == {"index": "v1"}
    renamed = _patch(caller, f"/v1/embedding-jobs/{job_id}", {"name": "reindex"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "reindex"
    listed = caller.get("/v1/embedding-jobs", params={"metadata[index]": "v1", "name": "reindex"})
    assert [job["id"] for job in listed.json()["data"]] == [job_id]
    assert caller.get("/v1/embedding-jobs", params={"metadata[index]": "v2"}).json()["count"] == 0
    _set_status(api, EmbeddingJob, job_id, JobStatus.SUCCEEDED)
    store = api.app.state.store
    store.put_bytes(f"embedding-jobs/{job_id}/manifest.json", b"{}")
    assert caller.delete(f"/v1/embedding-jobs/{job_id}").status_code == 204
    assert caller.get(f"/v1/embedding-jobs/{job_id}").status_code == 404
    assert store.list(f"embedding-jobs/{job_id}/") == []
    assert caller.get("/v1/embedding-jobs").json()["count"] == 0


def test_a_deleted_model_leaves_the_servers_loaded_models_and_is_served_no_more(
    sqlite_api: Api, model_store: Path, tmp_path: Path
) -> None:
    from ml_core.student import Student

    folder = Student.load(model_store / "tiny-student").save(tmp_path / "model")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="model")
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    _set_status(sqlite_api, Job, job["id"], JobStatus.SUCCEEDED)
    model_id = _tuned_model(sqlite_api, caller, job["id"])
    sqlite_api.app.state.store.put_file(f"models/{model_id}/model.tar.gz", archive)
    served = caller.post("/v1/embed", json={"model": model_id, "inputs": ["airfoil"]})
    assert served.status_code == 200, served.text
    models = sqlite_api.app.state.embedding_models
    assert model_id in models._loaded
    assert (Path(sqlite_api.settings.embed_cache_dir) / model_id).is_dir()

    assert caller.delete(f"/v1/models/{model_id}").status_code == 204
    assert model_id not in models._loaded
    assert not (Path(sqlite_api.settings.embed_cache_dir) / model_id).exists()
    gone = caller.post("/v1/embed", json={"model": model_id, "inputs": ["airfoil"]})
    assert gone.status_code == 404 and gone.json()["error"] == "not_found"
