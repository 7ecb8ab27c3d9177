"""The micro-batcher: concurrent requests share batches, each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.embeddings.batching import Batcher, Overloaded


class Recorder:
    """A runner that remembers every batch it ran; row = [payload, batch number]."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, payloads: list[int]) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.batches.append(list(payloads))
        return np.array([[p, len(self.batches)] for p in payloads], dtype=np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    batcher = Batcher(token_budget=10_000, max_wait_s=0.05)
    runner = Recorder()

    async def main() -> list[np.ndarray]:
        requests = [batcher.run("m", runner, [i * 10 + j for j in range(i % 3 + 1)],
                                [5] * (i % 3 + 1)) for i in range(32)]
        return await asyncio.gather(*requests)

    results = asyncio.run(main())
    batcher.close()
    for i, rows in enumerate(results):
        assert rows[:, 0].tolist() == [i * 10 + j for j in range(i % 3 + 1)]
    assert len(runner.batches) < 32 / 4  # shared batches, not one per request
    assert runner.threads == {"encoder-0"}  # never on the event loop


def test_a_window_is_length_sorted_and_cut_at_the_token_budget() -> None:
    batcher = Batcher(token_budget=100, max_wait_s=0.0)
    from app.embeddings.batching import _Row

    rows = [_Row(None, i, cost) for i, cost in enumerate([5, 40, 10, 30, 45, 5])]  # type: ignore[arg-type]
    batches = batcher.split(rows)
    costs = [[row.cost for row in batch] for batch in batches]
    assert costs == [[45, 40], [30, 10, 5], [5]]
    assert all(len(b) * b[0].cost <= 100 for b in batches)


def test_a_large_request_does_not_hold_back_small_ones_behind_it() -> None:
    batcher = Batcher(token_budget=40, max_wait_s=0.02)
    runner = Recorder(delay=0.01)
    order: list[str] = []

    async def main() -> None:
        async def tagged(name: str, payloads: list[int]) -> None:
            await batcher.run("m", runner, payloads, [10] * len(payloads))
            order.append(name)

        big = asyncio.create_task(tagged("big", list(range(100, 140))))
        await asyncio.sleep(0)  # the big request is queued first
        await asyncio.gather(big, tagged("small", [1]))

    asyncio.run(main())
    batcher.close()
    assert order == ["small", "big"]
    # It rode in the first window or, had the encoder started before it was queued, the next.
    assert 1 in runner.batches[0] + runner.batches[1]


def test_a_failing_batch_fails_its_requests_and_the_encoder_goes_on() -> None:
    batcher = Batcher(token_budget=1_000, max_wait_s=0.0)

    def runner(payloads: list[int]) -> np.ndarray:
        if -1 in payloads:
            raise RuntimeError("bad input")
        return np.array([[p] for p in payloads], dtype=np.float32)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="bad input"):
            await batcher.run("m", runner, [-1], [1])
        assert (await batcher.run("m", runner, [7], [1]))[0, 0] == 7

    asyncio.run(main())
    batcher.close()


def test_a_full_queue_refuses_new_requests() -> None:
    batcher = Batcher(token_budget=10, max_wait_s=0.0, max_queued_rows=4)
    started = threading.Event()
    release = threading.Event()

    def runner(payloads: list[int]) -> np.ndarray:
        started.set()
        release.wait(5)
        return np.zeros((len(payloads), 1), dtype=np.float32)

    async def main() -> None:
        first = asyncio.create_task(batcher.run("m", runner, [1], [10]))
        while not started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.run("m", runner, [1, 2, 3], [10, 10, 10]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.run("m", runner, [1, 2], [10, 10])
        release.set()
        await asyncio.gather(first, queued)

    asyncio.run(main())
    batcher.close()


def test_a_fitted_cost_model_cuts_a_window_into_batches_of_similar_length() -> None:
    from app.embeddings.batching import CostModel, _Row

    model = CostModel()
    assert model.overhead_tokens() is None  # no fit before enough batches
    for tokens in (64, 128, 256, 512, 1024, 96, 300, 700):
        model.add(tokens, 0.004 + tokens * 0.0001)  # 4 ms a batch, 0.1 ms a token
    assert model.overhead_tokens() == pytest.approx(40, rel=1e-6)

    batcher = Batcher(token_budget=8192, max_wait_s=0.0)
    costs = [60, 58, 12, 10, 11, 9, 10, 12, 11, 10, 9, 12]
    rows = [_Row(None, i, cost) for i, cost in enumerate(costs)]  # type: ignore[arg-type]
    padded_one = len(rows) * max(costs)
    cut = [[row.cost for row in batch] for batch in batcher.split(rows, 40)]
    assert cut == [[60, 58], [12, 12, 12, 11, 11, 10, 10, 10, 9, 9]]
    assert sorted(c for batch in cut for c in batch) == sorted(costs)
    padded = sum(len(batch) * batch[0] for batch in cut)
    assert padded + 40 * len(cut) < padded_one + 40  # cheaper than one padded batch
    # A fixed cost that outweighs the padding keeps the window in one batch.
    assert len(batcher.split(rows, 10_000)) == 1
    # The token budget still bounds every batch.
    small = Batcher(token_budget=100, max_wait_s=0.0)
    assert all(len(b) * b[0].cost <= 100 for b in small.split(rows, 40))


def test_the_encoders_fit_the_cost_model_as_they_run() -> None:
    batcher = Batcher(token_budget=1_000, max_wait_s=0.0)

    def runner(payloads: list[int]) -> np.ndarray:
        time.sleep(0.002 + 0.00005 * len(payloads) * max(payloads))
        return np.array([[p] for p in payloads], dtype=np.float32)

    async def main() -> None:
        for n in range(1, 13):
            rows = [5 * n] * n
            got = await batcher.run("m", runner, rows, rows)
            assert got[:, 0].tolist() == rows

    asyncio.run(main())
    batcher.close()
    overhead = batcher._queues["m"].cost.overhead_tokens()
    assert overhead is not None and 10 < overhead < 200  # about 2 ms / 0.05 ms = 40 tokens


def test_a_cpu_server_runs_one_encoder_per_core_with_the_cores_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    import torch

    from app.embeddings.service import default_encoders
    from ml_core import student

    if torch.cuda.is_available():
        pytest.skip("the CPU default")
    monkeypatch.delenv("TAILOR_TORCH_THREADS", raising=False)
    monkeypatch.setattr(student, "_THREADS", None)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert default_encoders() == 2 and torch.get_num_threads() == 1
        student.configure_threads()  # a model loaded later keeps the server's share
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        assert default_encoders() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("TAILOR_TORCH_THREADS", "3")  # the operator's word wins
        assert student.configure_threads() == 3
    finally:
        torch.set_num_threads(before)
