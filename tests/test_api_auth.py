"""Authentication and tenant isolation across every resource kind."""

from __future__ import annotations

import json

import pytest

from app.db.models import Job, JobStatus, TunedModel
from app.ids import new_id
from app.tenants.service import revoke_api_key
from tests.api_support import Api, corpus_bytes, job_body, qrels_bytes, queries_bytes

pytest_plugins = ["tests.api_fixtures"]

PUBLIC = {"/healthz", "/readyz"}


def _protected_routes(api: Api) -> list[tuple[str, str]]:
    routes = []
    for path, operations in api.app.openapi()["paths"].items():
        if path not in PUBLIC:
            concrete = path.replace("{", "").replace("}", "")  # any id will do
            routes.extend((method.upper(), concrete) for method in operations)
    return routes


def test_every_route_but_health_needs_a_key(sqlite_api: Api) -> None:
    routes = _protected_routes(sqlite_api)
    assert len(routes) >= 18
    for method, path in routes:
        response = sqlite_api.client.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
        if method == "HEAD":  # a HEAD answer has no body
            continue
        error = response.json()["error"]
        if path == "/v1/embeddings":  # the OpenAI-compatible route answers in OpenAI's shape
            assert error["code"] == "invalid_api_key", response.text
        else:
            assert error == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer tlr_" + "x" * 40,  # well-formed, unknown
        "Bearer not-a-tailor-key",
        "Basic dXNlcjpwYXNz",
        "Bearer ",
    ],
)
def test_wrong_keys_are_refused(sqlite_api: Api, header: str) -> None:
    response = sqlite_api.client.get("/v1/corpora", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_a_key_differing_after_its_lookup_prefix_is_refused(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    forged = caller.key[:-1] + ("A" if caller.key[-1] != "A" else "B")
    response = sqlite_api.client.get("/v1/corpora", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert caller.get("/v1/corpora").status_code == 200


def test_a_revoked_key_stops_working(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    assert caller.get("/v1/jobs").status_code == 200
    with sqlite_api.session() as session:
        from app.db.models import ApiKey

        key_id = session.query(ApiKey.id).filter_by(tenant_id=caller.tenant_id).scalar()
        assert revoke_api_key(session, key_id)
        session.commit()
    assert caller.get("/v1/jobs").status_code == 401


def test_tenants_see_only_their_own_resources(api: Api) -> None:
    owner, other = api.tenant("owner"), api.tenant("other")
    corpus = owner.upload_corpus(corpus_bytes(3)).json()
    eval_set = owner.post(
        "/v1/eval-sets",
        data={"corpus_id": corpus["id"]},
        files={"queries": ("q.jsonl", queries_bytes(["q1"])),
               "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
    ).json()
    job = owner.post("/v1/jobs", json=job_body(corpus["id"])).json()
    with api.session() as session:
        model = TunedModel(
            id=new_id("mdl"), tenant_id=owner.tenant_id, job_id=job["id"], name="tuned",
            base_model="tiny-student", object_key=f"models/{job['id']}/model.tar.gz",
            folder_key=f"jobs/{job['id']}/distill/model/", dim=32,
        )
        session.add(model)
        session.commit()
        model_id = model.id

    reads = [
        f"/v1/corpora/{corpus['id']}",
        f"/v1/eval-sets/{eval_set['id']}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/report",
        f"/v1/models/{model_id}",
        f"/v1/models/{model_id}/download",
    ]
    for url in reads:
        response = other.get(url)
        assert response.status_code == 404, (url, response.text)
        assert response.json()["error"] == "not_found"
        assert owner.get(url).status_code != 404 or url.endswith("/download"), url

    assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert other.delete(f"/v1/corpora/{corpus['id']}").status_code == 404
    # Someone else's corpus cannot be used either.
    assert other.post("/v1/jobs", json=job_body(corpus["id"])).status_code == 404
    response = other.post(
        "/v1/eval-sets",
        data={"corpus_id": corpus["id"]},
        files={"queries": ("q.jsonl", queries_bytes(["q1"])),
               "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
    )
    assert response.status_code == 404
    for embed in (
        other.post("/v1/embed", json={"model": model_id, "inputs": ["x"]}),
        other.post("/v1/embeddings", json={"model": model_id, "input": "x"}),
    ):
        assert embed.status_code == 404, embed.text
    # Lists are per tenant.
    for url in ("/v1/corpora", "/v1/eval-sets", "/v1/jobs"):
        assert other.get(url).json() == {"data": [], "count": 0}
        assert owner.get(url).json()["count"] == 1
    assert model_id not in json.dumps(other.get("/v1/models").json())
    assert model_id in json.dumps(owner.get("/v1/models").json())
    # And the job still belongs to its owner, unchanged.
    with api.session() as session:
        assert session.get(Job, job["id"]).status == JobStatus.QUEUED
