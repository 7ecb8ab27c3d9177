"""Student training: listwise distillation with gradient caching, early stopping and resume.

The method is Tamber et al. 2025 (arXiv 2502.19712; docs/recipe.md): lists of `list_size`
passages per query scored by a cross-encoder teacher, loss KL + 0.1 x InfoNCE
(ml_core/losses.py), large batches through GradCache (ml_core/gradcache.py), AdamW with warmup
and linear decay, dropout `cfg.dropout` (0 by default), dev loss before every epoch, keep the
best checkpoint, stop after `patience` epochs without improvement.

Distributed: when torch.distributed is initialised (gloo on CPU, nccl on GPU) every rank runs
`train_student` with the same arguments. All ranks build the same global batches; each encodes a
contiguous shard, GradCache all-gathers the reps so every rank computes the single-process loss,
the gradient shares are summed, and rank 0 alone writes checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ml_core.config import TrainingConfig
from ml_core.gradcache import GradCache, all_reduce_gradients, distributed_world
from ml_core.losses import DistillationObjective, passage_keys
from ml_core.records import Passage, ProgressFn, Query, ScoredList, no_progress
from ml_core.student import Student, freeze_lower_layers, passage_text, resolve_precision

STATE_FILE = "checkpoint.pt"
CONFIG_FILE = "training_config.json"
_STATE_FORMAT = 1
# TrainingConfig fields that act on the finished run's best checkpoint, not on training itself.
AFTER_TRAINING: tuple[str, ...] = ("base_merge",)


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """One query with its fixed-size passage list (index 0 = positive) and teacher scores."""

    query_id: str
    query: str
    passage_ids: tuple[str, ...]
    passages: tuple[str, ...]
    teacher_scores: tuple[float, ...]


@dataclass
class TrainingResult:
    """What a training run produced.

    `best_dir` holds the exported student with the lowest dev loss. `best_epoch` 0 means no
    epoch of training beat the base model on dev loss, so `best_dir` IS the base model
    (`base_is_best`): the customer must not be handed a worse model as an improvement.
    """

    best_dir: Path
    best_epoch: int
    history: list[dict[str, Any]]
    steps: int
    stopped_early: bool
    precision: str = "fp32"  # the number format the passes computed in (TrainingConfig.precision)
    base_is_best: bool = field(init=False)

    def __post_init__(self) -> None:
        self.base_is_best = self.best_epoch == 0


@dataclass
class TrainingState:
    """Where a run stands. Saved with the weights, the optimizer and torch's RNG after every
    epoch (`save`), and restored from there (`restore`) when the same run is called again."""

    epoch: int = 0  # epochs trained; 0 is the base model
    step: int = 0  # optimizer steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # dev evaluations since the dev loss last improved
    finished: bool = False
    stopped_early: bool = False

    def save(
        self,
        path: Path,
        run_id: str,
        cfg: TrainingConfig,
        seed: int,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Write everything needed to resume, atomically: a crash leaves the previous state."""
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {
            "format": _STATE_FORMAT,
            "fingerprint": run_id,
            "config": cfg.model_dump(mode="json"),
            "seed": seed,
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **dataclasses.asdict(self),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    @classmethod
    def restore(
        cls, path: Path, run_id: str, student: nn.Module, optimizer: torch.optim.Optimizer
    ) -> TrainingState | None:
        """The state that the run `run_id` saved at `path`, with the student's weights, the
        optimizer and torch's RNG set back to it; None when there is none, or it is another
        run's (other starting weights, settings, seed or data: see `_run_id`)."""
        if not path.exists():
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint["format"] != _STATE_FORMAT or checkpoint["fingerprint"] != run_id:
            return None
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        return cls(**{f.name: checkpoint[f.name] for f in dataclasses.fields(cls)})


def train_student(
    student: Student,
    train_lists: list[ScoredList],
    dev_lists: list[ScoredList],
    passages: dict[str, Passage],
    queries: dict[str, Query],
    cfg: TrainingConfig,
    out_dir: Path,
    seed: int,
    progress: ProgressFn = no_progress,
) -> TrainingResult:
    """Distil the teacher's list scores into `student`; resumes from out_dir/"state" if present.

    Writes out_dir/"best" (the exported student with the lowest dev loss plus
    training_config.json) and out_dir/"state"/checkpoint.pt (a TrainingState, saved at the end
    of every epoch; a state from another starting model, config, seed or data is ignored).
    Returns a TrainingResult whose history has one entry per dev evaluation: epoch (0 = base
    model), step, dev_loss, dev_kl, dev_infonce (dev_anchor with training.base_anchor), best,
    and for trained epochs train_loss and learning_rate. `progress` gets (fraction of planned
    steps, message) every step and may raise to stop the run, which then resumes from the last
    finished epoch when called again.
    """
    out_dir = Path(out_dir)
    state_path = out_dir / "state" / STATE_FILE
    best_dir = out_dir / "best"
    run = _Run(student, cfg)
    train = build_examples(train_lists, passages, queries, cfg.list_size, seed)
    dev = build_examples(dev_lists, passages, queries, cfg.list_size, seed)
    if len(train) < run.world or len(dev) < run.world:
        raise ValueError(f"need at least {run.world} training and dev lists (one per rank)")
    run_id = _run_id(cfg, seed, train, dev, student)
    set_dropout(student, cfg.dropout)
    if cfg.train_layers is not None:
        freeze_lower_layers(student.model, cfg.train_layers)
    params = [p for p in student.parameters() if p.requires_grad]
    # Weight decay on weight matrices only: decaying biases and LayerNorm gains just shrinks them.
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
    )
    steps_per_epoch = len(batch_order(len(train), cfg.batch_size, run.world, None))
    total_steps = steps_per_epoch * cfg.max_epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    torch.manual_seed(seed)
    state = TrainingState.restore(state_path, run_id, student, optimizer)
    if state is not None:
        progress(state.step / total_steps, f"resuming after epoch {state.epoch}")
    elif state_path.exists():
        progress(0.0, "ignoring a training state left by a different run")
    state = state or TrainingState()
    if run.rank == 0:
        _recover_best(best_dir)
    _broadcast_parameters(student)

    def save_state() -> None:
        if run.rank == 0:
            state.save(state_path, run_id, cfg, seed, student, optimizer)
        _barrier()

    while not state.finished:
        # Dev loss before every epoch (epoch 0 = the base model) and after the last one.
        progress(state.step / total_steps, f"dev loss after {state.epoch} epochs")
        # The entry of the epoch just trained (train loss, lr) is completed with its dev loss.
        history = state.history
        if history and history[-1]["epoch"] == state.epoch:
            record = history.pop()
        else:
            record = {"epoch": state.epoch}
        record.update(step=state.step, **run.dev_loss(dev))
        if record["dev_loss"] < state.best_loss:
            state.best_loss, state.best_epoch = record["dev_loss"], state.epoch
            state.bad_epochs = 0
            if run.rank == 0:
                meta = {"training": cfg.model_dump(mode="json"), "seed": seed, **record}
                _save_best(student, best_dir, meta)
            _barrier()
        else:
            state.bad_epochs += 1
        record["best"] = state.best_epoch == state.epoch
        history.append(record)
        if state.epoch == cfg.max_epochs or state.bad_epochs >= cfg.patience:
            state.finished, state.stopped_early = True, state.epoch < cfg.max_epochs
            save_state()
            break

        # One epoch: seeded shuffle (a function of seed and epoch, so a resumed run sees the same
        # order), one optimizer step per global batch.
        student.train()
        state.epoch += 1
        epoch_loss = 0.0
        batches = batch_order(len(train), cfg.batch_size, run.world, f"{seed}:epoch:{state.epoch}")
        for indices in batches:
            batch = [train[i] for i in indices]
            lr = learning_rate(state.step, warmup_steps, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            terms = run.cache.step(run.streams(batch), **run.loss_inputs(batch))
            all_reduce_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            state.step += 1
            epoch_loss += terms["loss"]
            progress(
                state.step / total_steps,
                f"epoch {state.epoch} step {state.step}/{total_steps} loss {terms['loss']:.4f} "
                f"grad norm {float(grad_norm):.3f} lr {lr:.2e}",
            )
        history.append(
            {"epoch": state.epoch, "train_loss": epoch_loss / len(batches), "learning_rate": lr}
        )
        save_state()

    if state.best_epoch == 0:
        progress(1.0, "training never beat the base model on dev loss: keeping the base model")
    else:
        progress(1.0, f"training done: best epoch {state.best_epoch} of {state.epoch}")
    return TrainingResult(
        best_dir=best_dir,
        best_epoch=state.best_epoch,
        history=state.history,
        steps=state.step,
        stopped_early=state.stopped_early,
        precision=run.precision,
    )


def build_examples(
    lists: Sequence[ScoredList],
    passages: dict[str, Passage],
    queries: dict[str, Query],
    list_size: int,
    seed: int,
) -> list[TrainingExample]:
    """Cut (or pad) every ScoredList to `list_size` passages; returns one example per list.

    The list keeps the positive and the first list_size - 1 candidates (teacher lists are in
    first-stage rank order). Short lists are padded with passages drawn at random from the
    corpus (seeded per query) with teacher score 0: the bottom of the normalised scale, since a
    random passage is almost surely irrelevant.
    """
    pool = sorted(passages)
    examples = []
    for scored in lists:
        # A passage listed twice would count twice in the KL: keep its first slot.
        first: dict[str, float] = {}
        for pid, score in zip(scored.passage_ids, scored.teacher_scores, strict=True):
            first.setdefault(pid, score)
        ids = list(first)[:list_size]
        scores = [float(first[pid]) for pid in ids]
        if len(ids) < list_size:
            rng = random.Random(f"{seed}:{scored.query_id}")
            taken = set(ids)
            fresh = [
                pid for pid in rng.sample(pool, min(len(pool), 2 * list_size)) if pid not in taken
            ]
            while len(ids) < list_size:
                # A corpus smaller than a list: repeats are unavoidable (never the positive).
                pid = fresh.pop() if fresh else rng.choice([p for p in pool if p != ids[0]] or pool)
                ids.append(pid)
                scores.append(0.0)
        missing = [pid for pid in ids if pid not in passages]
        if missing or scored.query_id not in queries:
            raise ValueError(
                f"scored list for query {scored.query_id!r} refers to unknown "
                f"{'passages ' + ', '.join(missing[:3]) if missing else 'query'}"
            )
        examples.append(
            TrainingExample(
                query_id=scored.query_id,
                query=queries[scored.query_id].text,
                passage_ids=tuple(ids),
                passages=tuple(passage_text(passages[pid]) for pid in ids),
                teacher_scores=tuple(scores),
            )
        )
    return examples


def batch_order(
    count: int, batch_size: int, world_size: int, shuffle_seed: str | None
) -> list[list[int]]:
    """Indices of each global batch, shuffled with `shuffle_seed` (None: in order).

    A trailing batch with fewer queries than ranks is merged into the previous one, so every
    rank always has at least one query to encode.
    """
    order = list(range(count))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2].extend(batches.pop())
    return batches


