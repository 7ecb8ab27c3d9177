"""The model registry over the tiny store: specs, paths, listing and registering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_core.registry import SPEC_FILE, ModelRegistry, ModelSpec, default_store, verify_files


def test_tiny_store_specs_are_readable(registry: ModelRegistry) -> None:
    assert registry.names() == ["tiny-generator", "tiny-student", "tiny-teacher"]
    student = registry.get("tiny-student")
    assert (student.role, student.pooling, student.query_prefix, student.dim) == (
        "student", "mean", "query: ", 32)
    assert registry.path("tiny-student") == registry.store.resolve() / "tiny-student"
    assert [s.name for s in registry.list(role="teacher")] == ["tiny-teacher"]
    assert verify_files(student) == []


def test_unknown_model_names_the_known_ones(registry: ModelRegistry) -> None:
    with pytest.raises(KeyError, match="tiny-student"):
        registry.get("no-such-model")


def test_spec_file_does_not_store_the_folder(registry: ModelRegistry) -> None:
    data = json.loads((registry.store / "tiny-teacher" / SPEC_FILE).read_text())
    assert "folder" not in data
    assert data["role"] == "teacher"


def test_register_copies_a_folder_in(registry: ModelRegistry, tmp_path: Path) -> None:
    local = ModelRegistry(tmp_path / "store")
    spec = registry.get("tiny-student")
    registered = local.register("customer-model", spec.folder, spec)
    assert registered.name == "customer-model"
    assert local.get("customer-model").folder == (tmp_path / "store" / "customer-model").resolve()
    assert (local.path("customer-model") / "model.safetensors").is_file()
    assert verify_files(local.get("customer-model")) == []


def test_tampered_file_fails_verification(registry: ModelRegistry, tmp_path: Path) -> None:
    local = ModelRegistry(tmp_path / "store")
    spec = local.register("copy", registry.get("tiny-teacher").folder, registry.get("tiny-teacher"))
    (spec.folder / "vocab.txt").write_text("tampered\n")
    assert verify_files(local.get("copy")) == ["copy: sha256 mismatch for vocab.txt"]


def test_default_store_follows_env(model_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_store() == model_store
    monkeypatch.delenv("TAILOR_MODEL_STORE")
    assert default_store().parts[-2:] == ("var", "models")


def test_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError):
        ModelSpec.model_validate({"name": "x", "role": "student", "poolng": "cls"})
