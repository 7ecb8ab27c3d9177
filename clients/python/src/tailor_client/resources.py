"""One class per API collection. A collection route is a few lines: subclass `Collection` with
its path and item type for list / iterate / get, and add the routes it has beyond those."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from tailor_client.errors import ConflictError, TailorError
from tailor_client.transport import Retry, Transport
from tailor_client.types import (
    FINISHED_STATUSES,
    Corpus,
    EvalSet,
    Job,
    JobEvent,
    Model,
    Page,
    QuerySet,
    Report,
)
from tailor_client.uploads import ProgressFn, open_upload

T = TypeVar("T")

MAX_PAGE = 100  # the API's largest `limit` for its lists
MAX_EVENT_PAGE = 1000


class WaitTimeout(TailorError, TimeoutError):
    """A job did not finish within the time the caller gave it."""


class Collection(Generic[T]):
    """A list route with offset pagination (`offset`, `limit` -> {data, count}) and a read
    route `path/{id}`."""

    path: ClassVar[str]

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def list(self, *, offset: int = 0, limit: int = 20) -> Page[T]:
        """One page, newest first."""
        return self._transport.json("GET", self.path, params={"offset": offset, "limit": limit})

    def iter(self, *, page_size: int = MAX_PAGE) -> Iterator[T]:
        """Every item, page by page. An item created while iterating can shift an older one
        onto the next page: items are yielded once each (by id)."""
        seen: set[str] = set()
        offset = 0
        while True:
            page = self.list(offset=offset, limit=page_size)
            for item in page["data"]:
                key = item.get("id")  # type: ignore[attr-defined]
                if key not in seen:
                    seen.add(key)
                    yield item
            offset += len(page["data"])
            if not page["data"] or offset >= page["count"]:
                return

    def get(self, id: str) -> T:
        """One item by id."""
        return self._transport.json("GET", f"{self.path}/{id}")

    def _delete(self, id: str, **params: Any) -> None:
        self._transport.request("DELETE", f"{self.path}/{id}", params=params or None)

    def _update(self, id: str, fields: dict[str, Any]) -> Any:
        """PATCH the fields given (None: left out, so the server keeps the old value)."""
        body = {k: v for k, v in fields.items() if v is not None}
        return self._transport.json("PATCH", f"{self.path}/{id}", json=body)

    def filter(
        self, *, name: str | None = None, metadata: dict[str, str] | None = None,
        offset: int = 0, limit: int = 20,
    ) -> Page[T]:
        """A page of the items with this name and all these metadata pairs (jobs and models)."""
        params: dict[str, Any] = {"offset": offset, "limit": limit, "name": name}
        params |= {f"metadata[{k}]": v for k, v in (metadata or {}).items()}
        return self._transport.json("GET", self.path, params=params)

    def _upload(
        self,
        fields: dict[str, str | None],
        files: dict[str, str | Path],
        on_progress: ProgressFn | None = None,
    ) -> Any:
        """POST a multipart upload; files are opened afresh for each attempt."""

        def open_files(stack: ExitStack) -> dict[str, Any]:
            return {
                name: open_upload(stack, Path(path), on_progress) for name, path in files.items()
            }

        data = {k: v for k, v in fields.items() if v is not None}
        return self._transport.json(
            "POST", self.path, data=data, files=open_files, retry=Retry.UNSAFE
        )


class Corpora(Collection[Corpus]):
    path = "/v1/corpora"

    def upload(
        self, file: str | Path, *, name: str | None = None, on_progress: ProgressFn | None = None
    ) -> Corpus:
        """Upload a BEIR corpus (JSON lines, plain or .gz); the server validates every line."""
        return self._upload({"name": name}, {"file": file}, on_progress)

    def delete(self, id: str, *, cascade: bool = False) -> None:
        """Delete a corpus with the eval and query sets built on it (409 `in_use`, naming them
        in `job_ids`, while jobs that use it have not finished; `cascade` cancels them)."""
        self._delete(id, cascade="true" if cascade else None)


class EvalSets(Collection[EvalSet]):
    path = "/v1/eval-sets"

    def create(
        self,
        corpus_id: str,
        queries: str | Path,
        qrels: str | Path,
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> EvalSet:
        """Upload judgements for a corpus: BEIR queries (JSONL) and qrels (TSV)."""
        return self._upload(
            {"corpus_id": corpus_id, "name": name},
            {"queries": queries, "qrels": qrels},
            on_progress,
        )

    def delete(self, id: str) -> None:
        """Delete an eval set (409 `in_use` while a job that uses it has not finished)."""
        self._delete(id)


class QuerySets(Collection[QuerySet]):
    path = "/v1/query-sets"

    def create(
        self,
        corpus_id: str,
        queries: str | Path,
        *,
        name: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> QuerySet:
        """Upload your users' own queries (JSONL, no judgements) for a job to train on."""
        return self._upload({"corpus_id": corpus_id, "name": name}, {"queries": queries},
                            on_progress)

    def delete(self, id: str) -> None:
        """Delete a query set (409 `in_use` while a job that uses it has not finished)."""
        self._delete(id)


class Jobs(Collection[Job]):
    path = "/v1/jobs"

    def create(
        self,
        corpus_id: str,
        *,
        base_model: str | None = None,
        preset: str | None = None,
        eval_set_id: str | None = None,
        query_set_id: str | None = None,
        teacher: str | None = None,
        generator: str | None = None,
        query_types: Sequence[str] | None = None,
        passages: int | None = None,
        loss: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        name: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Job:
        """Start a job; unset options take the server's (preset's) defaults. An
        Idempotency-Key is made for you and sent with every retry of this call, so a retry
        after a lost answer returns the same job instead of starting a second one."""
        body = {
            "corpus_id": corpus_id,
            "base_model": base_model,
            "preset": preset,
            "eval_set_id": eval_set_id,
            "query_set_id": query_set_id,
            "teacher": teacher,
            "generator": generator,
            "query_types": list(query_types) if query_types is not None else None,
            "passages": passages,
            "loss": loss,
            "hyperparameters": hyperparameters,
            "name": name,
            "metadata": metadata,
        }
        key = idempotency_key or str(uuid.uuid4())
        return self._transport.json(
            "POST",
            self.path,
            json={k: v for k, v in body.items() if v is not None},
            headers={"Idempotency-Key": key},
        )

    def update(
        self, id: str, *, name: str | None = None, metadata: dict[str, str] | None = None
    ) -> Job:
        """Rename a job or replace its metadata (a whole set; `{}` clears it)."""
        return self._update(id, {"name": name, "metadata": metadata})

    def delete(self, id: str) -> None:
        """Delete a job (cancelled first if it has not finished) with its stored outputs; the
        model it tuned stays."""
        self._delete(id)

    def cancel(self, id: str) -> Job:
        """Ask a job to stop: a queued job stops at once, a running one within seconds.
        A job already cancelled is returned as it is (a retry whose first try was answered
        but lost lands here); one that succeeded or failed raises ConflictError."""
        try:
            return self._transport.json("POST", f"{self.path}/{id}/cancel")
        except ConflictError as exc:
            if exc.context.get("status") != "cancelled":
                raise
        return self.get(id)

    def report(self, id: str) -> Report:
        """The evaluation report of a succeeded job (409 `invalid_state` before that)."""
        return self._transport.json("GET", f"{self.path}/{id}/report")

    def events(self, id: str, *, after: int | None = None, limit: int = 100) -> Page[JobEvent]:
        """Events with an id above `after`, oldest first; `count` is the job's total."""
        return self._transport.json(
            "GET", f"{self.path}/{id}/events", params={"after": after, "limit": limit}
        )

    def iter_events(self, id: str, *, after: int | None = None) -> Iterator[JobEvent]:
        """Every event after `after` recorded so far, oldest first."""
        while True:
            page = self.events(id, after=after, limit=MAX_EVENT_PAGE)
            yield from page["data"]
            if len(page["data"]) < MAX_EVENT_PAGE:
                return
            after = page["data"][-1]["id"]

    def watch(
        self, id: str, *, poll_interval: float = 1.0, after: int | None = None
    ) -> Iterator[tuple[Job, list[JobEvent]]]:
        """Poll a job until it finishes: yields (job, events new since the last poll). The
        job is read before its events, so the last poll carries every event of the job."""
        while True:
            job = self.get(id)
            new = list(self.iter_events(id, after=after))
            if new:
                after = new[-1]["id"]
            yield job, new
            if job["status"] in FINISHED_STATUSES:
                return
            time.sleep(poll_interval)

    def wait(
        self,
        id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> Job:
        """Block until the job has succeeded, failed or been cancelled; returns it (check
        `status`). Raises WaitTimeout after `timeout` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job, events in self.watch(id, poll_interval=poll_interval):
            for event in events:
                if on_event:
                    on_event(event)
            if job["status"] in FINISHED_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {id} is still {job['status']} after {timeout} s")
        raise AssertionError("unreachable: watch ends with a finished job")


class Models(Collection[Model]):
    """Base models on offer (by name) and the tenant's tuned models (`mdl_...`)."""

    path = "/v1/models"

    def update(
        self, id: str, *, name: str | None = None, metadata: dict[str, str] | None = None
    ) -> Model:
        """Rename one of your models or replace its metadata (a whole set; `{}` clears it)."""
        return self._update(id, {"name": name, "metadata": metadata})

    def delete(self, id: str) -> None:
        """Delete one of your models (409 `in_use` while a job that uses it has not
        finished)."""
        self._delete(id)

    def download_archive(
        self, id: str, path: str | Path, *, on_progress: ProgressFn | None = None
    ) -> Path:
        """Save a tuned model's .tar.gz as `path`; returns it."""
        from tailor_client.download import save_stream

        with self._transport.stream("GET", f"{self.path}/{id}/download") as response:
            return save_stream(response, Path(path), on_progress)

    def download(
        self, id: str, directory: str | Path, *, on_progress: ProgressFn | None = None
    ) -> Path:
        """Download a tuned model and unpack it as `directory` (which must not exist or be
        empty), ready for `SentenceTransformer(directory)`; returns the folder."""
        from tailor_client.download import unpacked_into

        with unpacked_into(Path(directory)) as archive:
            self.download_archive(id, archive, on_progress=on_progress)
        return Path(directory)