def learning_rate(step: int, warmup_steps: int, total_steps: int, cfg: TrainingConfig) -> float:
    """Linear warmup to cfg.learning_rate, then linear decay to min_lr_ratio x it at total_steps."""
    if step < warmup_steps:
        return cfg.learning_rate * (step + 1) / warmup_steps  # never 0: step 0 must move weights
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.learning_rate * max(cfg.min_lr_ratio, 1.0 - (1.0 - cfg.min_lr_ratio) * progress)


def set_dropout(model: nn.Module, probability: float) -> None:
    """Set every dropout probability in the model (0: the recipe's default, no dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
        # Some HF attention modules keep a float copied from the config and call F.dropout.
        for name in ("attention_dropout", "dropout_p", "dropout_prob"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, probability)


class _Run:
    """The pieces one training run shares between its steps (not its mutable progress)."""

    def __init__(self, student: Student, cfg: TrainingConfig) -> None:
        self.student = student
        self.cfg = cfg
        self.rank, self.world = distributed_world()
        self.device = next(student.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.cache = GradCache(DistillationObjective(cfg).compute_terms)
        # Never train on longer inputs than the model is used with (its spec's limits).
        self.query_length = min(cfg.max_query_length, student.spec.max_query_length)
        self.passage_length = min(cfg.max_passage_length, student.spec.max_passage_length)
        # One side tuned (training.tune): the other side is a frozen copy of the starting
        # weights that encodes each text once (its vector never changes) and carries no graph,
        # so the gradient cache skips it. The pull toward the base (training.base_anchor) reads
        # the same copy's vectors of every text the batch encodes.
        self.frozen: Student | None = None
        self.frozen_vectors: dict[tuple[str, str], torch.Tensor] = {}
        if cfg.tune != "both" or cfg.base_anchor > 0:
            self.frozen = copy.deepcopy(student).eval()
            self.frozen.requires_grad_(False)

    def _encode_queries(self, texts: list[str]) -> torch.Tensor:
        if self.cfg.tune == "passages":
            return self._frozen_side(texts, "query")
        with self._autocast():
            return self.student.forward_queries(texts, self.query_length).float()

    def _encode_passages(self, texts: list[str]) -> torch.Tensor:
        if self.cfg.tune == "queries":
            return self._frozen_side(texts, "passage")
        # The lists of one micro-batch share hard negatives (neighbouring passages' queries find
        # the same candidates): each distinct text is encoded once and its vector indexed into
        # every slot, so a shared passage's gradient is the sum over its slots, as when each slot
        # encoded it. With dropout on, the slots of one text share one dropout draw.
        unique = list(dict.fromkeys(texts))
        with self._autocast():
            vectors = self.student.forward_passages(unique, self.passage_length).float()
        if len(unique) == len(texts):
            return vectors
        slot = {text: i for i, text in enumerate(unique)}
        # index_select, not vectors[index]: the latter's backward (an accumulating index_put)
        # sums a shared passage's slots in a varying order on a multi-threaded CPU, so two
        # identical steps gave different gradients; index_select's backward does not.
        index = torch.tensor([slot[t] for t in texts], device=vectors.device)
        return vectors.index_select(0, index)

    def _frozen_side(self, texts: list[str], kind: str) -> torch.Tensor:
        assert self.frozen is not None
        missing = list(dict.fromkeys(t for t in texts if (kind, t) not in self.frozen_vectors))
        if missing:
            with torch.no_grad(), self._autocast():
                vectors = (self.frozen.forward_queries(missing, self.query_length)
                           if kind == "query"
                           else self.frozen.forward_passages(missing, self.passage_length))
            self.frozen_vectors.update(
                ((kind, t), v) for t, v in zip(missing, vectors.float(), strict=True))
        return torch.stack([self.frozen_vectors[kind, t] for t in texts])

    def _autocast(self) -> torch.autocast:
        # bf16 encoders where the hardware has it (TrainingConfig.precision), as the recipe on
        # GPU; the loss itself runs in float32 on the reps. GradCache's second forward pass
        # sees the same inputs and shapes as its first, so it reproduces the reps bit for bit
        # and the cached gradients belong to the reps the loss was computed on.
        return torch.autocast(self.device.type, torch.bfloat16,
                              enabled=self.precision == "bf16")

    def streams(self, batch: list[TrainingExample]) -> list[tuple[Any, list[list[str]]]]:
        """This rank's contiguous shard of the global batch, in micro-batch chunks."""
        size, extra = divmod(len(batch), self.world)
        start = self.rank * size + min(self.rank, extra)
        shard = batch[start : start + size + (self.rank < extra)]
        micro = self.cfg.micro_batch_size
        chunks = [shard[i : i + micro] for i in range(0, len(shard), micro)]
        return [
            (self._encode_queries, [[e.query for e in chunk] for chunk in chunks]),
            (self._encode_passages, [[p for e in chunk for p in e.passages] for chunk in chunks]),
        ]

    def loss_inputs(self, batch: list[TrainingExample]) -> dict[str, torch.Tensor]:
        """Teacher scores and passage keys of the whole global batch (every rank builds them),
        and with a pull toward the base its vectors of the batch's queries and passages."""
        inputs = {
            "teacher_scores": torch.tensor(
                [e.teacher_scores for e in batch], dtype=torch.float32, device=self.device
            ),
            "passage_ids": passage_keys([e.passage_ids for e in batch], self.device),
        }
        if self.cfg.base_anchor > 0:
            inputs["base_queries"] = self._frozen_side([e.query for e in batch], "query")
            inputs["base_passages"] = self._frozen_side(
                [p for e in batch for p in e.passages], "passage")
        return inputs

    def dev_loss(self, examples: list[TrainingExample]) -> dict[str, float]:
        """Mean loss terms over the dev set, batched like training (in order, no gradient)."""
        self.student.eval()
        totals: dict[str, float] = {}
        for indices in batch_order(len(examples), self.cfg.batch_size, self.world, None):
            batch = [examples[i] for i in indices]
            terms = self.cache.evaluate(self.streams(batch), **self.loss_inputs(batch))
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value * len(batch)
        return {f"dev_{name}": value / len(examples) for name, value in totals.items()}


