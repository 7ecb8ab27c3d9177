"""One execution of one stage for one job, between the claim and the task's return.

    claim the stage (app.jobs.lifecycle) -> sync earlier stages from the object store -> run the
    stage (or skip it when its manifest is already stored) -> upload its folder, manifest last
    -> record its figures -> send the next stage's task; after evaluate, publish the model and
    finish the job.

Everything a stage needs is in the database row and the object store, so any worker on any host
can run any stage, and a redelivered task repeats only unfinished work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.db.models import Corpus, EvalSet, Job, QuerySet, TunedModel
from app.db.session import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import StageOutcome
from app.reports import render_report_from_stages
from app.settings import Settings
from app.storage import ObjectNotFound
from ml_core.config import RecipeConfig
from ml_core.export import render_model_card
from ml_core.pipeline import MANIFEST, STAGES, StageContext, StageError, stage_fingerprint
from ml_core.pipeline import run_stage as run_pipeline_stage
from ml_core.registry import ModelRegistry
from worker.artifacts import (
    TrainingStateMirror,
    fetch_input,
    model_dim,
    partial_prefix,
    publish_model,
    restore_training_state,
    stage_prefix,
    store_for,
    sync_stage_down,
    upload_stage,
)
from worker.dispatch import send_stage
from worker.leases import lease_held_by_another, raise_if_stopped
from worker.progress import ProgressReporter, stage_end, stage_offset
from worker.tenant_models import job_registry

# What a model card says of the recipe besides its base model: the choices that shaped it.
CARD_RECIPE = {
    "teacher": ("teacher",),
    "generator": ("generator",),
    "query_types": ("generation", "query_types"),
    "passages": ("generation", "passages"),
    "loss": ("training", "loss"),
    "list_size": ("training", "list_size"),
    "learning_rate": ("training", "learning_rate"),
    "max_epochs": ("training", "max_epochs"),
    "base_merge": ("training", "base_merge"),
    "seed": ("seed",),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    """What a stage reads from the job's rows, copied out of the session."""

    job_id: str
    tenant_id: str
    recipe: dict[str, Any]
    spec: dict[str, Any]
    corpus_key: str
    eval_queries_key: str | None
    eval_qrels_key: str | None
    train_queries_key: str | None = None


def claim(
    job_id: str, stage: str, redelivered: bool, owner: str = "", lease_ttl_s: float = 300.0,
    max_losses: int | None = None,
) -> JobInputs | None:
    """Decide whether this delivery should run; mark the job running and take its lease.

    None: nothing to do. StageBusy: another live process is running this stage (see
    `lease_held_by_another`); the caller tries again later.
    """
    with session_scope() as session:
        job = lifecycle.claim_stage(
            session,
            job_id,
            stage,
            stages=STAGES,
            progress=stage_offset(stage),
            owner=owner,
            lease_ttl_s=lease_ttl_s,
            redelivered=redelivered,
            held_elsewhere=lambda job: lease_held_by_another(job, owner),
            max_losses=max_losses,
        )
        if job is None:
            return None
        corpus = session.get(Corpus, job.corpus_id)
        eval_set = session.get(EvalSet, job.eval_set_id) if job.eval_set_id else None
        query_set = session.get(QuerySet, job.query_set_id) if job.query_set_id else None
        if corpus is None:
            raise StageError(f"corpus {job.corpus_id} of job {job_id} no longer exists")
        return JobInputs(
            job_id=job.id,
            tenant_id=job.tenant_id,
            recipe=dict(job.recipe),
            spec=dict(job.spec or {}),
            corpus_key=corpus.object_key,
            eval_queries_key=eval_set.queries_key if eval_set else None,
            eval_qrels_key=eval_set.qrels_key if eval_set else None,
            train_queries_key=query_set.queries_key if query_set else None,
        )


