"""The late-interaction teacher (ml_core.late_interaction) on a tiny int8 ColBERT-shaped ONNX
graph built here, and on the catalogued model where `make models` has provisioned it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ml_core import late_interaction
from ml_core.candidates import Candidates, combine_teachers, score_and_filter
from ml_core.config import CandidateConfig
from ml_core.late_interaction import (
    QUERY_TOKENS,
    OnnxLateInteraction,
    PassageCache,
    TorchLateInteraction,
    load_late_interaction,
)
from ml_core.records import Passage, Query
from ml_core.registry import DEFAULT_MODELS, REPO_ROOT, ModelRegistry, ModelSpec
from ml_core.teacher import OnnxCrossEncoder, load_teacher
from tests.tiny_colbert import build_tiny_colbert

PASSAGES = [
    "Lift on a swept wing depends on the component of the flow normal to the leading edge.",
    "Insulin resistance in obese mice was reversed by a change of diet.",
    "The boundary layer on a flat plate thickens downstream as the square root of distance, "
    "and heat transfer rises at high Mach numbers where shock waves form.",
    "Heat transfer rises at high Mach numbers.",
]
QUERIES = ["how is lift produced on a swept wing", "insulin resistance in mice",
           "boundary layer on a flat plate"]
PAIRS = [(q, p) for q in QUERIES for p in PASSAGES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Path]:
    return build_tiny_colbert(tmp_path_factory.mktemp("colbert") / "tiny-colbert")


@pytest.fixture
def teacher(tiny: tuple[ModelSpec, Path]) -> OnnxLateInteraction:
    return OnnxLateInteraction(tiny[0], threads=1)


def test_load_teacher_picks_the_late_interaction_scorer(tiny: tuple[ModelSpec, Path]) -> None:
    assert isinstance(load_teacher(tiny[0], device="cpu"), OnnxLateInteraction)


def test_query_and_passage_token_ids(teacher: OnnxLateInteraction) -> None:
    tok = teacher.tokenizer
    query = teacher.query_ids("lift on a wing")
    assert len(query) == QUERY_TOKENS
    assert tok.convert_ids_to_tokens(query[:2]) == ["[CLS]", "[unused0]"]
    body = tok("lift on a wing", add_special_tokens=False)["input_ids"]
    assert query[2:2 + len(body)] == body and query[2 + len(body)] == tok.sep_token_id
    assert set(query[3 + len(body):]) == {tok.mask_token_id}
    passage = teacher.passage_ids(" ".join(["lift"] * 500))
    assert len(passage) == teacher.spec.max_passage_length
    assert tok.convert_ids_to_tokens(passage[:2]) == ["[CLS]", "[unused1]"]
    assert passage[-1] == tok.sep_token_id


def _hidden(session: ort.InferenceSession, ids: list[int], attended: list[int]) -> np.ndarray:
    x = np.array([ids], dtype=np.int64)
    out = session.run(None, {"input_ids": x, "attention_mask": np.array([attended]),
                             "token_type_ids": np.zeros_like(x)})[0][0]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_scores_are_maxsim_over_normalised_token_vectors(
    teacher: OnnxLateInteraction, tiny: tuple[ModelSpec, Path],
) -> None:
    """Computed apart, straight from the graph: every query token's best cosine with a passage
    token, summed; the [MASK] padding is not attended to, but its vectors count."""
    session = ort.InferenceSession(str(tiny[0].weights), providers=["CPUExecutionProvider"])
    mask_id = teacher.tokenizer.mask_token_id
    expected = []
    for query, passage in PAIRS:
        ids = teacher.query_ids(query)
        q = _hidden(session, ids, [int(i != mask_id) for i in ids])
        assert q.shape[0] == QUERY_TOKENS
        ids = teacher.passage_ids(passage)
        p = _hidden(session, ids, [1] * len(ids))
        expected.append((q @ p.T).max(axis=1).sum())
    scores = teacher.score(PAIRS)
    # Passage vectors are kept in fp16: ~1e-3 of a cosine per token at most.
    np.testing.assert_allclose(scores, expected, atol=QUERY_TOKENS * 1e-3)
    assert len(set(np.round(scores, 4))) == len(PAIRS)
    assert 0 < teacher.relevance(scores).min() and teacher.relevance(scores).max() <= 1


def test_batched_scores_equal_one_at_a_time(tiny: tuple[ModelSpec, Path]) -> None:
    batched = OnnxLateInteraction(tiny[0], threads=1).score(PAIRS, batch_size=3)
    alone = [OnnxLateInteraction(tiny[0], threads=1, cache_bytes=0).score([pair])[0]
             for pair in PAIRS]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    shuffled = [PAIRS[i] for i in np.random.default_rng(0).permutation(len(PAIRS))]
    np.testing.assert_allclose(OnnxLateInteraction(tiny[0], threads=1).score(shuffled),
                               [alone[PAIRS.index(pair)] for pair in shuffled], atol=1e-5)


def _count_encoded(teacher: OnnxLateInteraction, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Token counts of every sequence the encoder runs on (queries are QUERY_TOKENS long)."""
    seen: list[int] = []
    original = teacher._hidden
    monkeypatch.setattr(teacher, "_hidden", lambda ids, mask: seen.extend(
        [int(ids.shape[1])] * ids.shape[0]) or original(ids, mask))
    return seen


