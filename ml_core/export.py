"""Export a Student as a sentence-transformers folder, and read such folders back into a spec.

The folder is the classic sentence-transformers layout (loaded by sentence-transformers 2.x to
6.x): the encoder and tokenizer at the root, `modules.json`, `sentence_bert_config.json`,
`1_Pooling/config.json`, `2_Normalize/` when embeddings are normalised, and
`config_sentence_transformers.json` whose prompts carry the query and passage prefixes, so
`SentenceTransformer(folder).encode(texts, prompt_name="query")` reproduces
`Student.encode_queries` exactly. A `tailor-model.json` makes `Student.load(folder)` work too.
Wrong pooling in exported models is a common complaint about peer tools (recipe.md); the test
suite checks the round trip vector for vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_core.registry import SPEC_FILE, ModelSpec, folder_sha256

if TYPE_CHECKING:
    from ml_core.student import Student

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_student(student: Student, folder: Path) -> Path:
    """Write `student` as a sentence-transformers folder (plus tailor-model.json); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = student.spec
    student.model.save_pretrained(folder, safe_serialization=True)
    student.tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _POOLING},
    ]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": student.max_seq_length, "do_lower_case": False})
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": student.dim,
        "pooling_mode_cls_token": spec.pooling == "cls",
        "pooling_mode_mean_tokens": spec.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": {"query": spec.query_prefix, "passage": spec.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if spec.normalize else "dot",
    })
    exported = spec.model_copy(update={"path": ".", "dim": student.dim, "format": "hf",
                                       "role": "student", "folder": None})
    exported.model_copy(update={"sha256": folder_sha256(folder)}).write(folder)
    return folder


def spec_from_sentence_transformers(folder: Path, name: str | None = None) -> ModelSpec:
    """A student ModelSpec read from a sentence-transformers folder (e.g. a customer upload).

    Reads modules.json (Transformer path, Pooling, Normalize), the pooling config (mean or CLS;
    others are refused), the prompts ("query", and "passage" or "document") and max_seq_length.
    Raises ValueError when the folder is not a usable sentence-transformers model.
    """
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise ValueError(f"{folder} has neither {SPEC_FILE} nor modules.json")
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    by_kind = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    if "Transformer" not in by_kind or "Pooling" not in by_kind:
        raise ValueError(f"{folder}/modules.json needs a Transformer and a Pooling module")
    transformer_path = by_kind["Transformer"].get("path") or "."
    pooling = _read_pooling(folder / by_kind["Pooling"]["path"] / "config.json")
    config = _read_optional(folder / "config_sentence_transformers.json")
    prompts = config.get("prompts") or {}
    bert_config = _read_optional(folder / transformer_path / "sentence_bert_config.json") or \
        _read_optional(folder / "sentence_bert_config.json")
    max_length = int(bert_config.get("max_seq_length") or 512)
    return ModelSpec(
        name=name or folder.name, role="student", format="hf", path=transformer_path,
        pooling=pooling, normalize="Normalize" in by_kind,
        query_prefix=prompts.get("query", ""),
        passage_prefix=prompts.get("passage", prompts.get("document", "")),
        max_query_length=min(64, max_length), max_passage_length=max_length,
        source=f"sentence-transformers folder {folder.name}",
    ).model_copy(update={"folder": folder.resolve()})


def _read_optional(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_pooling(path: Path) -> str:
    config = _read_optional(path)
    mode = config.get("pooling_mode")  # sentence-transformers >= 6
    if mode is None:
        modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
        mode = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}.get(
            modes[0] if len(modes) == 1 else "", None)
    if mode not in ("mean", "cls"):
        raise ValueError(f"{path}: unsupported pooling {config!r}; Tailor supports mean or cls")
    return mode