def average_with_base(tuned: nn.Module, base: nn.Module, base_share: float) -> None:
    """Move `tuned`'s floating-point weights in place to (1 - base_share) x tuned + base_share x
    base: weight-space ensembling of a fine-tuned model with its starting point (WiSE-FT,
    Wortsman et al. 2022, arXiv 2109.01903), which keeps what fine-tuning gained on its own data
    while giving back less of what the base did well elsewhere. Integer buffers (position ids)
    are left as they are. Both models must have the same architecture."""
    if not 0.0 <= base_share <= 1.0:
        raise ValueError(f"base_share must be in [0, 1], got {base_share}")
    base_state = base.state_dict()
    tuned_state = tuned.state_dict()
    if base_state.keys() != tuned_state.keys():
        missing = sorted(base_state.keys() ^ tuned_state.keys())[:3]
        raise ValueError(f"cannot average models of different architectures (e.g. {missing})")
    with torch.no_grad():
        for name, tensor in tuned_state.items():
            other = base_state[name]
            if tensor.shape != other.shape:
                raise ValueError(f"cannot average {name}: {tuple(tensor.shape)} vs "
                                 f"{tuple(other.shape)}")
            if tensor.is_floating_point():
                tensor.lerp_(other.to(device=tensor.device, dtype=tensor.dtype), base_share)


