"""Bulk embedding job rules: create (model and corpus checked), read, list, and the stored files
a finished shard adds. Status and events go through app.jobs.lifecycle, as for training jobs."""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.orm import Session

from app.corpora.service import get_corpus
from app.db.models import EmbeddingJob, JobStatus, Tenant, TunedModel
from app.db.tenant_rows import newest_first, owned
from app.deps import Page
from app.embedding_jobs.files import FILE_NAME, embeddings_key
from app.embedding_jobs.schemas import EmbeddingJobCreate
from app.errors import InvalidRequest, InvalidState, NotFound, UnknownModel
from app.ids import new_id
from app.jobs import lifecycle
from app.logs import current_fields
from app.metadata import matches
from app.models.tenant_models import find_tenant_model, is_tenant_model
from app.quotas import check_concurrent_jobs
from app.settings import Settings
from app.storage import ObjectNotFound, ObjectStore
from ml_core.registry import ModelRegistry

MANIFEST = "manifest.json"
CHUNK = 1024 * 1024
TAR_BLOCK = 512


def _check_model(session: Session, tenant: Tenant, registry: ModelRegistry,
                 name: str) -> TunedModel | None:
    """422 unless `name` is a base student or the tenant's own model; returns a tuned model."""
    if is_tenant_model(name):
        own = find_tenant_model(session, tenant.id, name)
        if own is None:
            raise UnknownModel(f"model: {name} is none of your models", field="model")
        return own if isinstance(own, TunedModel) else None
    available = [spec.name for spec in registry.list("student")]
    try:
        spec = registry.get(name)
    except KeyError:
        raise UnknownModel(f"model: unknown model {name!r}; available: "
                           f"{', '.join(available) or 'none'} or one of your mdl_ ids",
                           field="model", available=available) from None
    if spec.role != "student":
        raise UnknownModel(f"model: {name!r} is a {spec.role}, not an embedding model",
                           field="model", available=available)
    return None


def create_embedding_job(
    session: Session, tenant: Tenant, request: EmbeddingJobCreate, registry: ModelRegistry,
    settings: Settings,
) -> EmbeddingJob:
    """A new queued bulk embedding job; the caller commits, then enqueues."""
    check_concurrent_jobs(session, tenant, settings.max_concurrent_jobs)
    tuned = _check_model(session, tenant, registry, request.model)
    corpus_id = request.corpus_id
    if corpus_id is None:
        if tuned is None:
            raise InvalidRequest("corpus_id is required (only a tuned model knows the corpus "
                                 "it was tuned on)", field="corpus_id")
        corpus_id = tuned.job.corpus_id
    # Locked until commit so the corpus cannot be deleted under a job being created.
    corpus = get_corpus(session, tenant, corpus_id, lock=True)
    spec = request.model_dump(mode="json") | {
        "corpus_id": corpus.id,
        "shard_documents": request.shard_documents or settings.embed_job_shard_documents,
    }
    job = EmbeddingJob(id=new_id("emb"), tenant_id=tenant.id, corpus_id=corpus.id,
                       model=request.model, spec=spec, name=request.name,
                       metadata_=dict(request.metadata),
                       request_id=current_fields().get("request_id"))
    session.add(job)
    lifecycle.mark_queued(session, job)
    session.flush()
    return job


def get_embedding_job(session: Session, tenant: Tenant, job_id: str) -> EmbeddingJob:
    """The tenant's bulk embedding job `job_id` (404 otherwise)."""
    return owned(session, EmbeddingJob, tenant.id, job_id, "embedding_job",
                 EmbeddingJob.deleted_at.is_(None))


def list_embedding_jobs(
    session: Session, tenant: Tenant, page: Page, name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[EmbeddingJob], int]:
    """A page of the tenant's bulk embedding jobs (with this name, holding these metadata
    pairs), newest first, and their total."""
    where = [EmbeddingJob.tenant_id == tenant.id, EmbeddingJob.deleted_at.is_(None),
             *matches(EmbeddingJob.metadata_, metadata or {})]
    if name is not None:
        where.append(EmbeddingJob.name == name)
    return newest_first(session, EmbeddingJob, page, *where)


@dataclass(frozen=True)
class StoredFile:
    """One of a job's stored files."""

    name: str
    kind: Literal["manifest", "vectors", "ids"]
    shard: int | None
    rows: int | None
    size: int
    sha256: str | None = None


def stored_files(store: ObjectStore, job: EmbeddingJob) -> tuple[list[StoredFile], bool]:
    """The files the stored manifest lists (manifest first), and whether the run is complete.
    A job that has stored nothing yet has none."""
    try:
        raw = store.get_bytes(embeddings_key(job.id, MANIFEST))
    except ObjectNotFound:
        return [], False
    manifest = json.loads(raw)
    files = [StoredFile(MANIFEST, "manifest", None, None, len(raw))]
    for shard in manifest.get("shards", []):
        files += [StoredFile(shard[kind], kind, shard["index"], shard["rows"],
                             shard["bytes"][shard[kind]], shard["sha256"][shard[kind]])
                  for kind in ("vectors", "ids")]
    complete = bool(manifest.get("complete")) and job.status == JobStatus.SUCCEEDED
    return files, complete


def file_key(store: ObjectStore, job: EmbeddingJob, name: str) -> str:
    """The object key of the job's file `name` (404 for a name it does not have)."""
    key = embeddings_key(job.id, name)
    if not FILE_NAME.match(name) or not store.exists(key):
        raise NotFound(f"embedding job {job.id} has no file {name}", resource="file", id=name)
    return key


def require_succeeded(job: EmbeddingJob) -> None:
    """409 unless the job has succeeded (its files are complete)."""
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidState(
            f"embedding job {job.id} is {job.status.value}; the whole download exists once it "
            "has succeeded (finished shards are listed under /files meanwhile)",
            status=job.status.value,
        )


def tar_members(job: EmbeddingJob, files: list[StoredFile]) -> list[tuple[bytes, str, int]]:
    """(tar header, object key, size) of each file, in a folder named after the job."""
    now = int(time.time())
    members = []
    for stored in files:
        info = tarfile.TarInfo(f"{job.id}/{stored.name}")
        info.size, info.mode, info.mtime = stored.size, 0o644, now
        members.append((info.tobuf(format=tarfile.USTAR_FORMAT), embeddings_key(job.id,
                                                                                 stored.name),
                        stored.size))
    return members


def tar_size(members: list[tuple[bytes, str, int]]) -> int:
    """The byte length of the tar stream `stream_tar` writes for `members`."""
    return sum(len(header) + _padded(size) for header, _, size in members) + 2 * TAR_BLOCK


def stream_tar(store: ObjectStore, members: list[tuple[bytes, str, int]]) -> Iterator[bytes]:
    """An uncompressed tar of the members, streamed from the store a chunk at a time (vectors
    do not compress; nothing is assembled on disk or in memory)."""
    for header, key, size in members:
        yield header
        yield from stream_file(store, key)
        yield b"\0" * (_padded(size) - size)
    yield b"\0" * (2 * TAR_BLOCK)


def stream_file(store: ObjectStore, key: str) -> Iterator[bytes]:
    """A stored object, a chunk at a time."""
    with store.open_stream(key) as stream:
        while chunk := stream.read(CHUNK):
            yield chunk


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK

