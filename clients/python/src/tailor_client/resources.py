"""One class per API collection. A collection route is a few lines: subclass `Collection` with
its path and item type for list / iterate / get, and add the routes it has beyond those."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from tailor_client.errors import ConflictError, TailorError
from tailor_client.transport import Retry, Transport
from tailor_client.types import (
    FINISHED_STATUSES,
    ApiKey,
    ApiKeyCreated,
    Corpus,
    EmbeddingFileList,
    EmbeddingJob,
    EvalSet,
    InputType,
    Job,
    JobEvent,
    KeyScope,
    Model,
    Page,
    QuerySet,
    Report,
)
from tailor_client.uploads import ProgressFn, open_upload

T = TypeVar("T")
R = TypeVar("R")

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
        return self._paged(lambda offset, limit: self.list(offset=offset, limit=limit),
                           page_size)

    @staticmethod
    def _paged(fetch: Callable[[int, int], Page[Any]], page_size: int) -> Iterator[Any]:
        """Walk an offset-paginated list: `fetch(offset, limit)` returns one page."""
        seen: set[str] = set()
        offset = 0
        while True:
            page = fetch(offset, page_size)
            for item in page["data"]:
                key = item.get("id")
                if key not in seen:
                    seen.add(key)
                    yield item
            offset += len(page["data"])
            if not page["data"] or offset >= page["count"]:
                return

    def get(self, id: str) -> T:
        """One item by id."""
        return self._transport.json("GET", f"{self.path}/{id}")

    def _delete(self, id: str) -> None:
        self._transport.request("DELETE", f"{self.path}/{id}")

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


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # an argument not given, where None means something (clear the name)


class Labelled(Collection[T]):
    """A collection whose items carry your `name` and `metadata` (up to 16 string pairs):
    lists filter on them, `update` changes them."""

    def list(self, *, offset: int = 0, limit: int = 20, name: str | None = None,
             metadata: Mapping[str, str] | None = None) -> Page[T]:
        """One page, newest first; only items named `name` and holding every pair of
        `metadata`, when given."""
        params: dict[str, Any] = {"offset": offset, "limit": limit, "name": name}
        params.update({f"metadata[{k}]": v for k, v in (metadata or {}).items()})
        return self._transport.json("GET", self.path, params=params)

    def iter(self, *, page_size: int = MAX_PAGE, name: str | None = None,
             metadata: Mapping[str, str] | None = None) -> Iterator[T]:
        """Every (matching) item, page by page, each once."""
        return self._paged(lambda offset, limit: self.list(
            offset=offset, limit=limit, name=name, metadata=metadata), page_size)

    def filter(self, *, name: str | None = None, metadata: Mapping[str, str] | None = None,
               offset: int = 0, limit: int = 20) -> Page[T]:
        """`list` with its filters first: one page of the items named `name` and holding
        every pair of `metadata`."""
        return self.list(offset=offset, limit=limit, name=name, metadata=metadata)

    def update(self, id: str, *, name: str | None = UNSET,
               metadata: Mapping[str, str] | None = UNSET) -> T:
        """Rename it or replace its metadata; what is not given stays. `metadata={}` clears
        the pairs (a job's `name=None` clears its name)."""
        body: dict[str, Any] = {}
        if name is not UNSET:
            body["name"] = name
        if metadata is not UNSET:
            body["metadata"] = dict(metadata) if metadata is not None else None
        return self._transport.json("PATCH", f"{self.path}/{id}", json=body)

    def delete(self, id: str) -> None:
        self._delete(id)


class Corpora(Collection[Corpus]):
    path = "/v1/corpora"

    def upload(
        self, file: str | Path, *, name: str | None = None, on_progress: ProgressFn | None = None
    ) -> Corpus:
        """Upload a BEIR corpus (JSON lines, plain or .gz); the server validates every line."""
        return self._upload({"name": name}, {"file": file}, on_progress)

    def delete(self, id: str, *, cascade: bool = False) -> None:
        """Delete a corpus and the eval and query sets built on it (409 `in_use`, naming
        them in `context["job_ids"]`, while a job that uses it has not finished; with
        `cascade=True` those jobs are cancelled instead). Finished jobs and their models
        stay."""
        self._transport.request("DELETE", f"{self.path}/{id}",
                                params={"cascade": "true"} if cascade else None)


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


class Runs(Collection[R]):
    """A collection of runs on the workers (training jobs, bulk embedding jobs): events by
    cursor, cancel, and following one to its end."""

    def cancel(self, id: str) -> R:
        """Ask a job to stop: a queued job stops at once, a running one within seconds.
        A job already cancelled is returned as it is (a retry whose first try was answered
        but lost lands here); one that succeeded or failed raises ConflictError."""
        try:
            return self._transport.json("POST", f"{self.path}/{id}/cancel")
        except ConflictError as exc:
            if exc.context.get("status") != "cancelled":
                raise
        return self.get(id)

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
    ) -> Iterator[tuple[R, list[JobEvent]]]:
        """Poll a job until it finishes: yields (job, events new since the last poll). The
        job is read before its events, so the last poll carries every event of the job."""
        while True:
            job = self.get(id)
            new = list(self.iter_events(id, after=after))
            if new:
                after = new[-1]["id"]
            yield job, new
            if job["status"] in FINISHED_STATUSES:  # type: ignore[index]
                return
            time.sleep(poll_interval)

    def wait(
        self,
        id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> R:
        """Block until the job has succeeded, failed or been cancelled; returns it (check
        `status`). Raises WaitTimeout after `timeout` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job, events in self.watch(id, poll_interval=poll_interval):
            for event in events:
                if on_event:
                    on_event(event)
            status = job["status"]  # type: ignore[index]
            if status in FINISHED_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {id} is still {status} after {timeout} s")
        raise AssertionError("unreachable: watch ends with a finished job")


class Jobs(Runs[Job], Labelled[Job]):
    """Training jobs: specialize a base model to a corpus. `delete` cancels one that has not
    finished and removes its outputs; the tuned model it made stays."""

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
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
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
            "metadata": dict(metadata) if metadata is not None else None,
        }
        key = idempotency_key or str(uuid.uuid4())
        return self._transport.json(
            "POST",
            self.path,
            json={k: v for k, v in body.items() if v is not None},
            headers={"Idempotency-Key": key},
        )

    def report(self, id: str) -> Report:
        """The evaluation report of a succeeded job (409 `invalid_state` before that)."""
        return self._transport.json("GET", f"{self.path}/{id}/report")

    def report_html(self, id: str, path: str | Path | None = None) -> str:
        """The report as a self-contained HTML page (no scripts, nothing fetched); also
        written to `path` when given."""
        page = self._transport.request("GET", f"{self.path}/{id}/report.html").text
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


class EmbeddingJobs(Runs[EmbeddingJob], Labelled[EmbeddingJob]):
    """Bulk embedding jobs: a stored corpus embedded on the workers, stored as shards
    (float32 .npy vectors plus the rows' ids as JSON lines) to list and download."""

    path = "/v1/embedding-jobs"

    def create(
        self,
        model: str,
        corpus_id: str | None = None,
        *,
        input_type: InputType | None = None,
        long_documents: Literal["chunk", "truncate"] | None = None,
        shard_documents: int | None = None,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> EmbeddingJob:
        """Embed a corpus with a base model (name) or your own (`mdl_...`); `corpus_id` may
        be left out for a tuned model (the corpus it was tuned on). The server takes no
        Idempotency-Key here, so a failed create is sent again only when the server cannot
        have acted on it (429, 503, no connection)."""
        body = {"model": model, "corpus_id": corpus_id, "input_type": input_type,
                "long_documents": long_documents, "shard_documents": shard_documents,
                "name": name, "metadata": dict(metadata) if metadata is not None else None}
        return self._transport.json("POST", self.path, retry=Retry.UNSAFE,
                                    json={k: v for k, v in body.items() if v is not None})

    def files(self, id: str) -> EmbeddingFileList:
        """The files stored so far, manifest first (finished shards appear while it runs)."""
        return self._transport.json("GET", f"{self.path}/{id}/files")

    def download_file(
        self, id: str, name: str, path: str | Path, *, on_progress: ProgressFn | None = None
    ) -> Path:
        """Save one stored file (`manifest.json`, `vectors-<k>.npy`, `ids-<k>.jsonl`) as
        `path`; returns it."""
        from tailor_client.download import save_stream

        with self._transport.stream("GET", f"{self.path}/{id}/files/{name}") as response:
            return save_stream(response, Path(path), on_progress)

    def download_archive(
        self, id: str, path: str | Path, *, on_progress: ProgressFn | None = None
    ) -> Path:
        """Save a succeeded job's files as one .tar (409 `invalid_state` before); returns it."""
        from tailor_client.download import save_stream

        with self._transport.stream("GET", f"{self.path}/{id}/download") as response:
            return save_stream(response, Path(path), on_progress)

    def download(
        self, id: str, directory: str | Path, *, on_progress: ProgressFn | None = None
    ) -> Path:
        """Download a succeeded job's manifest, vectors and ids unpacked as `directory`
        (which must not exist or be empty); returns the folder."""
        from tailor_client.download import unpacked_into

        with unpacked_into(Path(directory)) as archive:
            self.download_archive(id, archive, on_progress=on_progress)
        return Path(directory)

    def delete(self, id: str) -> None:
        """Delete a bulk embedding job and its stored vectors (one not finished is cancelled
        first)."""
        self._delete(id)


class ApiKeys(Collection[ApiKey]):
    """The tenant's API keys (a `train` key manages them)."""

    path = "/v1/api-keys"

    def create(
        self,
        name: str = "",
        *,
        scope: KeyScope = "train",
        expires_in_days: int | None = None,
    ) -> ApiKeyCreated:
        """A new key; its secret (`key`) is in this answer only. Not sent again after an
        error the server may have acted on: a key made twice would be one nobody holds."""
        body = {"name": name, "scope": scope, "expires_in_days": expires_in_days}
        return self._transport.json("POST", self.path, retry=Retry.UNSAFE,
                                    json={k: v for k, v in body.items() if v is not None})

    def revoke(self, id: str) -> None:
        """Revoke a key: it stops working within seconds on every API process. Revoking a
        revoked key changes nothing."""
        self._delete(id)


class Models(Labelled[Model]):
    """Base models on offer (by name) and the tenant's own (`mdl_...`, tuned or uploaded);
    `update` renames yours or replaces their metadata, `delete` removes one (409 `in_use`
    while a job that uses it has not finished)."""

    path = "/v1/models"

    def upload(
        self, file: str | Path, *, name: str | None = None, on_progress: ProgressFn | None = None
    ) -> Model:
        """Upload your own base model: a sentence-transformers folder as .tar.gz. The server
        checks it (safe archive, safetensors weights, a test encode) before accepting it; its
        `mdl_` id then embeds, bulk-embeds and serves as a job's `base_model`."""
        return self._upload({"name": name}, {"file": file}, on_progress)

    def download_archive(
        self, id: str, path: str | Path, *, onnx: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> Path:
        """Save one of your models (tuned or uploaded) as a .tar.gz at `path`; returns it.
        `onnx=True` adds `onnx/model.onnx`, an ONNX export with the same vectors (the server
        builds it on the first request: seconds)."""
        from tailor_client.download import save_stream

        params = {"onnx": "true"} if onnx else None
        with self._transport.stream("GET", f"{self.path}/{id}/download",
                                    params=params) as response:
            return save_stream(response, Path(path), on_progress)

    def download(
        self, id: str, directory: str | Path, *, onnx: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> Path:
        """Download one of your models (tuned or uploaded) and unpack it as `directory`
        (which must not exist or be empty), ready for `SentenceTransformer(directory)`;
        returns the folder."""
        from tailor_client.download import unpacked_into

        with unpacked_into(Path(directory)) as archive:
            self.download_archive(id, archive, onnx=onnx, on_progress=on_progress)
        return Path(directory)