class StageRun:
    """One execution of one stage for one job."""

    def __init__(
        self, inputs: JobInputs, stage: str, settings: Settings, owner: str | None = None
    ) -> None:
        self.inputs, self.stage, self.settings = inputs, stage, settings
        self.owner = owner
        self.job_id = inputs.job_id
        self.store = store_for(settings)
        self.workdir = Path(settings.work_dir) / self.job_id
        self.config = RecipeConfig.model_validate(inputs.recipe)

    def run(self) -> str:
        """Run (or skip) the stage, record it and hand over; returns "advanced" or
        "succeeded"."""
        index = STAGES.index(self.stage)
        for upstream in STAGES[:index]:
            sync_stage_down(self.store, self.job_id, upstream, self.workdir / upstream)
        ctx = self._context()
        stored = self._stored_manifest()
        fingerprint = stage_fingerprint(self.stage, ctx)
        if stored is not None and stored.get("fingerprint") == fingerprint:
            # Finished and uploaded by an earlier delivery: only the bookkeeping is left.
            outcome = StageOutcome(
                skipped=True,
                counts=stored.get("counts", {}),
                metrics=stored.get("metrics", {}),
                seconds=stored.get("seconds"),
            )
            if self.stage == "evaluate":
                sync_stage_down(self.store, self.job_id, self.stage, self.workdir / self.stage)
        else:
            outcome = self._execute(ctx, fingerprint)
        with session_scope() as session:
            lifecycle.record_stage(session, self.job_id, self.stage, outcome, stage_end(self.stage))
        if index + 1 < len(STAGES):
            self._advance(STAGES[index + 1])
            return "advanced"
        self._finish()
        return "succeeded"

    def _execute(self, ctx: StageContext, fingerprint: str) -> StageOutcome:
        """Run the ml_core stage and upload its folder."""
        folder = self.workdir / self.stage
        mirrored = self.stage == "distill"  # the one stage with state worth resuming
        if mirrored:
            if restore_training_state(self.store, self.job_id, folder, fingerprint):
                log.info("job %s: resuming distill from the mirrored state", self.job_id)
            ctx = replace(
                ctx, progress=TrainingStateMirror(ctx.progress, self.store, self.job_id, folder)
            )
        result = run_pipeline_stage(self.stage, ctx)
        self._raise_if_stopped()
        upload_stage(self.store, self.job_id, self.stage, folder)
        if mirrored:
            self.store.delete_prefix(partial_prefix(self.job_id, self.stage))
        return StageOutcome(
            skipped=False,
            counts=result.manifest.get("counts", {}),
            metrics=result.metrics,
            seconds=result.manifest.get("seconds"),
        )

    def _context(self) -> StageContext:
        inputs_dir = self.workdir / "inputs"
        corpus_path = inputs_dir / Path(self.inputs.corpus_key).name
        # Only prepare (which fingerprints it) and evaluate (BM25 and whole documents beside
        # the chunks) read the corpus, only generate the customer's own training queries, only
        # evaluate the judgements.
        if self.stage in ("prepare", "evaluate"):
            fetch_input(self.store, self.inputs.corpus_key, corpus_path)
        train_queries = None
        if self.inputs.train_queries_key:
            train_queries = inputs_dir / "train" / Path(self.inputs.train_queries_key).name
            if self.stage == "generate":
                fetch_input(self.store, self.inputs.train_queries_key, train_queries)
        eval_queries = eval_qrels = None
        if self.inputs.eval_queries_key and self.inputs.eval_qrels_key:
            eval_queries = inputs_dir / "eval" / Path(self.inputs.eval_queries_key).name
            eval_qrels = inputs_dir / "eval" / Path(self.inputs.eval_qrels_key).name
            if self.stage == "evaluate":
                fetch_input(self.store, self.inputs.eval_queries_key, eval_queries)
                fetch_input(self.store, self.inputs.eval_qrels_key, eval_qrels)
        return StageContext(
            workdir=self.workdir,
            corpus_path=corpus_path,
            config=self.config,
            registry=self._registry(),
            eval_queries=eval_queries,
            eval_qrels=eval_qrels,
            train_queries=train_queries,
            progress=ProgressReporter(
                self.job_id, self.stage, self.settings.progress_interval_s, self.owner
            ),
        )

    def _registry(self) -> ModelRegistry:
        """The model store, plus the tenant's own model when the job tunes one (`mdl_...`)."""
        return job_registry(self.settings, self.store, self.inputs.tenant_id,
                            [self.config.student])

    def _model_card(self, model_id: str, report: dict[str, Any]) -> str:
        """README.md of the published folder: base model, recipe choices, the evaluate
        report's figures, licence."""
        recipe = self.config.model_dump(mode="json")
        card: dict[str, Any] = {}
        for name, path in CARD_RECIPE.items():
            value: Any = recipe
            for part in path:
                value = value[part]
            card[name] = value
        base = self._registry().get(self.config.student)
        return render_model_card(report, base, name=model_id, recipe=card)

    def _stored_manifest(self) -> dict[str, Any] | None:
        try:
            raw = self.store.get_bytes(f"{stage_prefix(self.job_id, self.stage)}/{MANIFEST}")
        except ObjectNotFound:
            return None
        return json.loads(raw)

    def _raise_if_stopped(self) -> None:
        """Before each step that publishes (upload, next stage, model): stop if the job was
        cancelled, or if another delivery took this stage over (LeaseLost): two copies must not
        upload over each other."""
        with session_scope() as session:
            raise_if_stopped(session.get(Job, self.job_id), self.job_id, self.stage, self.owner)

    def _advance(self, next_stage: str) -> None:
        """Send the next stage, then point the row at it.

        Send first: a crash between the two leaves a duplicate task at worst, never a job with
        no task. The duplicate waits on the lease while the first copy runs the stage and is
        dropped as stale by the claim once that copy has advanced the job.
        """
        self._raise_if_stopped()
        task_id = send_stage(self.job_id, next_stage)
        with session_scope() as session:
            lifecycle.advance(session, self.job_id, next_stage, task_id)

    def _pages_for_people(self, model_id: str) -> dict[str, str]:
        """report.html for the published model folder. A page that cannot be drawn is logged
        and left out: it must never fail a job whose model is ready."""
        try:
            page = render_report_from_stages(
                self.workdir, facts=[("job", self.job_id), ("model", model_id)]
            )
        except Exception:
            log.exception("job %s: the report page could not be rendered", self.job_id)
            return {}
        return {"report.html": page}

    def _finish(self) -> None:
        """Publish the tuned model, create its row and mark the job succeeded."""
        self._raise_if_stopped()
        report = json.loads((self.workdir / "evaluate" / "report.json").read_text())
        model_dir = self.workdir / "distill" / "model"
        with session_scope() as session:
            model_id = lifecycle.reserve_model_id(session, self.job_id)
        archive = self.workdir / "export" / "model.tar.gz"
        object_key, folder_key = publish_model(
            self.store, model_dir, model_id, archive,
            extras={**self._pages_for_people(model_id),
                    "README.md": self._model_card(model_id, report)},
        )
        model = TunedModel(
            id=model_id,
            tenant_id=self.inputs.tenant_id,
            job_id=self.job_id,
            name=str(self.inputs.spec.get("name") or f"{self.config.student}-{self.job_id}"),
            base_model=self.config.student,
            object_key=object_key,
            folder_key=folder_key,
            dim=model_dim(model_dir),
            metrics={**dict(report.get("tuned", {})), "gain": report.get("gain", {})},
            recommended=report.get("recommended", "base") == "tuned",
            metadata_=dict(self.inputs.spec.get("metadata") or {}),
        )
        with session_scope() as session:
            lifecycle.succeed(session, self.job_id, model, report)
