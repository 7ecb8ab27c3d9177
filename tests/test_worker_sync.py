"""How a worker moves stage folders between its scratch space and the object store."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from app.storage import LocalObjectStore
from ml_core.pipeline import StageError
from worker.artifacts import (
    publish_model,
    restore_training_state,
    sync_stage_down,
    upload_stage,
    upload_training_state,
)
from worker.progress import STAGE_WEIGHTS, stage_offset


def _stage_folder(root: Path, stage: str, marker: str) -> Path:
    folder = root / stage
    (folder / "model" / "1_Pooling").mkdir(parents=True)
    (folder / "model" / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    (folder / "state").mkdir()
    (folder / "state" / "checkpoint.pt").write_bytes(b"optimizer state")
    (folder / "history.json").write_text("[]")
    (folder / ".fingerprint").write_text("abc")
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "run": marker}))
    return folder


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def test_upload_puts_manifest_last_and_keeps_local_only_files_local(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    folder = _stage_folder(tmp_path / "host-a", "distill", "1")
    uploaded: list[str] = []
    original = store.put_file
    store.put_file = lambda key, path: (uploaded.append(key), original(key, path))  # type: ignore[method-assign]
    upload_stage(store, "job_1", "distill", folder)
    assert uploaded[-1] == "jobs/job_1/distill/manifest.json"
    assert store.list("jobs/job_1/") == [
        "jobs/job_1/distill/history.json",
        "jobs/job_1/distill/manifest.json",
        "jobs/job_1/distill/model/1_Pooling/config.json",
    ]


def test_sync_down_reuses_rebuilds_and_resumes(store: LocalObjectStore, tmp_path: Path) -> None:
    upload_stage(store, "job_1", "filter", _stage_folder(tmp_path / "a", "filter", "stored"))
    target = tmp_path / "b" / "filter"

    assert sync_stage_down(store, "job_1", "filter", target)
    assert json.loads((target / "manifest.json").read_text())["run"] == "stored"
    assert (target / "model" / "1_Pooling" / "config.json").is_file()
    # Same manifest locally: nothing is fetched again.
    assert not sync_stage_down(store, "job_1", "filter", target)

    # A local copy from another run (different manifest) is replaced, stray files included.
    (target / "manifest.json").write_text('{"run": "other"}')
    (target / "stray.txt").write_text("left over")
    assert sync_stage_down(store, "job_1", "filter", target)
    assert not (target / "stray.txt").exists()
    assert json.loads((target / "manifest.json").read_text())["run"] == "stored"


def test_sync_down_refuses_an_unfinished_stage(store: LocalObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no stored manifest"):
        sync_stage_down(store, "job_1", "prepare", tmp_path / "prepare")


def test_stage_weights_cover_the_job() -> None:
    assert sum(STAGE_WEIGHTS.values()) == pytest.approx(1.0)
    assert stage_offset("prepare") == 0.0
    assert stage_offset("evaluate") == pytest.approx(0.9)


def _training_folder(root: Path, fingerprint: str, epoch: str) -> Path:
    folder = root / "distill"
    (folder / "state").mkdir(parents=True, exist_ok=True)
    (folder / "best").mkdir(exist_ok=True)
    (folder / ".fingerprint").write_text(fingerprint)
    (folder / "state" / "checkpoint.pt").write_text(f"epoch {epoch}")  # same size every epoch
    (folder / "best" / "model.safetensors").write_text(f"best {epoch}")
    return folder


def test_mirrored_training_state_replaces_an_older_local_one(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    # Host B mirrored epoch 3; host A still holds its own epoch 1 of the same run (A -> B -> A).
    upload_training_state(store, "job_1", _training_folder(tmp_path / "b", "fp", "3"))
    local = _training_folder(tmp_path / "a", "fp", "1")
    (local / "stale.txt").write_text("from an older attempt")
    assert restore_training_state(store, "job_1", local, "fp")
    assert (local / "state" / "checkpoint.pt").read_text() == "epoch 3"
    assert (local / "best" / "model.safetensors").read_text() == "best 3"
    assert (local / ".fingerprint").read_text() == "fp"
    assert not (local / "stale.txt").exists()


def test_training_state_of_other_inputs_or_none_is_not_restored(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    local = _training_folder(tmp_path / "a", "fp-new", "1")
    assert not restore_training_state(store, "job_1", local, "fp-new")  # nothing mirrored
    upload_training_state(store, "job_1", _training_folder(tmp_path / "b", "fp-old", "3"))
    assert not restore_training_state(store, "job_1", local, "fp-new")
    assert (local / "state" / "checkpoint.pt").read_text() == "epoch 1"


def test_a_published_model_carries_its_pages_for_people_and_leaves_the_stage_as_it_was(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    model_dir = _stage_folder(tmp_path / "work", "distill", "run-1") / "model"
    before = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*"))
    archive_key, folder_key = publish_model(
        store, model_dir, "mdl_1", tmp_path / "export" / "model.tar.gz",
        extras={"report.html": "<!doctype html><p>report</p>"},
    )
    with tarfile.open(store.get_file(archive_key, tmp_path / "got.tar.gz")) as tar:
        names = tar.getnames()
        page = tar.extractfile("mdl_1/report.html")
        assert page is not None and page.read() == b"<!doctype html><p>report</p>"
    assert "mdl_1/1_Pooling/config.json" in names
    assert store.get_bytes(folder_key + "report.html") == b"<!doctype html><p>report</p>"
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before


def test_evaluate_fetches_the_corpus_for_its_bm25_and_whole_document_rows(tmp_path: Path) -> None:
    """A worker that runs evaluate without having run prepare still has the corpus to read
    (the report's BM25 and whole-document rows need the documents whole); generate does not
    fetch it."""
    from app.settings import Settings
    from ml_core.config import build_config
    from worker.stage_run import JobInputs, StageRun

    settings = Settings(object_store_url=f"file://{tmp_path / 'objects'}",
                        work_dir=tmp_path / "work")
    LocalObjectStore(tmp_path / "objects").put_bytes("corpora/c1.jsonl", b'{"_id": "d1"}\n')
    inputs = JobInputs(job_id="job_1", tenant_id="ten_1",
                       recipe=build_config("default").model_dump(mode="json"), spec={},
                       corpus_key="corpora/c1.jsonl", eval_queries_key=None,
                       eval_qrels_key=None)
    generate = StageRun(inputs, "generate", settings)._context()
    assert not generate.corpus_path.exists()
    evaluate = StageRun(inputs, "evaluate", settings)._context()
    assert evaluate.corpus_path.read_bytes() == b'{"_id": "d1"}\n'
