"""Dynamic batching across requests: the rows of concurrent requests share micro-batches.

Many small concurrent requests (a search application embedding one query per call) each ran
their own forward pass, up to one per request at once on two cores. Here every request's rows
(its inputs, already tokenized) join the queue of their model; a bounded pool of encoder threads
takes rows from the queue into a window of at most `token_budget` tokens, fairly across the
requests waiting (one row of each in turn, so a 2,048-input request does not hold back the
single queries that arrive after it), sorts the window by length and runs it as batches whose
padded size stays within the budget, cut where a cost model fitted to the batches already run
(a fixed cost per batch plus a cost per padded token) says the window is cheapest. An idle
encoder waits at most `max_wait_s` for more rows before running a small batch; a busy one finds
its next window already gathered.

Each request gets its own rows back in its own order through an asyncio future; the event loop
never runs a forward pass. The same queue serves any model: a `Runner` turns a list of payloads
(token ids, or (query, document) pairs for a reranker) into one float32 row each.
The design follows the batch handler of Infinity (github.com/michaelfeil/infinity): a
length-sorted queue in front of model threads, with results handed back to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.metrics import observe_batch

log = logging.getLogger(__name__)

Runner = Callable[[list[Any]], np.ndarray]


class Overloaded(RuntimeError):
    """More rows are queued than the batcher accepts; the request was not queued."""


@dataclass(eq=False)
class _Request:
    """One request's rows and where its answer goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    payloads: Sequence[Any]
    costs: Sequence[int]
    arrived: float = field(default_factory=time.monotonic)
    rows: np.ndarray | None = None
    next_row: int = 0  # rows before this one have been taken into a window
    remaining: int = 0  # rows not computed yet
    failed: bool = False

    def resolve(self, error: BaseException | None = None) -> None:
        def _set() -> None:
            if self.future.done():  # the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(self.rows)  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(_set)


@dataclass(eq=False)
class _Queue:
    """The requests waiting for one model."""

    runner: Runner
    requests: deque[_Request] = field(default_factory=deque)
    queued_tokens: int = 0
    queued_rows: int = 0
    cost: CostModel = field(default_factory=lambda: CostModel())

    @property
    def oldest(self) -> float:
        """When the request waiting longest arrived (monotonic seconds)."""
        return self.requests[0].arrived


class CostModel:
    """What a batch of this model costs here: seconds = overhead + per_token x padded tokens,
    fitted by least squares to the batches run lately (so it follows the hardware: a GPU's
    overhead is worth thousands of tokens, a CPU's a few dozen)."""

    def __init__(self, samples: int = 64, minimum: int = 8) -> None:
        self.minimum = minimum
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)

    def add(self, padded_tokens: int, seconds: float) -> None:
        self._samples.append((float(padded_tokens), seconds))

    def overhead_tokens(self) -> float | None:
        """A batch's fixed cost in tokens (overhead / per_token); None until the fit is sound."""
        n = len(self._samples)
        if n < self.minimum:
            return None
        mean_x = sum(x for x, _ in self._samples) / n
        mean_y = sum(y for _, y in self._samples) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in self._samples)
        if sxx <= 0:
            return None
        per_token = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / sxx
        overhead = mean_y - per_token * mean_x
        if per_token <= 0 or overhead < 0:
            return None
        return overhead / per_token


@dataclass(frozen=True)
class _Row:
    request: _Request
    index: int
    cost: int


