"""Adding an operator's own model to the store (`python -m ml_core add`): formats found, specs
read from the model's own files, the load check, and refusals that leave the store as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig

from app.jobs.recipe import check_models
from ml_core.config import build_config
from ml_core.export import write_sentence_transformers_config
from ml_core.model_import import ModelImportError, ModelOptions, add_model
from ml_core.registry import SPEC_FILE, ModelRegistry, verify_files
from ml_core.teacher import load_teacher


def _bare_copy(folder: Path, dest: Path) -> Path:
    """The model's files without Tailor's spec, as weights arrive from elsewhere."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(SPEC_FILE))
    return dest


def _store_is_clean(store: Path, *names: str) -> None:
    """The store holds exactly `names` (nothing staged, nothing half-copied)."""
    present = sorted(p.name for p in store.iterdir()) if store.exists() else []
    assert present == sorted(names)


def test_a_cross_encoder_folder_becomes_a_teacher_jobs_can_name(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-teacher").folder, tmp_path / "reranker")
    # A hub snapshot also carries weights for other runtimes: not copied.
    (source / "onnx").mkdir()
    (source / "onnx" / "model.onnx").write_bytes(b"not for torch")
    (source / "tf_model.h5").write_bytes(b"not for torch")
    store = tmp_path / "store"
    added = add_model(source, "strong-reranker", "teacher", store,
                      ModelOptions(licence="apache-2.0", source="our mirror"))
    spec = added.spec
    assert (spec.role, spec.format, spec.path, spec.scoring) == (
        "teacher", "hf", ".", "cross_encoder")
    assert (spec.licence, spec.source, spec.max_passage_length) == ("apache-2.0", "our mirror", 512)
    assert spec.folder == (store / "strong-reranker").resolve()
    assert verify_files(spec) == [] and "model.safetensors" in spec.sha256
    assert not {"tf_model.h5", "onnx/model.onnx"} & set(spec.sha256)
    # The check ran the model on the four check queries' pairs and reported their order.
    assert added.check["check_queries"] == 4 and 0 <= added.check["ordered"] <= 4
    assert len(added.check["scores"]) == 8
    # The stored teacher scores as the source does, and a job spec may name it.
    local = ModelRegistry(store)
    scores = load_teacher("strong-reranker", local).score([("lift on a wing", "swept wing")])
    original = load_teacher(registry.get("tiny-teacher")).score([("lift on a wing", "swept wing")])
    assert scores.tolist() == pytest.approx(original.tolist(), abs=1e-6)
    shutil.copytree(registry.get("tiny-student").folder, store / "tiny-student")
    shutil.copytree(registry.get("tiny-generator").folder, store / "tiny-generator")
    check_models(build_config(overrides={"student": "tiny-student", "teacher": "strong-reranker",
                                         "generator": "tiny-generator"}), local)
    _store_is_clean(store, "strong-reranker", "tiny-student", "tiny-generator")


def test_a_classifier_with_two_labels_is_refused_naming_the_field(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-teacher").folder, tmp_path / "classifier")
    config = json.loads((source / "config.json").read_text())
    config["id2label"] = {"0": "not_relevant", "1": "relevant"}
    config["label2id"] = {"not_relevant": 0, "relevant": 1}
    (source / "config.json").write_text(json.dumps(config))
    assert BertConfig.from_pretrained(source).num_labels == 2
    store = tmp_path / "store"
    with pytest.raises(ModelImportError, match=r"config\.json: num_labels is 2"):
        add_model(source, "classifier", "teacher", store)
    assert not (store / "classifier").exists()
    _store_is_clean(store)


def test_an_onnx_graph_is_added_with_its_tokenizer_and_not_its_siblings(
        registry: ModelRegistry, tmp_path: Path) -> None:
    from tests.tiny_models import build_onnx_teacher

    folder = tmp_path / "onnx"
    build_onnx_teacher(registry.get("tiny-teacher").folder, folder)
    (folder / SPEC_FILE).unlink()
    (folder / "model_quantized.onnx").write_bytes(b"another quantisation, not wanted")
    with pytest.raises(ModelImportError, match="holds 2 .onnx files"):
        add_model(folder, "onnx-reranker", "teacher", tmp_path / "store")
    added = add_model(folder / "model.onnx", "onnx-reranker", "teacher", tmp_path / "store")
    assert (added.spec.format, added.spec.path) == ("onnx", "model.onnx")
    stored = sorted(p.name for p in added.spec.folder.iterdir())
    assert "model_quantized.onnx" not in stored and "tokenizer.json" in stored
    hf = add_model(_bare_copy(registry.get("tiny-teacher").folder, tmp_path / "hf"),
                   "hf-reranker", "teacher", tmp_path / "store")
    assert added.check["scores"] == pytest.approx(hf.check["scores"], abs=1e-3)


def test_a_student_takes_pooling_and_prefixes_from_its_sentence_transformers_files(
        registry: ModelRegistry, tmp_path: Path) -> None:
    tiny = registry.get("tiny-student")
    source = _bare_copy(tiny.folder, tmp_path / "student")
    write_sentence_transformers_config(source, tiny.model_copy(update={
        "pooling": "cls", "query_prefix": "search: ", "passage_prefix": "doc: "}), 32)
    added = add_model(source, "my-student", "student", tmp_path / "store")
    spec = added.spec
    assert (spec.pooling, spec.normalize, spec.query_prefix, spec.passage_prefix) == (
        "cls", True, "search: ", "doc: ")
    assert (spec.dim, added.check["dim"]) == (32, 32)
    # The command line overrides what the files say.
    over = add_model(source, "my-student-mean", "student", tmp_path / "store",
                     ModelOptions(pooling="mean", query_prefix=""))
    assert (over.spec.pooling, over.spec.query_prefix) == ("mean", "")
    assert verify_files(over.spec) == []


def test_a_student_without_pooling_said_anywhere_is_refused(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = tmp_path / "raw"
    source.mkdir()
    for path in registry.get("tiny-student").folder.iterdir():
        if path.name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(path, source / path.name)
    store = tmp_path / "store"
    with pytest.raises(ModelImportError, match="pass --pooling mean or --pooling cls"):
        add_model(source, "raw-student", "student", store)
    _store_is_clean(store)
    added = add_model(source, "raw-student", "student", store,
                      ModelOptions(pooling="mean", query_prefix="query: "))
    assert (added.spec.pooling, added.spec.query_prefix, added.spec.dim) == ("mean", "query: ", 32)
    # Stored as a complete sentence-transformers folder, as provisioned students are.
    assert (added.spec.folder / "modules.json").is_file()


def test_names_roles_and_existing_models_are_checked_before_anything_is_copied(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-teacher").folder, tmp_path / "reranker")
    store = tmp_path / "store"
    with pytest.raises(ModelImportError, match="lowercase letters"):
        add_model(source, "Strong Reranker", "teacher", store)
    with pytest.raises(ModelImportError, match="catalogue model.*provision ms-marco-minilm-l12"):
        add_model(source, "ms-marco-minilm-l12", "teacher", store)
    with pytest.raises(ModelImportError, match="no such file or folder"):
        add_model(tmp_path / "missing", "x", "teacher", store)
    with pytest.raises(ModelImportError, match="--pooling.*are for students"):
        add_model(source, "x", "teacher", store, ModelOptions(pooling="cls"))
    with pytest.raises(ModelImportError, match="an ONNX graph cannot generate"):
        add_model(_onnx_only(tmp_path), "g", "generator", store)
    _store_is_clean(store)
    first = add_model(source, "reranker", "teacher", store)
    with pytest.raises(ModelImportError, match="already in .*--replace"):
        add_model(source, "reranker", "teacher", store)
    again = add_model(source, "reranker", "teacher", store, replace=True)
    assert again.spec.sha256 == first.spec.sha256


def _onnx_only(tmp_path: Path) -> Path:
    folder = tmp_path / "onnx-only"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not read: the role is refused first")
    return folder / "model.onnx"


def test_a_model_that_cannot_load_leaves_the_stored_one_in_place(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-teacher").folder, tmp_path / "reranker")
    store = tmp_path / "store"
    good = add_model(source, "reranker", "teacher", store)
    config = json.loads((source / "config.json").read_text())
    config["hidden_size"] = 48  # the weights are 32 wide
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="cannot load and run it as a teacher"):
        add_model(source, "reranker", "teacher", store, replace=True)
    kept = ModelRegistry(store).get("reranker")
    assert kept.sha256 == good.spec.sha256 and verify_files(kept) == []
    _store_is_clean(store, "reranker")


def test_a_generator_folder_is_added_with_its_chat_template(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-generator").folder, tmp_path / "llm")
    added = add_model(source, "my-llm", "generator", tmp_path / "store")
    assert (added.spec.role, added.spec.format, added.check) == (
        "generator", "hf", {"chat_template": True})


def test_the_command_adds_prints_and_lists_the_model(
        registry: ModelRegistry, tmp_path: Path) -> None:
    source = _bare_copy(registry.get("tiny-teacher").folder, tmp_path / "reranker")
    store = tmp_path / "store"
    run = subprocess.run(
        [sys.executable, "-m", "ml_core", "add", "strong-reranker", "--role", "teacher",
         "--from", str(source), "--store", str(store), "--licence", "apache-2.0"],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert (printed["name"], printed["role"], printed["format"], printed["scoring"]) == (
        "strong-reranker", "teacher", "hf", "cross_encoder")
    assert printed["check"]["check_queries"] == 4
    listed = subprocess.run([sys.executable, "-m", "ml_core", "models", "--store", str(store)],
                            capture_output=True, text=True, timeout=120, check=True)
    assert listed.stdout.split()[:4] == ["strong-reranker", "teacher", "hf", "apache-2.0"]
    refused = subprocess.run(
        [sys.executable, "-m", "ml_core", "add", "strong-reranker", "--role", "teacher",
         "--from", str(source), "--store", str(store)],
        capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 1
    assert "already in" in refused.stderr and "--replace" in refused.stderr
