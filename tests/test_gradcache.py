"""GradCache gives the full-batch gradient of the DistillationObjective (to 1e-5), dropout on."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from transformers import BertConfig, BertModel

from ml_core.config import TrainingConfig
from ml_core.gradcache import GradCache
from ml_core.losses import DistillationObjective


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a shared 2-core machine two OpenMP threads
    # spin against other processes: one thread makes these tests several times faster.
    # (Student.load sets the thread count from TAILOR_TORCH_THREADS.)
    monkeypatch.setenv("TAILOR_TORCH_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BATCH, LIST_SIZE, MICRO = 6, 4, 2


def _tiny_bert(dropout: float) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertModel(config, add_pooling_layer=False)
    model.train()
    return model


def _encoder(model: BertModel):
    def encode(input_ids: Tensor) -> Tensor:
        return model(input_ids=input_ids).last_hidden_state.mean(dim=1)

    return encode


def _batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randint(1, 64, (BATCH, 6), generator=generator)
    passages = torch.randint(1, 64, (BATCH * LIST_SIZE, 10), generator=generator)
    teacher = torch.rand(BATCH, LIST_SIZE, generator=generator)
    teacher[:, 0] = 1.0
    teacher[0, 1] = 0.9  # a likely false negative, so the 60% mask is exercised
    ids = [[f"p{q}-{j}" for j in range(LIST_SIZE)] for q in range(BATCH)]
    ids[3][0] = ids[1][0]  # two queries with the same positive: the duplicate mask is exercised
    passages[3 * LIST_SIZE] = passages[1 * LIST_SIZE]
    return {"queries": queries, "passages": passages, "teacher": teacher, "ids": ids}


def _grads(model: BertModel) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _cached_grads(model: BertModel, batch: dict, replay_rng: bool = True,
                  cfg: TrainingConfig | None = None, **inputs: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    objective = DistillationObjective(cfg or TrainingConfig())
    encode = _encoder(model)
    torch.manual_seed(7)
    GradCache(objective, replay_rng=replay_rng).step(
        [
            (encode, batch["queries"].split(MICRO)),
            (encode, batch["passages"].split(MICRO * LIST_SIZE)),
        ],
        teacher_scores=batch["teacher"],
        passage_ids=batch["ids"],
        **inputs,
    )
    return _grads(model)


def _full_batch_grads(model: BertModel, batch: dict, chunked_forward: bool,
                      cfg: TrainingConfig | None = None, **inputs: Tensor) -> dict[str, Tensor]:
    """One graph over the whole batch. With dropout the chunks are encoded in GradCache's order
    from the same seed, so the model draws the same dropout masks: the same stochastic function."""
    model.zero_grad()
    objective = DistillationObjective(cfg or TrainingConfig())
    encode = _encoder(model)
    torch.manual_seed(7)
    if chunked_forward:
        queries = torch.cat([encode(chunk) for chunk in batch["queries"].split(MICRO)])
        passages = torch.cat(
            [encode(chunk) for chunk in batch["passages"].split(MICRO * LIST_SIZE)]
        )
    else:
        queries, passages = encode(batch["queries"]), encode(batch["passages"])
    objective(queries, passages, batch["teacher"], batch["ids"], **inputs).backward()
    return _grads(model)


def _max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_cached_gradients_equal_full_batch_gradients_with_dropout() -> None:
    model, batch = _tiny_bert(dropout=0.1), _batch()
    reference = _full_batch_grads(model, batch, chunked_forward=True)
    cached = _cached_grads(model, batch)
    assert max(g.abs().max().item() for g in reference.values()) > 1e-3  # not trivially zero
    assert _max_abs_diff(cached, reference) < 1e-5


def test_without_rng_replay_dropout_breaks_the_equality() -> None:
    # The control for the test above: it only passes because the replay restores the masks.
    model, batch = _tiny_bert(dropout=0.1), _batch()
    reference = _full_batch_grads(model, batch, chunked_forward=True)
    assert _max_abs_diff(_cached_grads(model, batch, replay_rng=False), reference) > 1e-3


def test_cached_gradients_equal_one_forward_over_the_whole_batch_without_dropout() -> None:
    model, batch = _tiny_bert(dropout=0.0), _batch()
    reference = _full_batch_grads(model, batch, chunked_forward=False)
    assert _max_abs_diff(_cached_grads(model, batch), reference) < 1e-5


def test_cached_gradients_of_the_pull_toward_the_base_equal_full_batch_gradients() -> None:
    """training.base_anchor: the base's vectors enter as loss inputs, and the cache still gives
    the one-graph gradient."""
    model, batch = _tiny_bert(dropout=0.0), _batch()
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
        inputs = {"base_queries": _encoder(base)(batch["queries"]),
                  "base_passages": _encoder(base)(batch["passages"])}
    cfg = TrainingConfig(base_anchor=5.0)
    with torch.no_grad():
        encode = _encoder(model)
        terms = DistillationObjective(cfg).compute_terms(
            encode(batch["queries"]), encode(batch["passages"]), batch["teacher"], batch["ids"],
            **inputs)
    assert terms["anchor"].item() > 0
    reference = _full_batch_grads(model, batch, chunked_forward=False, cfg=cfg, **inputs)
    assert _max_abs_diff(_cached_grads(model, batch, cfg=cfg, **inputs), reference) < 1e-5
    assert _max_abs_diff(_cached_grads(model, batch), reference) > 1e-4  # the pull counts


def test_step_leaves_the_rng_stream_as_one_pass_would() -> None:
    # The replay happens inside fork_rng, so training's later random draws do not shift.
    model, batch = _tiny_bert(dropout=0.1), _batch()
    _full_batch_grads(model, batch, chunked_forward=True)
    after_reference = torch.rand(3)
    _cached_grads(model, batch)
    assert torch.equal(torch.rand(3), after_reference)


def test_evaluate_returns_the_same_loss_as_step_without_gradients() -> None:
    model, batch = _tiny_bert(dropout=0.0), _batch()
    cache = GradCache(DistillationObjective(TrainingConfig()).compute_terms)
    encode = _encoder(model)
    streams = [
        (encode, batch["queries"].split(MICRO)),
        (encode, batch["passages"].split(MICRO * LIST_SIZE)),
    ]
    kwargs = {"teacher_scores": batch["teacher"], "passage_ids": batch["ids"]}
    evaluated = cache.evaluate(streams, **kwargs)
    assert all(p.grad is None for p in model.parameters())
    stepped = cache.step(streams, **kwargs)
    assert set(evaluated) == {"loss", "kl", "infonce"}
    assert abs(evaluated["loss"] - stepped["loss"]) < 1e-6


def test_one_chunk_batch_skips_the_cache_pass_with_the_same_gradients() -> None:
    model, batch = _tiny_bert(dropout=0.0), _batch()
    cached = _cached_grads(model, batch)
    model.zero_grad()
    encode = _encoder(model)
    calls = []

    def counting(inputs: Tensor) -> Tensor:
        calls.append(len(inputs))
        return encode(inputs)

    GradCache(DistillationObjective(TrainingConfig())).step(
        [(counting, [batch["queries"]]), (counting, [batch["passages"]])],
        teacher_scores=batch["teacher"],
        passage_ids=batch["ids"],
    )
    assert calls == [BATCH, BATCH * LIST_SIZE]  # one forward per stream, no no-grad pass
    assert _max_abs_diff(_grads(model), cached) < 1e-5


def test_rng_snapshot_leaves_an_unused_cuda_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU rank on a GPU host must not touch CUDA: reading its generators would initialise it,
    which fails in a process forked from one that had used CUDA (seen on an H200 host)."""
    from ml_core import gradcache

    def refuse() -> list[torch.Tensor]:
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    state = gradcache._RngState()
    assert state.cuda == []
    before = torch.rand(3)
    with state.replay():
        assert torch.equal(torch.rand(3), before)  # the CPU stream is replayed as before