def training_run_settings(cfg: TrainingConfig) -> dict[str, Any]:
    """The settings a training run depends on: all but those applied after it (AFTER_TRAINING)."""
    return cfg.model_dump(mode="json", exclude=set(AFTER_TRAINING))


def _run_id(
    cfg: TrainingConfig,
    seed: int,
    train: list[TrainingExample],
    dev: list[TrainingExample],
    student: nn.Module,
) -> str:
    """Identifies a run: a saved state is only resumed by the same starting weights, config,
    seed and data.

    Settings applied after training (AFTER_TRAINING) are left out, so changing them reuses a
    finished run instead of training again. The starting weights count because a kept state
    must never carry one student's training over to another with the same architecture."""
    digest = hashlib.sha256(json.dumps([training_run_settings(cfg), seed]).encode())
    for name, tensor in student.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for example in (*train, None, *dev):
        digest.update(repr(example).encode())
    return digest.hexdigest()


def _save_best(student: Student, best_dir: Path, record: dict[str, Any]) -> None:
    """Export the student to best_dir (replacing it atomically enough: write aside, then swap)."""
    tmp = best_dir.with_name(best_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    student.save(tmp)
    (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    old = best_dir.with_name(best_dir.name + ".old")
    if best_dir.exists():
        best_dir.rename(old)
    tmp.rename(best_dir)
    if old.exists():
        shutil.rmtree(old)


def _recover_best(best_dir: Path) -> None:
    """Undo a swap in `_save_best` that a crash cut between its two renames."""
    old = best_dir.with_name(best_dir.name + ".old")
    if not best_dir.exists() and old.exists():
        old.rename(best_dir)


def _barrier() -> None:
    if distributed_world()[1] > 1:
        dist.barrier()


def _broadcast_parameters(model: nn.Module) -> None:
    # Ranks must start from identical weights or their summed gradients mean nothing.
    if distributed_world()[1] > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


