"""End to end on the embedded default: SQLite, a local object folder and kombu's filesystem
broker (no server of any kind), with the API and a prefork Celery worker as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_stack import ServiceStack, embedded_env, run_full_loop, synthetic_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("embedded")
    stack = ServiceStack(embedded_env(root, model_store), root)
    try:
        stack.migrate_and_create_tenant()
        stack.start_api()
        stack.start_worker("worker-embedded")
        yield stack
    finally:
        stack.stop()


def test_full_loop_on_the_embedded_default(stack: ServiceStack, tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    job_id = run_full_loop(stack, corpus, tmp_path)
    objects = stack.root / "objects"
    # Every stage left its manifest in the local object store, and the archive is there.
    for stage in ("prepare", "generate", "filter", "distill", "evaluate"):
        assert (objects / "jobs" / job_id / stage / "manifest.json").is_file()
    assert list((objects / "models").glob("mdl_*/model.tar.gz"))
    # The broker really is a folder of message files, now drained.
    assert not list((stack.root / "broker" / "queue").glob("*.msg"))
