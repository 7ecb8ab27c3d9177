"""Job creation (validation, idempotency, enqueue after commit), listing, events, cancel, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.db.models import Job, JobStatus
from ml_core.config import PRESETS
from tests.api_support import Api, Caller, job_body, qrels_bytes, queries_bytes

pytest_plugins = ["tests.api_fixtures"]


def _broker_messages(broker_dir: Path, job_id: str) -> list[dict]:
    messages = []
    for path in broker_dir.rglob("*.msg"):
        message = json.loads(path.read_text())
        if job_id in json.dumps(message):
            messages.append(message)
    return messages


def _set_status(api: Api, job_id: str, status: JobStatus) -> None:
    with api.session() as session:
        session.get(Job, job_id).status = status
        session.commit()


def test_create_queues_the_job_after_commit(api: Api, broker_dir: Path) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_")
    assert (job["status"], job["progress"], job["stage"]) == ("queued", 0.0, None)
    assert job["error"] is None
    assert job["spec"]["base_model"] == "tiny-student"
    recipe = job["recipe"]
    assert (recipe["student"], recipe["teacher"], recipe["generator"]) == (
        "tiny-student", "tiny-teacher", "tiny-generator"
    )
    assert recipe["generation"]["passages"] == PRESETS["quick"]["generation"]["passages"]
    # The first stage's task is on the broker, and its id is recorded on the row.
    messages = _broker_messages(broker_dir, job["id"])
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "worker.tasks.run_stage"
    assert messages[0]["headers"]["argsrepr"] == repr((job["id"], "prepare"))
    with api.session() as session:
        assert session.get(Job, job["id"]).celery_task_id == messages[0]["headers"]["id"]
    events = caller.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["kind"], e["message"]) for e in events["data"]] == [("status", "queued")]


def test_explicit_fields_and_hyperparameters_shape_the_recipe(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    job = caller.job(
        corpus["id"],
        preset="default",
        passages=50,
        query_types=["questions", "claims"],
        loss="infonce",
        hyperparameters={"training": {"learning_rate": 3e-5, "max_epochs": 2}, "seed": 7},
    )
    recipe = job["recipe"]
    assert recipe["generation"]["passages"] == 50
    assert recipe["generation"]["query_types"] == ["questions", "claims"]
    assert recipe["training"]["loss"] == "infonce"
    assert recipe["training"]["learning_rate"] == 3e-5
    assert recipe["training"]["max_epochs"] == 2
    assert recipe["seed"] == 7
    styled = caller.job(corpus["id"], query_types=["like_examples", "questions"],
                        hyperparameters={"generation": {"example_queries": [" panel flutter "]}})
    assert styled["recipe"]["generation"]["query_types"] == ["like_examples", "questions"]
    assert styled["recipe"]["generation"]["example_queries"] == ["panel flutter"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"base_model": "no-such-model"}, "base_model"),
        ({"teacher": "no-such-teacher"}, "teacher"),
        ({"generator": "tiny-teacher"}, "generator"),  # exists, wrong role
        ({"base_model": "tiny-generator"}, "base_model"),
        ({"hyperparameters": {"candidates": {"helpers": ["no-such-helper"]}}},
         "hyperparameters.candidates.helpers"),
        ({"hyperparameters": {"candidates": {"helpers": ["tiny-teacher"]}}},
         "hyperparameters.candidates.helpers"),  # a helper retriever is a bi-encoder
        ({"hyperparameters": {"candidates": {"teacher_signal": "teachers",
                                             "co_teachers": ["no-such-teacher"]}}},
         "hyperparameters.candidates.co_teachers"),
        ({"hyperparameters": {"candidates": {"teacher_signal": "teachers_fused",
                                             "co_teachers": ["tiny-student"]}}},
         "hyperparameters.candidates.co_teachers"),  # a co-teacher is a teacher
    ],
)
def test_models_must_exist_with_the_right_role(sqlite_api: Api, fields: dict, field: str) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], **fields))
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["error"], body["field"]) == ("unknown_model", field)
    assert body["available"]
    assert caller.get("/v1/jobs").json()["count"] == 0


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"hyperparameters": {"training": {"learning_rate": 1.0}}}, "invalid_recipe",
         "hyperparameters.training.learning_rate"),
        ({"hyperparameters": {"candidates": {"top_k": 1}}}, "invalid_recipe",
         "hyperparameters.candidates.top_k"),
        ({"hyperparameters": {"candidates": {"helpers": ["tiny-student", "tiny-student"]}}},
         "invalid_recipe", "hyperparameters.candidates.helpers"),
        ({"hyperparameters": {"candidates": {"teacher_signal": "teachers"}}},
         "invalid_recipe", "hyperparameters.candidates"),  # averaged with no co-teacher
        ({"hyperparameters": {"training": {"no_such_knob": 1}}}, "invalid_recipe",
         "hyperparameters.training.no_such_knob"),
        ({"hyperparameters": {"training": {"batch_size": 4, "micro_batch_size": 8}}},
         "invalid_recipe", "hyperparameters.training"),
        ({"hyperparameters": {"training": {"tune": "queries"}}}, "invalid_recipe",
         "hyperparameters.training.tune"),  # not served: the export is one encoder
        ({"hyperparameters": {"training": {"tune": "passages"}}}, "invalid_recipe",
         "hyperparameters.training.tune"),
        ({"hyperparameters": {"generation": {"endpoint": "http://attacker.example"}}},
         "invalid_recipe", "hyperparameters.generation.endpoint"),
        ({"passages": 0}, "invalid_recipe", "passages"),
        # Queries written like the customer's need some of the customer's queries, and back.
        ({"query_types": ["like_examples"]}, "invalid_recipe", "hyperparameters.generation"),
        ({"hyperparameters": {"generation": {"example_queries": ["panel flutter"]}}},
         "invalid_recipe", "hyperparameters.generation"),
        ({"query_types": ["like_examples"],
          "hyperparameters": {"generation": {"example_queries": ["panel flutter", " "]}}},
         "invalid_recipe", "hyperparameters.generation.example_queries.1"),
        ({"preset": "turbo"}, "validation_error", "preset"),
        ({"query_types": ["riddles"]}, "validation_error", "query_types.0"),
        ({"loss": "mse"}, "validation_error", "loss"),
        ({"surprise": 1}, "validation_error", "surprise"),
    ],
)
def test_out_of_range_settings_name_the_field(
    sqlite_api: Api, fields: dict, error: str, field: str
) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], **fields))
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["error"], body["field"]) == (error, field), body
    assert field in body["detail"] or error == "validation_error"


def test_referenced_resources_must_be_the_callers_and_consistent(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus, other_corpus = caller.corpus(), caller.corpus()
    assert caller.post("/v1/jobs", json=job_body("crp_" + "0" * 24)).status_code == 404
    eval_set = caller.post(
        "/v1/eval-sets",
        data={"corpus_id": other_corpus["id"]},
        files={
            "queries": ("q", queries_bytes(["q1"])),
            "qrels": ("r", qrels_bytes([("q1", "d1", 1)])),
        },
    ).json()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], eval_set_id=eval_set["id"]))
    assert response.status_code == 422
    assert response.json()["field"] == "eval_set_id"
    job = caller.job(other_corpus["id"], eval_set_id=eval_set["id"])
    assert job["eval_set_id"] == eval_set["id"]
    _set_status(sqlite_api, job["id"], JobStatus.SUCCEEDED)
    assert caller.delete(f"/v1/corpora/{corpus['id']}").status_code == 204
    assert caller.post("/v1/jobs", json=job_body(corpus["id"])).status_code == 404


def test_idempotency_key(api: Api, broker_dir: Path) -> None:
    caller, other = api.tenant(), api.tenant()
    corpus = caller.corpus()
    body = job_body(corpus["id"])
    key = {"Idempotency-Key": "create-job-1"}
    first = caller.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == 201
    again = caller.post("/v1/jobs", json=body, headers=key)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(_broker_messages(broker_dir, first.json()["id"])) == 1  # enqueued once
    changed = caller.post("/v1/jobs", json={**body, "passages": 20}, headers=key)
    assert changed.status_code == 409
    assert changed.json()["error"] == "idempotency_conflict"
    assert changed.json()["job_id"] == first.json()["id"]
    assert caller.get("/v1/jobs").json()["count"] == 1
    # Another key, or another tenant with the same key, is another job.
    assert caller.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k2"}).status_code == 201
    other_corpus = other.corpus()
    assert other.post("/v1/jobs", json=job_body(other_corpus["id"]), headers=key).status_code == 201


def test_jobs_are_listed_newest_first_with_a_count(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    ids = [caller.job(corpus["id"])["id"] for _ in range(4)]
    page = caller.get("/v1/jobs", params={"limit": 3}).json()
    assert page["count"] == 4
    assert [j["id"] for j in page["data"]] == ids[::-1][:3]
    assert [j["id"] for j in caller.get("/v1/jobs", params={"offset": 3}).json()["data"]] == ids[:1]


def test_events_page_with_an_after_cursor(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    caller.post(f"/v1/jobs/{job['id']}/cancel")
    events = caller.get(f"/v1/jobs/{job['id']}/events").json()
    assert events["count"] == 2
    assert [e["message"] for e in events["data"]] == ["queued", "cancelled before it started"]
    first_id = events["data"][0]["id"]
    after = caller.get(f"/v1/jobs/{job['id']}/events", params={"after": first_id}).json()
    assert [e["id"] for e in after["data"]] == [events["data"][1]["id"]]
    assert after["count"] == 2
    limited = caller.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert [e["id"] for e in limited["data"]] == [first_id]


def _cancel(caller: Caller, job_id: str):
    return caller.post(f"/v1/jobs/{job_id}/cancel")


def test_a_cancel_waits_for_the_worker_claiming_the_job(sqlite_api: Api) -> None:
    # The worker reads the queued job, then marks it running; a cancel that lands between the
    # two must see the claim (and ask the worker to stop), not be overwritten by it. On SQLite,
    # which has no row locks, the claim used to win silently: the client was told "cancelled"
    # and the job ran on.
    import threading

    from app.jobs.lifecycle import locked_job

    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    answers: list = []
    cancel = threading.Thread(target=lambda: answers.append(_cancel(caller, job["id"])))
    with sqlite_api.session() as worker_side:
        claimed = locked_job(worker_side, job["id"])
        assert claimed is not None and claimed.status == JobStatus.QUEUED
        cancel.start()
        cancel.join(timeout=1.0)  # the cancel arrives while the worker decides
        claimed.status = JobStatus.RUNNING
        worker_side.commit()
    cancel.join(timeout=30)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["status"] == "cancelling"
    assert caller.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelling"


def test_cancel_a_queued_job(api: Api) -> None:
    caller = api.tenant()
    job = caller.job(caller.corpus()["id"])
    response = _cancel(caller, job["id"])
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    again = _cancel(caller, job["id"])
    assert again.status_code == 409
    assert again.json()["error"] == "invalid_state"
    assert caller.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_cancel_a_running_job_asks_the_worker(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    _set_status(sqlite_api, job["id"], JobStatus.RUNNING)
    response = _cancel(caller, job["id"])
    assert response.status_code == 200
    assert response.json()["status"] == "cancelling"
    assert response.json()["finished_at"] is None
    # Asking again while the worker winds down is harmless.
    assert _cancel(caller, job["id"]).json()["status"] == "cancelling"
    for finished in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        _set_status(sqlite_api, job["id"], finished)
        assert _cancel(caller, job["id"]).status_code == 409


def test_report_exists_once_the_job_has_succeeded(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    response = caller.get(f"/v1/jobs/{job['id']}/report")
    assert response.status_code == 409
    assert response.json()["status"] == "queued"
    _set_status(sqlite_api, job["id"], JobStatus.SUCCEEDED)
    assert caller.get(f"/v1/jobs/{job['id']}/report").status_code == 404  # not written
    report = {
        "base": {"ndcg@10": 0.31}, "tuned": {"ndcg@10": 0.42}, "gain": {"ndcg@10": 0.11},
        "recommended": "tuned", "warnings": [], "per_query_type": {}, "teacher_check": {},
        "judgements": "synthetic", "base_kept": False,
    }
    sqlite_api.app.state.store.put_bytes(
        f"jobs/{job['id']}/evaluate/report.json", json.dumps(report).encode()
    )
    assert caller.get(f"/v1/jobs/{job['id']}/report").json() == report


def test_concurrent_retries_with_one_idempotency_key_create_one_job(
    pg_api: Api, broker_dir: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    caller = pg_api.tenant()
    body = job_body(caller.corpus()["id"])
    headers = {"Idempotency-Key": "burst"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(
            lambda _: caller.post("/v1/jobs", json=body, headers=headers), range(4)
        ))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert caller.get("/v1/jobs").json()["count"] == 1
    assert len(_broker_messages(broker_dir, responses[0].json()["id"])) == 1


def test_the_model_id_shows_once_the_job_has_succeeded(sqlite_api: Api) -> None:
    # The worker reserves the id before the model is uploaded and its row exists; a job
    # that fails or is cancelled after that must not point at a model that is not there.
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    with sqlite_api.session() as session:
        session.get(Job, job["id"]).model_id = "mdl_reserved"
        session.commit()
    for status in (JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED):
        _set_status(sqlite_api, job["id"], status)
        assert caller.get(f"/v1/jobs/{job['id']}").json()["model_id"] is None
        assert caller.get("/v1/jobs").json()["data"][0]["model_id"] is None
    _set_status(sqlite_api, job["id"], JobStatus.SUCCEEDED)
    assert caller.get(f"/v1/jobs/{job['id']}").json()["model_id"] == "mdl_reserved"


def test_a_job_whose_task_cannot_be_queued_fails_saying_why(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings

    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    monkeypatch.setenv("TAILOR_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    get_settings.cache_clear()
    try:
        response = caller.post("/v1/jobs", json=job_body(corpus["id"]))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert response.status_code == 201, response.text
    job = caller.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "failed" and job["finished_at"] is not None
    # The same shape as a failure the worker records: error, detail, stage.
    assert set(job["error"]) == {"error", "detail", "stage"}
    assert (job["error"]["error"], job["error"]["stage"]) == ("enqueue_failed", "prepare")


def test_a_catalogued_model_not_installed_here_is_named_with_who_can_install_it(
    sqlite_api: Api,
) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], generator="gemma3-270m"))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "generator"
    assert "in Tailor's catalogue but not installed here" in body["detail"]
    assert "python -m ml_core provision gemma3-270m" in body["detail"]
    unknown = caller.post("/v1/jobs", json=job_body(corpus["id"], generator="no-such-model"))
    assert "catalogue" not in unknown.json()["detail"]
