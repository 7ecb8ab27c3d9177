"""Gradient caching: exact large-batch contrastive gradients with the memory of one chunk.

Reference: Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup" (RepL4NLP, arXiv 2101.06983). Our own implementation of its three steps:

1. Encode every chunk without a graph and keep only the representations ("reps").
2. Turn the reps into leaf tensors, compute the loss on the whole batch, and backpropagate to get
   d loss / d reps. The loss sees every in-batch negative, as with one huge batch.
3. Re-encode each chunk with a graph and backpropagate the cached d loss / d reps through it
   (`torch.autograd.backward(reps, grad)`), accumulating the parameter gradients chunk by chunk.

Step 3 must reproduce step 1 exactly, so the RNG state before each chunk's first forward is
captured and replayed for its second one (dropout draws the same masks).

Across torch.distributed ranks each rank encodes only its own chunks; the reps are all-gathered
(rank order) so every rank computes the same loss on the global batch, and the gather's backward
hands each rank the gradient of its own slice. Each rank's parameter gradients are then its share
of the global gradient, and the shares are SUMMED with `all_reduce_gradients` (not averaged). We
do not wrap the model in DistributedDataParallel: DDP would all-reduce after every chunk's
backward and average. (To use DDP instead, run the chunks under `no_sync()` but the last and
multiply the loss by the world size, which turns DDP's average back into the sum.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

Encoder = Callable[[Any], Tensor]
# One kind of input encoded chunk by chunk, e.g. (encode queries, [query chunk, ...]).
Stream = tuple[Encoder, Sequence[Any]]
LossOutput = Tensor | Mapping[str, Tensor]


def distributed_world() -> tuple[int, int]:
    """Returns (rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _RngState:
    """The CPU (and CUDA) generator states before a chunk's first forward pass."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        # CUDA's generators matter only once this process uses CUDA (a model on the GPU has
        # initialised it). Reading them otherwise would initialise CUDA: wasted on a CPU rank, and
        # fatal in a process forked from one that had used CUDA (seen on a GPU host).
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []

    @contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng restores the outer state afterwards, so the replay does not disturb the RNG
        # stream the rest of training sees: the step consumes it exactly as the first pass did.
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class _GatherRanks(torch.autograd.Function):
    """All-gather rows from every rank (rank order); backward returns this rank's slice only.

    Every rank computes the same loss on the gathered batch, so the gradient a rank's own loss
    gives its own slice is already the full d loss / d local reps: no reduction is needed here.
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor, sizes: list[int], rank: int) -> Tensor:
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local  # all_gather needs equal shapes; shards may differ by one
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.start = sum(sizes[:rank])
        ctx.size = sizes[rank]
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad[ctx.start : ctx.start + ctx.size], None, None


def gather_across_ranks(local: Tensor) -> Tensor:
    """Concatenate `local` from every rank in rank order (identity on one process).

    Gradients flow back to this rank's rows only. Returns the [sum of rows, ...] tensor.
    """
    rank, world = distributed_world()
    if world == 1:
        return local
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return _GatherRanks.apply(local, [int(s.item()) for s in sizes], rank)


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Sum the parameters' .grad over all ranks, in place (no-op on one process).

    With gradient caching each rank holds its share of one global loss's gradient, so the total
    is the sum. A parameter without a gradient counts as zeros so every rank reduces the same
    buffers. Grads are flattened into one buffer per dtype/device to make few collective calls.
    """
    _, world = distributed_world()
    if world == 1:
        return
    grads: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for param in parameters:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.setdefault((param.grad.dtype, param.grad.device), []).append(param.grad)
    for group in grads.values():
        flat = torch.cat([grad.reshape(-1) for grad in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in group:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _as_terms(output: LossOutput) -> Mapping[str, Tensor]:
    return {"loss": output} if isinstance(output, Tensor) else output


class GradCache:
    """Gradient-cached loss and backward for a batch encoded in chunks (Gao et al. 2021).

    `loss_fn(*reps, **loss_kwargs)` receives one global rep tensor per stream (all chunks of all
    ranks, concatenated in order) and returns a scalar tensor or a dict with a "loss" entry.
    """

    def __init__(self, loss_fn: Callable[..., LossOutput], replay_rng: bool = True) -> None:
        self.loss_fn = loss_fn
        # Only switched off by the test that shows replay is what makes dropout exact.
        self.replay_rng = replay_rng

    def step(self, streams: Sequence[Stream], **loss_kwargs: Any) -> dict[str, float]:
        """Accumulate d loss / d parameters into .grad for this rank's chunks.

        Returns the loss terms as floats. The caller all-reduces gradients across ranks
        (`all_reduce_gradients`), clips and steps the optimizer.
        """
        if distributed_world()[1] == 1 and all(len(chunks) == 1 for _, chunks in streams):
            # The whole batch is one chunk: caching would only add a forward pass. A plain
            # forward + backward gives the same gradients (tested against the cached path).
            reps = [encode(chunks[0]) for encode, chunks in streams]
            terms = _as_terms(self.loss_fn(*reps, **loss_kwargs))
            terms["loss"].backward()
            return {name: float(value.detach()) for name, value in terms.items()}

        # 1. Reps without a graph; remember each chunk's RNG state for the replay.
        chunk_reps: list[list[Tensor]] = []
        rng_states: list[list[_RngState | None]] = []
        for encode, chunks in streams:
            reps, states = [], []
            for chunk in chunks:
                states.append(_RngState() if self.replay_rng else None)
                with torch.no_grad():
                    reps.append(encode(chunk))
            chunk_reps.append(reps)
            rng_states.append(states)

        # 2. Loss on the global batch through leaf reps: d loss / d reps.
        leaves = [torch.cat(reps).detach().requires_grad_() for reps in chunk_reps]
        global_reps = [gather_across_ranks(leaf) for leaf in leaves]
        terms = _as_terms(self.loss_fn(*global_reps, **loss_kwargs))
        terms["loss"].backward()

        # 3. Re-encode chunk by chunk with a graph, pushing the cached rep gradients through.
        for (encode, chunks), reps, states, leaf in zip(
            streams, chunk_reps, rng_states, leaves, strict=True
        ):
            assert leaf.grad is not None
            grads = leaf.grad.split([rep.shape[0] for rep in reps])
            for chunk, grad, state in zip(chunks, grads, states, strict=True):
                if state is None:
                    rep = encode(chunk)
                else:
                    with state.replay():
                        rep = encode(chunk)
                if not rep.requires_grad:
                    break  # a frozen encoder (constant reps): no parameter to reach
                # Equivalent to (rep * grad).sum().backward(): the chain rule through the reps.
                torch.autograd.backward(rep, grad_tensors=grad)
        return {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def evaluate(self, streams: Sequence[Stream], **loss_kwargs: Any) -> dict[str, float]:
        """The same loss on the global batch without any gradient (dev loss); returns the terms."""
        reps = [torch.cat([encode(chunk) for chunk in chunks]) for encode, chunks in streams]
        terms = _as_terms(self.loss_fn(*(gather_across_ranks(rep) for rep in reps), **loss_kwargs))
        return {name: float(value) for name, value in terms.items()}