def test_each_passage_is_encoded_once_and_reused_from_the_cache(
    teacher: OnnxLateInteraction, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _count_encoded(teacher, monkeypatch)
    first = teacher.score(PAIRS + PAIRS[:3])  # 3 queries x 4 passages, some pairs twice
    assert len(seen) == len(QUERIES) + len(PASSAGES)
    assert len(teacher.cache) == len(PASSAGES) and teacher.cache.bytes > 0
    seen.clear()
    again = teacher.score(PAIRS[::-1])
    assert len(seen) == len(QUERIES)  # the passages came from the cache
    np.testing.assert_array_equal(again, first[: len(PAIRS)][::-1])
    assert teacher.cache.hits == len(PASSAGES)


def test_cache_is_bounded_by_bytes(tiny: tuple[ModelSpec, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    one = OnnxLateInteraction(tiny[0], threads=1).encode_passages(PASSAGES[:1])[0]
    budget = 2 * one.nbytes + 8
    teacher = OnnxLateInteraction(tiny[0], threads=1, cache_bytes=budget)
    seen = _count_encoded(teacher, monkeypatch)
    scores = teacher.score(PAIRS)
    assert teacher.cache.bytes <= budget and 1 <= len(teacher.cache) < len(PASSAGES)
    assert len(seen) == len(QUERIES) + len(PASSAGES)  # still once each within a call
    np.testing.assert_allclose(teacher.score(PAIRS), scores, atol=1e-6)
    cache = PassageCache(max_bytes=10)
    cache.put(b"k", np.zeros(8, np.float16))  # 16 bytes: larger than the budget, not kept
    assert len(cache) == 0 and cache.get(b"k") is None


def test_dequantized_encoder_scores_as_onnxruntime(tiny: tuple[ModelSpec, Path]) -> None:
    """The GPU path, run on the CPU: the int8 graph de-quantised into a float BertModel scores
    like onnxruntime, and batches of several texts score as one at a time (float, unquantised
    activations)."""
    dequantized = TorchLateInteraction(tiny[0], device="cpu")
    assert dequantized.encode_batch > 1
    onnx = OnnxLateInteraction(tiny[0], threads=1).score(PAIRS)
    scores = dequantized.score(PAIRS)
    assert np.abs(scores - onnx).max() / QUERY_TOKENS < late_interaction.MAX_TOKEN_DEVIATION
    assert np.corrcoef(scores, onnx)[0, 1] > 0.99
    alone = [TorchLateInteraction(tiny[0], device="cpu", cache_bytes=0).score([pair])[0]
             for pair in PAIRS[:4]]
    np.testing.assert_allclose(scores[:4], alone, atol=1e-3)


def test_a_hugging_face_folder_scores_on_torch(tiny: tuple[ModelSpec, Path],
                                              tmp_path: Path) -> None:
    """format "hf": a float BertModel folder (here the de-quantised tiny encoder saved) loads
    on torch and scores as the model it was saved from."""
    dequantized = TorchLateInteraction(tiny[0], device="cpu")
    folder = tmp_path / "hf-colbert"
    dequantized.model.save_pretrained(folder)
    dequantized.tokenizer.save_pretrained(folder)
    spec = tiny[0].model_copy(update={"format": "hf", "path": ".", "sha256": {}}).write(folder)
    teacher = load_late_interaction(spec, device="cpu")
    assert isinstance(teacher, TorchLateInteraction)
    np.testing.assert_allclose(teacher.score(PAIRS), dequantized.score(PAIRS), atol=1e-4)


def test_dequantized_encoder_refuses_weights_that_score_otherwise(
    tiny: tuple[ModelSpec, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mis-mapped weight (here the last layer's output projection, sign flipped) fails the
    check against onnxruntime at load."""
    from ml_core import provision

    real = provision.dequantized_bert_state_dict

    def flipped(graph: provision.OnnxGraph) -> dict[str, np.ndarray]:
        state = real(graph)
        state["encoder.layer.1.output.dense.weight"] *= -1
        return state

    monkeypatch.setattr(provision, "dequantized_bert_state_dict", flipped)
    with pytest.raises(ValueError, match="scores unlike its ONNX original"):
        TorchLateInteraction(tiny[0], device="cpu")


def test_late_interaction_refuses_a_graph_without_token_vectors(tmp_path: Path,
                                                                 registry: ModelRegistry) -> None:
    from tests.tiny_models import build_onnx_teacher

    spec = build_onnx_teacher(registry.folder("tiny-teacher"), tmp_path / "ce")
    spec = spec.model_copy(update={"scoring": "late_interaction"})
    with pytest.raises(ValueError, match="markers|token vectors"):
        load_late_interaction(spec, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_late_interaction_runs_dequantized_on_cuda(tiny: tuple[ModelSpec, Path]) -> None:
    teacher = load_teacher(tiny[0])
    assert isinstance(teacher, TorchLateInteraction) and teacher.device == "cuda"
    np.testing.assert_allclose(teacher.score(PAIRS),
                               TorchLateInteraction(tiny[0], device="cpu").score(PAIRS),
                               atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Several teachers in the filter


def _filter_inputs() -> tuple[list[Query], dict[str, Candidates], list[Passage]]:
    passages = [Passage(id=f"p{i}", text=t) for i, t in enumerate(PASSAGES)]
    queries = [Query(id=f"q{i}", text=t, source_id=f"p{i}") for i, t in enumerate(QUERIES)]
    ids = [p.id for p in passages]
    candidates = {
        q.id: Candidates(query_id=q.id, passage_ids=ids, rrf=[1 / (60 + r) for r in range(4)],
                         student_ids=ids, source_rank=int(q.source_id[1:]) + 1)
        for q in queries
    }
    return queries, candidates, passages


def test_teachers_signal_averages_each_teachers_normalised_scores(
    tiny: tuple[ModelSpec, Path], registry: ModelRegistry,
) -> None:
    queries, candidates, passages = _filter_inputs()
    cross = load_teacher(registry.get("tiny-teacher"), device="cpu")
    late = OnnxLateInteraction(tiny[0], threads=1)
    cfg = CandidateConfig(teacher_signal="teachers_fused", co_teachers=["tiny-colbert"],
                          round_trip=False, min_score_percentile=0.0)
    result = score_and_filter(queries, candidates, passages, cross, cfg, co_teachers=[late])
    own_cross, own_late = result.teacher_raw_scores
    alone = score_and_filter(queries, candidates, passages, late,
                             cfg.model_copy(update={"teacher_signal": "fused", "co_teachers": []}))
    assert own_late == alone.raw_scores  # the co-teacher's own scores, as it scores alone
    assert result.raw_scores == combine_teachers([own_cross, own_late], cfg)
    def values(raw: dict[str, dict[str, float]]) -> np.ndarray:
        return np.array([v for scores in raw.values() for v in scores.values()])

    lows = [np.percentile(values(o), 1) for o in (own_cross, own_late)]
    highs = [np.percentile(values(o), 99) for o in (own_cross, own_late)]
    expected = np.mean([(values(o) - lo) / (hi - lo)
                        for o, lo, hi in zip((own_cross, own_late), lows, highs, strict=True)],
                       axis=0)
    np.testing.assert_allclose(values(result.raw_scores), expected, atol=1e-9)
    assert result.summary["teachers"] == 2 and result.summary["teacher_signal"] == "teachers_fused"
    assert len(result.lists) == len(queries)


def test_co_teachers_and_the_teachers_signals_go_together() -> None:
    with pytest.raises(ValueError, match="co_teachers, which is empty"):
        CandidateConfig(teacher_signal="teachers")
    with pytest.raises(ValueError, match="only for teacher_signal"):
        CandidateConfig(co_teachers=["answerai-colbert-small"])
    with pytest.raises(ValueError, match="more than once"):
        CandidateConfig(teacher_signal="teachers", co_teachers=["a", "a"])
    assert CandidateConfig(teacher_signal="teachers", co_teachers=["a"]).co_teachers == ["a"]


def test_catalogue_entry_is_provisioned_with_the_defaults() -> None:
    entry = DEFAULT_MODELS["answerai-colbert-small"]
    assert entry.spec.scoring == "late_interaction" and entry.spec.role == "teacher"
    assert entry.wheel == DEFAULT_MODELS["ms-marco-minilm-l12"].wheel  # no other download
    assert not entry.on_request and entry.conversion == "copy"
    assert set(entry.files.values()) == set(entry.wheel_sha256)
    assert entry.config["hidden_size"] == entry.spec.dim == 384


# ---------------------------------------------------------------------------------------------
# The catalogued model


REAL = REPO_ROOT / "var" / "models" / "answerai-colbert-small"


@pytest.mark.skipif(not (REAL / "tailor-model.json").is_file(),
                    reason="the provisioned answerai-colbert-small (the tiny graph runs in every "
                           "suite); run `make models` or `python -m ml_core provision` first")
def test_provisioned_late_interaction_teacher(tmp_path: Path) -> None:
    spec = ModelRegistry(REAL.parent).get(REAL.name)
    teacher = load_teacher(spec, device="cpu")
    assert isinstance(teacher, OnnxLateInteraction) and not isinstance(teacher, OnnxCrossEncoder)
    assert teacher.query_marker == 1 and teacher.passage_marker == 2
    assert teacher.tokenizer.mask_token_id == 103
    scores = teacher.score(PAIRS)
    by_query = scores.reshape(len(QUERIES), len(PASSAGES))
    assert list(by_query.argmax(axis=1)) == [0, 1, 2]
    alone = OnnxLateInteraction(spec, threads=1, cache_bytes=0).score(PAIRS[:2])
    np.testing.assert_allclose(scores[:2], alone, atol=1e-4)
    dequantized = TorchLateInteraction(spec, device="cpu")  # its GPU path passes its check
    assert list(dequantized.score(PAIRS).reshape(3, 4).argmax(axis=1)) == [0, 1, 2]
    wrong = tmp_path / "wrong-heads"
    shutil.copytree(REAL, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_attention_heads": 6}))
    with pytest.raises(ValueError, match="scores unlike its ONNX original"):
        TorchLateInteraction(ModelSpec.read(wrong), device="cpu")
