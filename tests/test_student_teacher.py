"""Student encoding/training paths and the teacher backends, on the tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ml_core.teacher as teacher_module
from ml_core.records import Passage
from ml_core.registry import REPO_ROOT, ModelRegistry, ModelSpec
from ml_core.student import Student, cpu_has_native_bf16, resolve_precision
from ml_core.teacher import (
    DequantizedCrossEncoder,
    OnnxCrossEncoder,
    Teacher,
    TorchCrossEncoder,
    load_teacher,
)
from tests.tiny_models import build_int8_onnx_teacher, build_onnx_teacher

QUERIES = ["what is lift on a swept wing", "insulin resistance in mice", "heat", ""]
PASSAGES = [
    "Lift and drag were measured on a swept wing in the wind tunnel.",
    "Heat transfer " * 300,  # longer than the student's 128 and the teacher's 512: truncated
    "Insulin receptors in mice.",
]


@pytest.fixture(scope="module")
def student(registry: ModelRegistry) -> Student:
    # On the CPU wherever the suite runs: these tests check pooling and padding against numpy.
    return Student.load(registry.get("tiny-student"), device="cpu")


def manual_vector(student: Student, text: str, pooling: str, normalize: bool,
                  max_length: int = 128) -> np.ndarray:
    batch = student.tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = student.model(**batch).last_hidden_state[0]
    vector = hidden[0] if pooling == "cls" else hidden.mean(0)
    return (torch.nn.functional.normalize(vector, dim=0) if normalize else vector).numpy()


def test_encode_applies_prefix_mean_pooling_and_norm(student: Student) -> None:
    vectors = student.encode_queries(QUERIES[:2])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    expected = manual_vector(student, "query: " + QUERIES[0], "mean", normalize=True)
    np.testing.assert_allclose(vectors[0], expected, atol=1e-5)
    passage = student.encode_passages([PASSAGES[1]])[0]
    expected = manual_vector(student, "passage: " + PASSAGES[1], "mean", True, max_length=128)
    np.testing.assert_allclose(passage, expected, atol=1e-5)


def test_cls_pooling_without_norm(student: Student) -> None:
    cls_student = Student(student.model, student.tokenizer,
                          student.spec.model_copy(update={"pooling": "cls", "normalize": False}))
    vector = cls_student.encode_queries([QUERIES[1]])[0]
    expected = manual_vector(student, "query: " + QUERIES[1], "cls", normalize=False)
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert abs(np.linalg.norm(vector) - 1.0) > 1e-3


def test_batching_and_length_sorting_keep_input_order(student: Student) -> None:
    one_by_one = np.stack([student.encode_passages([p])[0] for p in PASSAGES])
    np.testing.assert_allclose(student.encode_passages(PASSAGES, batch_size=2), one_by_one,
                               atol=1e-5)
    assert not np.allclose(one_by_one[0], one_by_one[2])


def test_passage_title_is_encoded_before_text(student: Student) -> None:
    with_title = student.encode_passages([Passage("p", "drag on wings", title="Aerodynamics")])
    np.testing.assert_allclose(with_title, student.encode_passages(["Aerodynamics drag on wings"]),
                               atol=1e-6)


def test_forward_is_differentiable_and_respects_max_length(student: Student) -> None:
    student.train()
    try:
        reps = student.forward_passages(PASSAGES, max_length=16)
        assert reps.shape == (3, 32) and reps.requires_grad
        reps.sum().backward()
        grads = [p.grad for p in student.model.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    finally:
        student.zero_grad(set_to_none=True)
        student.eval()
    with torch.no_grad():
        short = student.forward_passages([PASSAGES[1]], max_length=16)[0].numpy()
    expected = manual_vector(student, "passage: " + PASSAGES[1], "mean", True, max_length=16)
    np.testing.assert_allclose(short, expected, atol=1e-5)


def test_progress_reaches_one(student: Student) -> None:
    seen: list[float] = []
    student.encode_queries(QUERIES, batch_size=3, progress=lambda f, m: seen.append(f))
    assert seen == [0.75, 1.0]


def test_bf16_encoding_is_close_to_fp32_and_off_by_default(student: Student) -> None:
    assert student.encode_precision == "fp32"  # served and exported vectors are fp32
    texts = PASSAGES + QUERIES[:3]
    exact = student.encode_passages(texts)
    student.encode_precision = "bf16"
    try:
        approx = student.encode_passages(texts)
    finally:
        student.encode_precision = "fp32"
    assert approx.dtype == np.float32
    cosines = (exact * approx).sum(axis=1)
    assert cosines.min() > 0.999
    assert np.abs(exact - approx).max() > 1e-6  # bf16 did compute (not silently fp32)
    np.testing.assert_array_equal(student.encode_passages(texts), exact)


CPUINFO = "processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize(
    ("extra", "native"),
    [("avx512_bf16 avx512_vnni", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False),
     ("", False)],
)
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(extra: str, native: bool) -> None:
    cpuinfo = CPUINFO.format(extra=extra)
    assert cpu_has_native_bf16(cpuinfo) is native
    assert resolve_precision("auto", "cpu", cpuinfo) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu", cpuinfo) == "fp32"
    assert resolve_precision("bf16", "cpu", cpuinfo) == "bf16"
    assert not cpu_has_native_bf16("")
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu", cpuinfo)


@pytest.fixture(scope="module")
def tiny_teacher(registry: ModelRegistry) -> Teacher:
    return load_teacher(registry.get("tiny-teacher"))


PAIRS = [(q, p) for q in QUERIES[:3] for p in PASSAGES]


def test_load_teacher_picks_backend(tiny_teacher: Teacher, registry: ModelRegistry) -> None:
    assert isinstance(tiny_teacher, TorchCrossEncoder)
    assert load_teacher("tiny-teacher", registry).name == "tiny-teacher"
    with pytest.raises(ValueError, match="format 'gguf'"):
        load_teacher(registry.get("tiny-teacher").model_copy(update={"format": "gguf"}))


def test_teacher_scores_in_input_order_with_padded_batches(tiny_teacher: Teacher) -> None:
    scores = tiny_teacher.score(PAIRS, batch_size=4)
    singles = np.array([tiny_teacher.score([pair], batch_size=1)[0] for pair in PAIRS])
    assert scores.dtype == np.float32 and scores.shape == (len(PAIRS),)
    np.testing.assert_allclose(scores, singles, atol=1e-5)
    assert len(set(np.round(scores, 6))) > 3  # different pairs get different scores


def test_teacher_batches_are_length_sorted_and_padded_to_longest(
    tiny_teacher: Teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    widths: list[int] = []
    original = tiny_teacher._logits

    def spy(batch: dict[str, np.ndarray]) -> np.ndarray:
        widths.append(batch["input_ids"].shape[1])
        return original(batch)

    monkeypatch.setattr(tiny_teacher, "_logits", spy)
    tiny_teacher.score(PAIRS, batch_size=3)
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == 512 and widths[-1] < 40  # the long passage is truncated, not the rest


def test_teacher_progress_can_cancel(tiny_teacher: Teacher) -> None:
    class Cancelled(Exception):
        pass

    def cancel(fraction: float, message: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        tiny_teacher.score(PAIRS, batch_size=2, progress=cancel)


def test_onnx_teacher_scores_as_the_torch_teacher(
    tiny_teacher: Teacher, registry: ModelRegistry, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same weights on onnxruntime: same scores, and per-batch padding although the
    ONNX folder's tokenizer.json pads every pair to 512 (as the provisioned teacher's does)."""
    spec = build_onnx_teacher(registry.folder("tiny-teacher"), tmp_path / "tiny-onnx-teacher")
    teacher = load_teacher(ModelSpec.read(tmp_path / "tiny-onnx-teacher"))
    assert isinstance(teacher, OnnxCrossEncoder) and spec.format == "onnx"
    assert teacher.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    widths: list[int] = []
    original = teacher._logits
    monkeypatch.setattr(teacher, "_logits",
                        lambda b: widths.append(b["input_ids"].shape[1]) or original(b))
    pairs = sorted(PAIRS, key=lambda pair: len(pair[0]) + len(pair[1]))  # longest last
    scores = teacher.score(pairs, batch_size=4)
    np.testing.assert_allclose(scores, tiny_teacher.score(pairs, batch_size=4), atol=1e-5)
    assert len(set(np.round(scores, 6))) > 3
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == 512 and widths[-1] < 40  # the long passage is truncated, not the rest


