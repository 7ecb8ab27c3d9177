"""One execution of a bulk embedding job, between the claim and the task's return.

    claim the job (app.jobs.lifecycle, stage "embed") -> fetch the corpus -> load the model (a
    tenant's own from the object store, once per host) -> read the stored manifest: shards
    already finished by an earlier delivery are skipped -> embed the rest shard by shard
    (ml_core.bulk_embed), storing each shard's two files and then the manifest -> mark the job
    succeeded with its counts.

A worker killed mid-run loses at most the shard it was writing: the redelivered task finds the
manifest and starts at the next shard. Cancellation stops the run at its next progress report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.db.models import Corpus, EmbeddingJob, EventKind
from app.db.session import session_scope
from app.embedding_jobs.files import embeddings_key, embeddings_prefix
from app.jobs import lifecycle
from app.settings import Settings
from app.storage import ObjectNotFound
from ml_core.bulk_embed import MANIFEST, BulkSettings, Shard, embed_corpus, finished_shards
from ml_core.pipeline import StageError
from worker.artifacts import fetch_input, store_for
from worker.celery_app import EMBED_STAGE
from worker.leases import lease_held_by_another, raise_if_stopped
from worker.progress import ProgressReporter
from worker.tenant_models import job_registry

log = logging.getLogger(__name__)

# Tokens per encoder batch when the settings leave it to the hardware (as serving does).
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 8_192, 65_536


@dataclass(frozen=True)
class EmbeddingInputs:
    """What the run reads from the job's rows, copied out of the session."""

    job_id: str
    tenant_id: str
    model: str
    spec: dict[str, Any]
    corpus_key: str
    corpus_sha256: str
    corpus_documents: int


def claim_embedding(
    job_id: str, redelivered: bool, owner: str = "", lease_ttl_s: float = 300.0,
    max_losses: int | None = None,
) -> EmbeddingInputs | None:
    """Decide whether this delivery runs: mark the job running and take its lease (None:
    nothing to do; StageBusy: another live process runs it)."""
    with session_scope() as session:
        job = lifecycle.claim_stage(
            session,
            job_id,
            EMBED_STAGE,
            stages=(EMBED_STAGE,),
            progress=0.0,
            owner=owner,
            lease_ttl_s=lease_ttl_s,
            redelivered=redelivered,
            held_elsewhere=lambda job: lease_held_by_another(job, owner),
            max_losses=max_losses,
        )
        if job is None:
            return None
        assert isinstance(job, EmbeddingJob)
        corpus = session.get(Corpus, job.corpus_id)
        if corpus is None:
            raise StageError(f"corpus {job.corpus_id} of job {job_id} no longer exists")
        return EmbeddingInputs(
            job_id=job.id,
            tenant_id=job.tenant_id,
            model=job.model,
            spec=dict(job.spec),
            corpus_key=corpus.object_key,
            corpus_sha256=corpus.sha256,
            corpus_documents=corpus.documents,
        )


def _batch_tokens(settings: Settings, device: str) -> int:
    if settings.embed_batch_tokens:
        return settings.embed_batch_tokens
    return GPU_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS


class EmbeddingRun:
    """One execution of one bulk embedding job."""

    def __init__(self, inputs: EmbeddingInputs, settings: Settings, owner: str | None = None
                 ) -> None:
        self.inputs, self.settings, self.owner = inputs, settings, owner
        self.job_id = inputs.job_id
        self.store = store_for(settings)
        self.workdir = Path(settings.work_dir) / self.job_id

    def run(self) -> str:
        """Embed the shards not stored yet, then finish the job; returns "succeeded"."""
        from ml_core.corpus import iter_corpus
        from ml_core.student import Student

        started = time.monotonic()
        inputs = self.inputs
        corpus = fetch_input(self.store, inputs.corpus_key,
                             self.workdir / "inputs" / Path(inputs.corpus_key).name)
        registry = job_registry(self.settings, self.store, inputs.tenant_id, [inputs.model])
        spec = registry.get(inputs.model)
        if spec.role != "student":
            raise StageError(f"model {inputs.model!r} is a {spec.role}, not an embedding model")
        student = Student.load(spec)
        run = BulkSettings(
            model=inputs.model,
            model_sha256=hashlib.sha256(
                json.dumps(spec.sha256, sort_keys=True).encode()).hexdigest(),
            corpus_sha256=inputs.corpus_sha256,
            input_type=inputs.spec["input_type"],
            long_documents=inputs.spec["long_documents"],
            shard_documents=int(inputs.spec["shard_documents"]),
        )
        done = self._finished(run)
        progress = ProgressReporter(self.job_id, EMBED_STAGE, self.settings.progress_interval_s,
                                    self.owner, span=(0.0, 1.0))
        final = embed_corpus(
            iter_corpus(corpus), inputs.corpus_documents, student, run, self.workdir / "shards",
            token_budget=_batch_tokens(self.settings, str(student.device)),
            done=done, on_shard=self._store_shard, progress=progress,
        )
        self._raise_if_stopped()
        self.store.put_bytes(embeddings_key(self.job_id, MANIFEST), _json(final))
        figures = {key: final[key] for key in ("documents", "rows", "dim", "truncated")}
        figures |= {"shards": len(final["shards"]), "resumed_at_shard": len(done) or None,
                    "seconds": round(time.monotonic() - started, 3)}
        with session_scope() as session:
            lifecycle.complete(session, self.job_id, EMBED_STAGE, figures,
                               f"succeeded: {final['rows']} vectors of {final['documents']} "
                               "documents")
        shutil.rmtree(self.workdir, ignore_errors=True)
        return "succeeded"

    def _finished(self, run: BulkSettings) -> list[Shard]:
        """The shards an earlier delivery stored for this same run; anything else stored under
        the job (another run's shards) is removed."""
        try:
            stored = json.loads(self.store.get_bytes(embeddings_key(self.job_id, MANIFEST)))
        except ObjectNotFound:
            stored = None
        done = finished_shards(stored, run)
        if done:
            documents = sum(shard.documents for shard in done)
            with session_scope() as session:
                lifecycle.add_event(
                    session, self.job_id, EventKind.PROGRESS,
                    f"resuming after shard {len(done) - 1}: {documents} documents were "
                    "already embedded",
                    stage=EMBED_STAGE, data={"shards_done": len(done), "documents": documents},
                )
        elif stored is not None or self.store.list(embeddings_prefix(self.job_id)):
            self.store.delete_prefix(embeddings_prefix(self.job_id))
        return done

    def _store_shard(self, shard: Shard, manifest: dict[str, Any]) -> None:
        """Store a finished shard's files, then the manifest that lists it (last: it vouches
        for the files)."""
        self._raise_if_stopped()
        folder = self.workdir / "shards"
        for name in shard.names():
            self.store.put_file(embeddings_key(self.job_id, name), folder / name)
            (folder / name).unlink()
        self.store.put_bytes(embeddings_key(self.job_id, MANIFEST), _json(manifest))

    def _raise_if_stopped(self) -> None:
        with session_scope() as session:
            raise_if_stopped(session.get(EmbeddingJob, self.job_id), self.job_id, EMBED_STAGE,
                             self.owner)


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
