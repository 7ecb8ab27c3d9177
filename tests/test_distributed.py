"""Two CPU processes (gloo) give the same gradients and parameter update as one process.

One pair of processes runs both checks: GradCache gradients on a tiny BERT, and one full
train_student step of the tiny student. The processes are forked, not spawned: spawned ones
re-import torch and transformers (tens of seconds on a busy 2-core machine); each child uses one
thread, so the parent's OpenMP pool is never touched after the fork.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ml_core.config import TrainingConfig
from ml_core.gradcache import GradCache, all_reduce_gradients
from ml_core.losses import DistillationObjective
from ml_core.training import STATE_FILE, train_student
from tests import test_gradcache as gc
from tests import test_training as tt
from tests.test_training import _one_thread  # noqa: F401  (autouse fixture)

WORLD = 2
# One optimizer step: the whole training set is one global batch, split over the two ranks.
# fp32: the claim is equality to 1e-5, and bf16 rounds matrix products by their shapes, which
# differ between one process's batch and two ranks' shards.
CFG = tt.CFG.model_copy(update={"batch_size": 8, "max_epochs": 1, "precision": "fp32"})


def _gradcache_grads(model: torch.nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Each rank encodes a contiguous shard of test_gradcache's batch; grads summed over ranks."""
    batch = gc._batch()
    per_rank = gc.BATCH // world
    queries = batch["queries"][rank * per_rank : (rank + 1) * per_rank]
    passages = batch["passages"].view(gc.BATCH, gc.LIST_SIZE, -1)[
        rank * per_rank : (rank + 1) * per_rank
    ]
    encode = gc._encoder(model)
    model.zero_grad()
    GradCache(DistillationObjective(TrainingConfig())).step(
        [
            (encode, queries.split(gc.MICRO)),
            (encode, passages.reshape(-1, passages.shape[-1]).split(gc.MICRO * gc.LIST_SIZE)),
        ],
        teacher_scores=batch["teacher"],
        passage_ids=batch["ids"],
    )
    all_reduce_gradients(model.parameters())
    return gc._grads(model)


def _worker(rank: int, rendezvous: str, model_store: Path, out: Path) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        grads = _gradcache_grads(gc._tiny_bert(dropout=0.0), rank, WORLD)
        if rank == 0:
            torch.save(grads, out / "grads.pt")
        train = tt._lists()[:8]
        train_student(
            tt._student(model_store, "cpu"),  # gloo ranks on the CPU, also on a GPU host
            train,
            train[:4],
            tt._passages(),
            tt._queries(),
            CFG,
            out / "distributed",
            seed=3,
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(model_store: Path, tmp_path: Path) -> None:
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "rendezvous"), model_store, tmp_path),
        nprocs=WORLD,
        # fork is fast, but a child forked after this process used CUDA cannot touch CUDA,
        # which torch's optimizers do even for CPU tensors (a graph-capture check).
        start_method="spawn" if torch.cuda.is_initialized() else "fork",
    )

    single_grads = gc._cached_grads(gc._tiny_bert(dropout=0.0), gc._batch())
    assert gc._max_abs_diff(torch.load(tmp_path / "grads.pt"), single_grads) < 1e-5

    train = tt._lists()[:8]
    base = tt._weights(tt._student(model_store, "cpu"))
    single = train_student(
        tt._student(model_store, "cpu"),
        train,
        train[:4],
        tt._passages(),
        tt._queries(),
        CFG,
        tmp_path / "single",
        seed=3,
    )
    assert single.steps == 1
    one = torch.load(tmp_path / "single" / "state" / STATE_FILE, weights_only=True)
    two = torch.load(tmp_path / "distributed" / "state" / STATE_FILE, weights_only=True)
    assert max((one["model"][k] - base[k]).abs().max().item() for k in base) > 1e-4  # it moved
    assert max((one["model"][k] - two["model"][k]).abs().max().item() for k in base) < 1e-5
    # The dev loss every rank computes on gathered reps is the single-process dev loss.
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["dev_loss"] - b["dev_loss"]) < 1e-5