def test_a_frozen_stream_gets_constant_reps_and_no_second_pass() -> None:
    # Query-side tuning: the passages come from a frozen copy of the model. The cached
    # gradients equal one graph over the queries with the passages' reps as constants.
    model, batch = _tiny_bert(dropout=0.0), _batch()
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    objective = DistillationObjective(TrainingConfig())
    encode, frozen_encode = _encoder(model), _encoder(frozen)
    calls = []

    def counting(inputs: Tensor) -> Tensor:
        calls.append(len(inputs))
        with torch.no_grad():
            return frozen_encode(inputs)

    model.zero_grad()
    passages = frozen_encode(batch["passages"]).detach()
    objective(encode(batch["queries"]), passages, batch["teacher"], batch["ids"]).backward()
    reference = _grads(model)
    model.zero_grad()
    GradCache(objective).step(
        [(encode, batch["queries"].split(MICRO)),
         (counting, batch["passages"].split(MICRO * LIST_SIZE))],
        teacher_scores=batch["teacher"],
        passage_ids=batch["ids"],
    )
    chunks = BATCH // MICRO
    assert calls[:chunks] == [MICRO * LIST_SIZE] * chunks
    assert len(calls) == chunks + 1  # the cache pass stops at the first constant chunk
    assert _max_abs_diff(_grads(model), reference) < 1e-5
    assert all(p.grad is None for p in frozen.parameters())