@pytest.fixture(scope="module")
def int8_teacher(registry: ModelRegistry, tmp_path_factory: pytest.TempPathFactory,
                 ) -> tuple[ModelSpec, Path]:
    """(the tiny teacher as int8 ONNX with its config.json, the float HF teacher behind it)."""
    folder = tmp_path_factory.mktemp("int8") / "tiny-int8-teacher"
    float_folder = build_int8_onnx_teacher(registry.folder("tiny-teacher"), folder)
    return ModelSpec.read(folder), float_folder


# Tiny random weights give int8 activation rounding a larger share of their narrow logit range
# (about 0.13 here) than the default teacher's (about 0.01, test_dequantized_default_teacher).
TINY_DEVIATION = 0.2


def test_dequantized_teacher_scores_as_its_float_original(
    int8_teacher: tuple[ModelSpec, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU path of an int8 ONNX teacher, run on the CPU: the de-quantised torch model
    scores like the float teacher the int8 file was made from, and like the ONNX file."""
    monkeypatch.setattr(teacher_module, "MAX_DEQUANTIZED_DEVIATION", TINY_DEVIATION)
    spec, float_folder = int8_teacher
    assert isinstance(load_teacher(spec, device="cpu"), OnnxCrossEncoder)  # CPUs keep ONNX
    dequantized = DequantizedCrossEncoder(spec, device="cpu")
    assert isinstance(dequantized.model, torch.nn.Module)
    scores = dequantized.score(PAIRS, batch_size=4)
    original = TorchCrossEncoder(ModelSpec.read(float_folder), device="cpu").score(PAIRS)
    onnx = OnnxCrossEncoder(spec).score(PAIRS, batch_size=4)
    spread = float(np.ptp(original))
    assert spread > 0
    # Weights rounded to int8 only: closer to the float original than onnxruntime's int8 run,
    # which rounds the activations too.
    assert np.abs(scores - original).max() < 0.25 * spread
    assert np.abs(scores - original).max() < np.abs(onnx - original).max()
    assert np.corrcoef(scores, original)[0, 1] > 0.99


def test_dequantized_teacher_refuses_weights_that_score_otherwise(
    int8_teacher: tuple[ModelSpec, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mis-mapped weight (here the classifier's sign) fails the check against ONNX at load."""
    monkeypatch.setattr(teacher_module, "MAX_DEQUANTIZED_DEVIATION", TINY_DEVIATION)
    from ml_core import provision

    real = provision.dequantized_bert_state_dict

    def flipped(graph: provision.OnnxGraph) -> dict[str, np.ndarray]:
        state = real(graph)
        state["classifier.weight"] = -state["classifier.weight"]
        return state

    monkeypatch.setattr(provision, "dequantized_bert_state_dict", flipped)
    with pytest.raises(ValueError, match="scores unlike its ONNX original"):
        DequantizedCrossEncoder(int8_teacher[0], device="cpu")


def test_only_a_bert_config_enables_the_dequantized_path(
    int8_teacher: tuple[ModelSpec, Path], tmp_path: Path,
) -> None:
    folder = int8_teacher[0].folder
    assert teacher_module._is_bert(folder)
    assert not teacher_module._is_bert(tmp_path)  # no config.json: ONNX on the CPU
    (tmp_path / "config.json").write_text('{"model_type": "xlm-roberta"}')
    assert not teacher_module._is_bert(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onnx_teacher_runs_dequantized_on_cuda(
    int8_teacher: tuple[ModelSpec, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(teacher_module, "MAX_DEQUANTIZED_DEVIATION", TINY_DEVIATION)
    spec = int8_teacher[0]
    teacher = load_teacher(spec)
    assert isinstance(teacher, DequantizedCrossEncoder) and teacher.device == "cuda"
    assert next(teacher.model.parameters()).is_cuda
    np.testing.assert_allclose(teacher.score(PAIRS, batch_size=4),
                               DequantizedCrossEncoder(spec, device="cpu").score(PAIRS),
                               atol=1e-4)


REAL_TEACHER = REPO_ROOT / "var" / "models" / "ms-marco-minilm-l12"


@pytest.mark.skipif(not (REAL_TEACHER / "tailor-model.json").is_file(),
                    reason="the provisioned int8 teacher (the tiny ONNX teacher runs in every "
                           "suite); run `python -m ml_core "
                           "provision` first")
def test_onnx_teacher_on_provisioned_model(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = load_teacher(ModelRegistry(REAL_TEACHER.parent).get(REAL_TEACHER.name),
                           device="cpu")  # on CUDA the default teacher runs de-quantised
    assert isinstance(teacher, OnnxCrossEncoder)
    widths: list[int] = []
    original = teacher._logits
    monkeypatch.setattr(teacher, "_logits",
                        lambda b: widths.append(b["input_ids"].shape[1]) or original(b))
    pairs = [("how is lift produced on a swept wing", PASSAGES[0]),
             ("how is lift produced on a swept wing", PASSAGES[2]),
             ("insulin resistance in mice", PASSAGES[2]),
             ("insulin resistance in mice", PASSAGES[0])]
    scores = teacher.score(pairs, batch_size=4)
    assert scores[0] > scores[1] and scores[2] > scores[3]
    assert max(widths) < 40  # not padded to the 512 that its tokenizer.json asks for
    # Same batch, shuffled input: same scores, returned in input order. (Across different batch
    # compositions int8 dynamic quantisation shifts logits a little, so compare within a batch.)
    permutation = [2, 0, 3, 1]
    shuffled = teacher.score([pairs[i] for i in permutation], batch_size=4)
    np.testing.assert_allclose(shuffled, scores[permutation], atol=1e-4)


@pytest.mark.skipif(not (REAL_TEACHER / "config.json").is_file(),
                    reason="the provisioned int8 teacher with its config.json; run `python -m "
                           "ml_core provision` first")
def test_dequantized_default_teacher(tmp_path: Path) -> None:
    """The default teacher de-quantised (its GPU path, run on the CPU) passes its own check,
    and the check catches a config with the wrong head count (24 instead of 12), whose logits
    still correlate 0.999 with the ONNX ones on the check pairs."""
    spec = ModelRegistry(REAL_TEACHER.parent).get(REAL_TEACHER.name)
    teacher = DequantizedCrossEncoder(spec, device="cpu")
    pairs = [("how is lift produced on a swept wing", PASSAGES[0]),
             ("how is lift produced on a swept wing", PASSAGES[2]),
             ("insulin resistance in mice", PASSAGES[2]),
             ("insulin resistance in mice", PASSAGES[0])]
    scores = teacher.score(pairs)
    assert scores[0] > scores[1] and scores[2] > scores[3]
    wrong = tmp_path / "wrong-heads"
    shutil.copytree(REAL_TEACHER, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_attention_heads": 24}))
    with pytest.raises(ValueError, match="scores unlike its ONNX original"):
        DequantizedCrossEncoder(ModelSpec.read(wrong), device="cpu")


def test_student_refuses_non_hf_spec(student: Student) -> None:
    with pytest.raises(ValueError, match="Hugging Face"):
        Student(student.model, student.tokenizer,
                student.spec.model_copy(update={"format": "onnx"}))


def test_student_load_from_folder_path(registry: ModelRegistry, student: Student) -> None:
    loaded = Student.load(Path(registry.path("tiny-student")))
    np.testing.assert_allclose(loaded.encode_queries(QUERIES), student.encode_queries(QUERIES),
                               atol=1e-6)
