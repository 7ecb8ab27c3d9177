"""Artifacts: moving stage folders, inputs and the tuned model between a worker's scratch space
and the object store, and mirroring distill's resumable training state.

A finished stage lives in the store under jobs/<job_id>/<stage>/, its manifest written last (its
presence marks the stage done), so any worker on any host can fetch what earlier stages made.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

from app.settings import Settings
from app.storage import ObjectNotFound, ObjectStore, copy_store_to_tree, object_store_from_url
from ml_core.pipeline import MANIFEST, StageError
from ml_core.records import ProgressFn

# Files a stage writes for its own resume or bookkeeping that other hosts never need:
# distill's training state and best-checkpoint copy (model/ holds the same weights).
LOCAL_ONLY: dict[str, tuple[str, ...]] = {"distill": ("state", "best", "best.tmp", "best.old")}


def store_for(settings: Settings) -> ObjectStore:
    """The configured object store."""
    return object_store_from_url(settings.object_store_url, settings)


def stage_prefix(job_id: str, stage: str) -> str:
    """Where a finished stage's folder is stored."""
    return f"jobs/{job_id}/{stage}"


def fetch_input(store: ObjectStore, key: str, dest: Path) -> Path:
    """Download an input file unless an identical-size copy is already there."""
    if not (dest.is_file() and dest.stat().st_size == store.size(key)):
        store.get_file(key, dest)
    return dest


def sync_stage_down(store: ObjectStore, job_id: str, stage: str, folder: Path) -> bool:
    """Make `folder` hold the stored copy of a finished stage; True if anything was fetched.

    The local copy is reused when its manifest equals the stored one. Otherwise the folder is
    rebuilt from the store (a marker records which manifest a partial download belongs to, so
    an interrupted download resumes with only the missing files), manifest written last.
    """
    try:
        stored = store.get_bytes(f"{stage_prefix(job_id, stage)}/{MANIFEST}")
    except ObjectNotFound:
        raise StageError(f"stage {stage!r} of job {job_id} has no stored manifest") from None
    local_manifest = folder / MANIFEST
    if local_manifest.is_file() and local_manifest.read_bytes() == stored:
        return False
    marker = folder / ".syncing"
    digest = hashlib.sha256(stored).hexdigest()
    if not (marker.is_file() and marker.read_text() == digest):
        shutil.rmtree(folder, ignore_errors=True)  # another run's output: start clean
        folder.mkdir(parents=True)
        marker.write_text(digest)
    copy_store_to_tree(store, stage_prefix(job_id, stage), folder, skip=(MANIFEST,))
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_bytes(stored)
    tmp.replace(local_manifest)
    marker.unlink()
    return True


def upload_stage(store: ObjectStore, job_id: str, stage: str, folder: Path) -> int:
    """Upload a finished stage folder, manifest.json last (its presence marks it done)."""
    prefix = stage_prefix(job_id, stage)
    # Remove the stored manifest first: a crash mid-upload must not leave an old manifest
    # vouching for a mix of old and new files.
    store.delete(f"{prefix}/{MANIFEST}")
    skip_top = set(LOCAL_ONLY.get(stage, ()))
    count = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or rel.as_posix() == MANIFEST
            or rel.parts[0] in skip_top
            or rel.name.startswith(".")
            or rel.name.endswith(".tmp")
        ):
            continue
        store.put_file(f"{prefix}/{rel.as_posix()}", path)
        count += 1
    store.put_file(f"{prefix}/{MANIFEST}", folder / MANIFEST)
    return count + 1


def publish_model(
    store: ObjectStore,
    model_dir: Path,
    model_id: str,
    archive: Path,
    extras: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Store the tuned model as a folder and as a tar.gz (built at `archive`); returns the
    archive's key and the folder's key prefix. `extras` are text files for people added to the
    published folder beside the model's own (name -> content, e.g. the report.html page); the
    stage's model folder itself is left as distill wrote it."""
    object_key = f"models/{model_id}/model.tar.gz"
    folder_key = f"models/{model_id}/model/"
    added = {name: text.encode("utf-8") for name, text in (extras or {}).items()}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        # One top-level folder named after the model, so extracting never spills files.
        tar.add(model_dir, arcname=model_id)
        for name, data in added.items():
            info = tarfile.TarInfo(f"{model_id}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        store.put_file(folder_key + path.relative_to(model_dir).as_posix(), path)
    for name, data in added.items():
        store.put_bytes(folder_key + name, data)
    store.put_file(object_key, archive)
    return object_key, folder_key


def model_dim(model_dir: Path) -> int:
    """Embedding size from the sentence-transformers pooling config (or the model spec)."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        return int(json.loads(pooling.read_text())["word_embedding_dimension"])
    spec = json.loads((model_dir / "tailor-model.json").read_text())
    return int(spec["dim"])


# ---------------------------------------------------------------------------------------------
# Distill's training state, mirrored so a redelivered distill resumes on any host


def partial_prefix(job_id: str, stage: str) -> str:
    """Where a stage's resumable, unfinished state is mirrored (distill's training state)."""
    return f"jobs/{job_id}/{stage}.partial"


def upload_training_state(store: ObjectStore, job_id: str, folder: Path) -> int:
    """Mirror distill's resumable state (state/, best/ and the run's fingerprint) to the store.

    The stored fingerprint is removed first and written last: it vouches for a complete set.
    """
    prefix = partial_prefix(job_id, "distill")
    store.delete(f"{prefix}/fingerprint")
    count = 0
    for top in ("best", "state"):
        for path in sorted((folder / top).rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                store.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
                count += 1
    store.put_bytes(f"{prefix}/fingerprint", (folder / ".fingerprint").read_bytes())
    return count


def restore_training_state(
    store: ObjectStore, job_id: str, folder: Path, fingerprint: str
) -> bool:
    """Replace the local distill folder with the mirrored training state of this same run, when
    there is one; True if so.

    A redelivered distill then resumes after the last mirrored epoch on whichever host it lands
    (ml_core resumes when folder/.fingerprint matches). The mirror wins over a local state even
    for the same run: a task that went A -> B -> A finds A's state older than the mirror, while
    the mirror trails a host's own state by at most the epoch a crash cut before its upload.
    """
    started_for = folder / ".fingerprint"
    prefix = partial_prefix(job_id, "distill")
    try:
        stored = store.get_bytes(f"{prefix}/fingerprint").decode()
    except ObjectNotFound:
        return False
    if stored != fingerprint:
        return False  # a state left by different inputs: ml_core would ignore it anyway
    # Start clean: checkpoints of different epochs have the same size, so a size-based
    # "already here" check would keep a stale local file.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy_store_to_tree(store, prefix, folder, skip=("fingerprint",))
    started_for.write_text(fingerprint)
    return True


class TrainingStateMirror:
    """A ProgressFn wrapper for distill: after each training checkpoint, mirror the state.

    ml_core writes state/checkpoint.pt after every epoch; the next progress call sees the new
    file and uploads it, so at most one epoch is lost when a worker's host disappears.
    """

    def __init__(self, inner: ProgressFn, store: ObjectStore, job_id: str, folder: Path) -> None:
        from ml_core.training import STATE_FILE

        self.inner, self.store, self.job_id, self.folder = inner, store, job_id, folder
        self.state_file = folder / "state" / STATE_FILE
        self._mirrored = self._version()

    def _version(self) -> int | None:
        try:
            return self.state_file.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def __call__(self, fraction: float, message: str) -> None:
        self.inner(fraction, message)
        version = self._version()
        if version is not None and version != self._mirrored:
            upload_training_state(self.store, self.job_id, self.folder)
            self._mirrored = version
