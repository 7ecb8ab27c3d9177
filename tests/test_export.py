"""Exported students load in sentence-transformers (offline) and reproduce Student vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from ml_core.export import export_student, spec_from_sentence_transformers
from ml_core.registry import SPEC_FILE, ModelRegistry, verify_files
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
