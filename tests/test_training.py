"""train_student on the tiny student: learning, early stopping to the base model, exact resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from ml_core.config import TrainingConfig
from ml_core.records import Passage, Query, ScoredList
from ml_core.training import (
    STATE_FILE,
    average_with_base,
    batch_order,
    build_examples,
    learning_rate,
    set_dropout,
    train_student,
)


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


TOPICS = [
    "protein gene expression cell tissue",
    "insulin glucose metabolism liver kidney",
    "vaccine mice immune lung infection",
    "airfoil wings boundary layer turbulent",
    "shock waves supersonic mach flow",
    "electron atom molecule hydrogen carbon",
    "retrieval query document ranking relevance",
    "neural networks embedding vector scores",
    "river lake water valley mountain",
    "football league season team championship",
    "music album song band guitar",
    "railway station train bridge road",
]
CFG = TrainingConfig(
    list_size=4,
    batch_size=4,
    micro_batch_size=2,
    learning_rate=1e-3,
    max_epochs=2,
    patience=2,
    max_query_length=16,
    max_passage_length=24,
)


def _passages() -> dict[str, Passage]:
    return {f"p{i}": Passage(f"p{i}", text) for i, text in enumerate(TOPICS)}


def _queries() -> dict[str, Query]:
    return {f"q{i}": Query(f"q{i}", " ".join(text.split()[:2])) for i, text in enumerate(TOPICS)}


def _lists(teacher_disagrees: bool = False) -> list[ScoredList]:
    """Query i: its own passage first, then the next five topics with falling teacher scores.

    With teacher_disagrees the teacher prefers every candidate to the positive: a dev set that
    training on the normal lists can only make worse."""
    scores = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0] if teacher_disagrees else [1.0, 0.5, 0.4, 0.3, 0.2, 0.1]
    return [
        ScoredList(f"q{i}", [f"p{(i + k) % len(TOPICS)}" for k in range(6)], scores)
        for i in range(len(TOPICS))
    ]


def _student(model_store: Path, device: str | None = None):
    from ml_core.student import Student

    torch.manual_seed(0)  # any weight the checkpoint lacks (e.g. an unused pooler) is seeded too
    return Student.load(model_store / "tiny-student", device)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_build_examples_cuts_long_lists_and_pads_short_ones() -> None:
    short = ScoredList("q0", ["p0", "p1"], [1.0, 0.7])
    long = ScoredList("q1", [f"p{i}" for i in range(1, 8)], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    padded, cut = build_examples([short, long], _passages(), _queries(), 5, seed=3)
    assert padded.passage_ids[:2] == ("p0", "p1") and len(set(padded.passage_ids)) == 5
    assert padded.teacher_scores == (1.0, 0.7, 0.0, 0.0, 0.0)
    assert cut.passage_ids == ("p1", "p2", "p3", "p4", "p5")
    assert cut.teacher_scores == (1.0, 0.9, 0.8, 0.7, 0.6)
    assert padded == build_examples([short], _passages(), _queries(), 5, seed=3)[0]  # seeded


def test_build_examples_drops_a_passage_listed_twice() -> None:
    twice = ScoredList("q0", ["p0", "p1", "p0", "p2", "p3"], [1.0, 0.6, 1.0, 0.5, 0.4])
    (example,) = build_examples([twice], _passages(), _queries(), 4, seed=0)
    assert example.passage_ids == ("p0", "p1", "p2", "p3")
    assert example.teacher_scores == (1.0, 0.6, 0.5, 0.4)


def test_build_examples_names_a_missing_passage() -> None:
    with pytest.raises(ValueError, match="p99"):
        build_examples([ScoredList("q0", ["p0", "p99"], [1.0, 0.5])], _passages(), _queries(), 2, 0)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainingConfig(learning_rate=1e-3, min_lr_ratio=0.1)
    rates = [learning_rate(step, 5, 20, cfg) for step in range(21)]
    assert rates[0] == pytest.approx(2e-4) and rates[4] == pytest.approx(1e-3)
    assert rates[5] == pytest.approx(1e-3) and rates[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:], strict=False))


def test_batches_never_leave_a_rank_without_queries() -> None:
    batches = batch_order(9, 4, world_size=2, shuffle_seed="s")
    assert [len(b) for b in batches] == [4, 5]
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert batches == batch_order(9, 4, world_size=2, shuffle_seed="s")


def _tiny_bert() -> BertModel:
    return BertModel(
        BertConfig(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=8,
            vocab_size=10,
        )
    )


def test_set_dropout_zero_turns_every_dropout_off() -> None:
    model = _tiny_bert()
    set_dropout(model, 0.0)
    model.train()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_set_dropout_sets_every_probability_and_acts_only_in_train_mode() -> None:
    model = _tiny_bert()
    set_dropout(model, 0.3)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)
    model.eval()
    assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


def test_training_lowers_the_loss_and_exports_the_best_checkpoint(
    model_store: Path, tmp_path: Path
) -> None:
    # Dev = the training lists: a random 32-d student cannot generalise across 12 topics, but it
    # must fit the lists it is trained on, so a falling dev loss shows the loop optimises.
    reports: list[tuple[float, str]] = []
    train, dev = _lists()[:8], _lists()[:8]
    result = train_student(
        _student(model_store),
        train,
        dev,
        _passages(),
        _queries(),
        CFG,
        tmp_path,
        seed=1,
        progress=lambda fraction, message: reports.append((fraction, message)),
    )
    dev_losses = [entry["dev_loss"] for entry in result.history]
    assert [entry["epoch"] for entry in result.history] == [0, 1, 2]
    assert dev_losses[-1] < dev_losses[0]
    assert result.best_epoch == dev_losses.index(min(dev_losses)) and not result.base_is_best
    assert result.steps == 4 and not result.stopped_early
    assert all("train_loss" in entry for entry in result.history[1:])
    saved = json.loads((result.best_dir / "training_config.json").read_text())
    assert saved["training"] == CFG.model_dump(mode="json")
    assert saved["epoch"] == result.best_epoch
    assert _weights(type(_student(model_store)).load(result.best_dir)).keys()
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("step" in message for _, message in reports) == 4  # one report per step


def test_dropout_acts_on_training_steps_only_and_is_seeded(
    model_store: Path, tmp_path: Path
) -> None:
    def run(dropout: float, folder: str):
        cfg = CFG.model_copy(update={"dropout": dropout, "max_epochs": 1})
        train, dev = _lists()[:8], _lists()[:8]
        return train_student(_student(model_store), train, dev, _passages(), _queries(), cfg,
                             tmp_path / folder, seed=1).history

    plain, dropped, again = run(0.0, "plain"), run(0.3, "dropped"), run(0.3, "again")
    # The dev loss before training is the same model in eval mode either way.
    assert dropped[0]["dev_loss"] == plain[0]["dev_loss"]
    # The steps see dropout masks, so the training loss differs; the masks follow the seed.
    assert dropped[1]["train_loss"] != plain[1]["train_loss"]
    assert dropped == again


def test_base_model_is_kept_when_training_only_hurts_dev_loss(
    model_store: Path, tmp_path: Path
) -> None:
    cfg = CFG.model_copy(update={"max_epochs": 4, "patience": 1})
    student = _student(model_store)
    base = _weights(student)
    result = train_student(
        student, _lists(), _lists(teacher_disagrees=True), _passages(), _queries(), cfg, tmp_path, 1
    )
    assert result.best_epoch == 0 and result.base_is_best
    assert result.stopped_early and len(result.history) == 2
    exported = _weights(type(student).load(result.best_dir))
    assert all(torch.equal(exported[name], base[name]) for name in base)


def test_an_interrupted_run_resumes_to_the_same_final_weights(
    model_store: Path, tmp_path: Path
) -> None:
    cfg = CFG.model_copy(update={"max_epochs": 3})
    train, dev = _lists()[:8], _lists()[:8]
    straight = train_student(
        _student(model_store), train, dev, _passages(), _queries(), cfg, tmp_path / "a", 5
    )

    def crash_in_epoch_two(fraction: float, message: str) -> None:
        if message.startswith("epoch 2 step 4"):
            raise KeyboardInterrupt("worker lost")

    with pytest.raises(KeyboardInterrupt):
        train_student(
            _student(model_store),
            train,
            dev,
            _passages(),
            _queries(),
            cfg,
            tmp_path / "b",
            5,
            crash_in_epoch_two,
        )
    saved = torch.load(tmp_path / "b" / "state" / STATE_FILE, weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 2

    reports: list[str] = []
    resumed = train_student(
        _student(model_store),
        train,
        dev,
        _passages(),
        _queries(),
        cfg,
        tmp_path / "b",
        5,
        lambda fraction, message: reports.append(message),
    )
    assert reports[0] == "resuming after epoch 1"
    assert sum("step" in message for message in reports) == 4  # epochs 2 and 3 only
    assert resumed.history == straight.history and resumed.steps == straight.steps == 6
    final_a = torch.load(tmp_path / "a" / "state" / STATE_FILE, weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "state" / STATE_FILE, weights_only=True)["model"]
    differences = {k: (final_a[k] - final_b[k]).abs().max().item() for k in final_a}
    assert max(differences.values()) < 1e-6, differences


def test_average_with_base_interpolates_float_weights_only(model_store: Path) -> None:
    base, tuned = _student(model_store), _student(model_store)
    with torch.no_grad():
        for tensor in tuned.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1.0)
    before = _weights(tuned)
    base_weights = _weights(base)
    average_with_base(tuned, base, 0.25)
    after = _weights(tuned)
    for name, tensor in after.items():
        expected = 0.75 * before[name] + 0.25 * base_weights[name]
        assert torch.allclose(tensor, expected, atol=1e-6), name
    average_with_base(tuned, base, 1.0)
    assert all(torch.allclose(tuned.state_dict()[n], base_weights[n], atol=1e-6) for n in after)
    # Integer buffers (e.g. position ids in some encoders) are copied through, not averaged.
    counted, start = nn.Linear(2, 2), nn.Linear(2, 2)
    counted.register_buffer("ids", torch.tensor([3, 5]))
    start.register_buffer("ids", torch.tensor([0, 0]))
    average_with_base(counted, start, 0.5)
    assert counted.ids.tolist() == [3, 5]
    with pytest.raises(ValueError, match="base_share"):
        average_with_base(tuned, base, 1.5)
    with pytest.raises(ValueError, match="different architectures"):
        average_with_base(tuned, nn.Linear(2, 2), 0.5)


def test_a_finished_state_is_not_resumed_by_another_starting_model(
    model_store: Path, tmp_path: Path
) -> None:
    train, dev = _lists()[:8], _lists()[:8]
    train_student(_student(model_store), train, dev, _passages(), _queries(), CFG, tmp_path, 1)
    reports: list[str] = []

    def rerun(student) -> None:  # noqa: ANN001
        reports.clear()
        train_student(student, train, dev, _passages(), _queries(), CFG, tmp_path, 1,
                      progress=lambda fraction, message: reports.append(message))

    rerun(_student(model_store))  # the same start: the finished run is reused, no step
    assert not any(" step " in message for message in reports)
    other = _student(model_store)  # same architecture, other weights
    with torch.no_grad():
        next(iter(other.parameters())).add_(0.01)
    rerun(other)
    assert any("different run" in message for message in reports)
    assert sum(" step " in message for message in reports) == 4


def test_training_precision_picks_the_encoders_number_format(
    model_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ml_core.student

    train = _lists()[:8]
    final = {}
    for name, wanted, native in [("fp32", "fp32", True), ("bf16", "bf16", False),
                                 ("auto-native", "auto", True), ("auto-emulated", "auto", False)]:
        monkeypatch.setattr(ml_core.student, "cpu_has_native_bf16",
                            lambda _info=None, native=native: native)
        cfg = CFG.model_copy(update={"precision": wanted})
        # The CPU rule is under test (on a GPU host, auto is bf16 on the GPU).
        result = train_student(_student(model_store, "cpu"), train, train, _passages(),
                               _queries(), cfg, tmp_path / name, seed=1)
        losses = [entry["dev_loss"] for entry in result.history]
        assert losses[-1] < losses[0], name  # bf16 encoders still learn
        final[name] = torch.load(tmp_path / name / "state" / STATE_FILE,
                                 weights_only=True)["model"]
    diff = {name: max((final[name][k] - final["fp32"][k]).abs().max().item() for k in final[name])
            for name in final}
    # The weights and the optimizer stay float32; bf16 changes only the rounding of the passes.
    assert all(t.dtype == torch.float32 for t in final["bf16"].values() if t.is_floating_point())
    assert 0 < diff["bf16"] < 0.05
    # auto is bf16 on native hardware ...
    assert all(torch.equal(final["auto-native"][k], final["bf16"][k]) for k in final["bf16"])
    assert diff["auto-emulated"] == 0  # ... and fp32 where bf16 would be emulated


def test_train_layers_freezes_the_embeddings_and_the_layers_below_the_top(
    model_store: Path, tmp_path: Path
) -> None:
    student = _student(model_store)
    base = _weights(student)
    cfg = CFG.model_copy(update={"train_layers": 1, "max_epochs": 1})
    result = train_student(student, _lists()[:8], _lists()[:8], _passages(), _queries(), cfg,
                           tmp_path, seed=1)
    assert result.best_epoch == 1  # it trained, and the trained epoch was kept
    trained = _weights(type(student).load(result.best_dir))
    moved = {name for name in base if not torch.equal(trained[name], base[name])}
    assert moved and all(name.startswith("model.encoder.layer.1.") for name in moved)
    assert not any(p.requires_grad for p in student.model.embeddings.parameters())


def test_train_layers_names_a_model_without_a_layer_list() -> None:
    from ml_core.student import freeze_lower_layers

    with pytest.raises(ValueError, match="train_layers.*Linear"):
        freeze_lower_layers(nn.Linear(2, 2), 1)


def test_a_passage_in_several_lists_is_encoded_once_with_the_same_vectors_and_gradients(
    model_store: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ml_core.training import _Run

    texts = [TOPICS[0], TOPICS[1], TOPICS[0], TOPICS[2], TOPICS[1], TOPICS[0]]
    student = _student(model_store)
    run = _Run(student, CFG.model_copy(update={"precision": "fp32"}))
    weights = torch.randn(len(texts), student.forward_passages(texts[:1]).shape[1],
                          generator=torch.Generator().manual_seed(1))

    def gradients(reps: torch.Tensor) -> dict[str, torch.Tensor]:
        student.zero_grad()
        (reps * weights).sum().backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    every_slot = student.forward_passages(texts, run.passage_length).float()
    expected = gradients(every_slot)
    seen: list[int] = []
    forward = student.forward_passages
    monkeypatch.setattr(student, "forward_passages",
                        lambda batch, *a: seen.append(len(batch)) or forward(batch, *a))
    deduplicated = run._encode_passages(texts)
    assert seen == [3]  # three distinct passages, encoded once each
    assert torch.allclose(deduplicated, every_slot, atol=1e-5)
    got = gradients(deduplicated)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name


def test_query_side_tuning_encodes_passages_with_the_starting_weights_once(
    model_store: Path,
) -> None:
    from ml_core.training import _Run

    texts = TOPICS[:4]
    student = _student(model_store)
    run = _Run(student, CFG.model_copy(update={"tune": "queries"}))
    shared = _Run(student, CFG)
    with torch.no_grad():
        before = shared._encode_passages(texts)
        for parameter in student.parameters():
            parameter.add_(0.05)  # the student moves, as a training step would move it
        after = shared._encode_passages(texts)
    assert not torch.allclose(before, after, atol=1e-3)
    frozen = run._encode_passages(texts)
    assert torch.allclose(frozen, before, atol=1e-6) and not frozen.requires_grad
    assert len(run.frozen_vectors) == 4  # each passage encoded once, then looked up
    assert torch.equal(run._encode_passages(texts[::-1]), frozen.flip(0))


def test_query_side_tuning_trains_the_queries_against_fixed_passages(
    model_store: Path, tmp_path: Path
) -> None:
    cfg = CFG.model_copy(update={"tune": "queries"})
    student = _student(model_store)
    base = _weights(student)
    result = train_student(student, _lists()[:8], _lists()[:8], _passages(), _queries(), cfg,
                           tmp_path, seed=1)
    dev_losses = [entry["dev_loss"] for entry in result.history]
    assert dev_losses[-1] < dev_losses[0] and result.best_epoch > 0
    trained = _weights(type(student).load(result.best_dir))
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    # Another run with both sides training reaches other weights from the same lists.
    both = train_student(_student(model_store), _lists()[:8], _lists()[:8], _passages(),
                         _queries(), CFG, tmp_path / "both", seed=1)
    assert both.history[-1]["dev_loss"] != result.history[-1]["dev_loss"]


def test_passage_side_tuning_encodes_queries_with_the_starting_weights(
    model_store: Path,
) -> None:
    from ml_core.training import _Run

    texts = [" ".join(topic.split()[:2]) for topic in TOPICS[:4]]
    student = _student(model_store)
    run = _Run(student, CFG.model_copy(update={"tune": "passages"}))
    with torch.no_grad():
        before = _Run(student, CFG)._encode_queries(texts)
        for parameter in student.parameters():
            parameter.add_(0.05)
    frozen = run._encode_queries(texts)
    assert torch.allclose(frozen, before, atol=1e-6) and not frozen.requires_grad
    assert run._encode_passages(TOPICS[:2]).requires_grad  # the passage side trains
    assert set(run.frozen_vectors) == {("query", t) for t in texts}


def test_pull_toward_the_base_keeps_the_trained_vectors_nearer_the_base(
    model_store: Path, tmp_path: Path
) -> None:
    """training.base_anchor: the dev loss reports the distance (0 for the base itself), and a
    strong pull ends nearer the starting vectors than the same run without it."""
    from ml_core.student import Student

    texts = TOPICS[:6]

    def vectors(model_dir: Path | None) -> torch.Tensor:
        student = Student.load(model_dir) if model_dir else _student(model_store)
        with torch.no_grad():
            return torch.nn.functional.normalize(student.forward_passages(texts, 24), dim=-1)

    def train(anchor: float, folder: str):
        cfg = CFG.model_copy(update={"base_anchor": anchor, "max_epochs": 3})
        return train_student(_student(model_store), _lists()[:8], _lists()[:8], _passages(),
                             _queries(), cfg, tmp_path / folder, seed=1)

    base = vectors(None)
    free, pulled = train(0.0, "free"), train(50.0, "pulled")
    assert "dev_anchor" not in free.history[0]
    assert pulled.history[0]["dev_anchor"] == pytest.approx(0.0, abs=1e-6)
    assert pulled.best_epoch > 0 and free.best_epoch > 0
    assert pulled.history[pulled.best_epoch]["dev_anchor"] > 0

    def drift(result) -> float:
        return float((vectors(result.best_dir) - base).square().sum(-1).mean())

    assert drift(pulled) < 0.5 * drift(free)