class Batcher:
    """Micro-batches the rows of concurrent requests per model on `encoders` threads.

    `token_budget` bounds a batch's padded size (rows x longest row); `max_wait_s` is how long
    an idle encoder waits for company before running a batch; `max_queued_rows` refuses new
    requests (Overloaded) rather than let the queue grow without bound.
    """

    def __init__(self, token_budget: int, max_wait_s: float, encoders: int = 1,
                 max_queued_rows: int = 65_536, name: str = "encoder") -> None:
        if token_budget < 1 or encoders < 1:
            raise ValueError("token_budget and encoders must be at least 1")
        self.token_budget = token_budget
        self.max_wait_s = max_wait_s
        self.max_queued_rows = max_queued_rows
        self._queues: dict[Hashable, _Queue] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(encoders)
        ]
        self._started = False
        # Counters for tests and diagnostics: batches run and rows in them.
        self.batches = 0
        self.batched_rows = 0

    # -- the event loop's side -------------------------------------------------------------------

    async def run(self, key: Hashable, runner: Runner, payloads: Sequence[Any],
                  costs: Sequence[int]) -> np.ndarray:
        """float32 [len(payloads), dim]: `runner`'s rows for `payloads`, batched with the rows of
        other requests for the same `key` (a model). `costs` are the payloads' token counts."""
        if not payloads:
            raise ValueError("nothing to run")
        loop = asyncio.get_running_loop()
        request = _Request(loop=loop, future=loop.create_future(), payloads=payloads,
                           costs=costs, remaining=len(payloads))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(runner=runner)
            if queue.queued_rows and queue.queued_rows + len(payloads) > self.max_queued_rows:
                raise Overloaded(f"{queue.queued_rows} inputs are waiting for this model")
            queue.runner = runner  # the newest load of the model, should it have been reloaded
            queue.requests.append(request)
            queue.queued_tokens += sum(costs)
            queue.queued_rows += len(payloads)
            if not self._started:
                self._started = True
                for thread in self._threads:
                    thread.start()
            self._cond.notify()
        return await request.future

    def close(self) -> None:
        """Stop the encoder threads once the queued rows have run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    # -- the encoders' side ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            queue, window = taken
            for batch in self.split(window, queue.cost.overhead_tokens()):
                self._run(queue, batch)

    def _take(self) -> tuple[_Queue, list[_Row]] | None:
        """Wait for rows, then take a window of them from the queue waiting longest."""
        with self._cond:
            while True:
                waiting = [q for q in self._queues.values() if q.requests]
                if not waiting:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                queue = min(waiting, key=lambda q: q.oldest)
                # Wait for more rows while the window is not full and the oldest row is young.
                delay = queue.oldest + self.max_wait_s - time.monotonic()
                if queue.queued_tokens < self.token_budget and delay > 0 and not self._closed:
                    self._cond.wait(delay)
                    continue
                return queue, self._window(queue)

    def _window(self, queue: _Queue) -> list[_Row]:
        """Rows up to the token budget, one from each waiting request in turn (fairness)."""
        window: list[_Row] = []
        tokens = 0
        while queue.requests and (not window or tokens < self.token_budget):
            for request in list(queue.requests):
                index = request.next_row
                cost = request.costs[index]
                if window and tokens + cost > self.token_budget:
                    break
                window.append(_Row(request, index, cost))
                tokens += cost
                request.next_row += 1
                if request.next_row == len(request.payloads):
                    queue.requests.remove(request)
            else:
                continue
            break
        queue.queued_tokens -= tokens
        queue.queued_rows -= len(window)
        return window

    def split(self, window: list[_Row], overhead_tokens: float | None = None
              ) -> list[list[_Row]]:
        """The window sorted by length (longest first) and cut into batches whose padded size
        (rows x longest row) stays within the token budget.

        Without `overhead_tokens` (a batch's fixed cost in tokens) each batch takes rows while
        they fit. With it, the cut minimises overhead x batches + padded tokens: 32 queries of
        7 to 60 tokens run as a few batches of similar length, not as one padded to 60."""
        ordered = sorted(window, key=lambda row: -row.cost)
        if overhead_tokens is None:
            batches: list[list[_Row]] = []
            for row in ordered:
                if batches and (len(batches[-1]) + 1) * max(batches[-1][0].cost, 1) \
                        <= self.token_budget:
                    batches[-1].append(row)
                else:
                    batches.append([row])
            return batches
        # Rows of one length stay together; best[j]: the cheapest cut of the first j groups.
        bounds = [0] + [i for i in range(1, len(ordered))
                        if ordered[i].cost != ordered[i - 1].cost] + [len(ordered)]
        groups = len(bounds) - 1
        best = [0.0] + [float("inf")] * groups
        start = [0] * (groups + 1)
        for j in range(1, groups + 1):
            for i in range(j):
                width = max(ordered[bounds[i]].cost, 1)
                rows = bounds[j] - bounds[i]
                per_batch = max(1, self.token_budget // width)
                cost = best[i] + -(-rows // per_batch) * overhead_tokens + rows * width
                if cost < best[j]:
                    best[j], start[j] = cost, i
        segments = []
        j = groups
        while j > 0:
            segments.append((bounds[start[j]], bounds[j]))
            j = start[j]
        batches = []
        for low, high in reversed(segments):
            per_batch = max(1, self.token_budget // max(ordered[low].cost, 1))
            batches.extend(ordered[k:min(k + per_batch, high)]
                           for k in range(low, high, per_batch))
        return batches

    def _run(self, queue: _Queue, batch: list[_Row]) -> None:
        live = [row for row in batch if not row.request.failed]
        if not live:
            return
        padded = len(live) * max(row.cost for row in live)
        try:
            began = time.perf_counter()
            vectors = np.asarray(queue.runner([row.request.payloads[row.index] for row in live]),
                                 dtype=np.float32)
            queue.cost.add(padded, time.perf_counter() - began)
        except BaseException as exc:  # the requests in this batch fail, the encoder goes on
            log.exception("a batch of %d inputs failed", len(live))
            with self._cond:
                failed = {row.request for row in live if not row.request.failed}
                for request in failed:
                    request.failed = True
            for request in failed:
                request.resolve(exc)
            return
        observe_batch(len(live), padded)
        done: list[_Request] = []
        with self._cond:
            self.batches += 1
            self.batched_rows += len(live)
            for row, vector in zip(live, vectors, strict=True):
                request = row.request
                if request.failed:
                    continue
                if request.rows is None:
                    request.rows = np.empty((len(request.payloads), vector.shape[-1]),
                                            dtype=np.float32)
                request.rows[row.index] = vector
                request.remaining -= 1
                if request.remaining == 0:
                    done.append(request)
        for request in done:
            request.resolve()
