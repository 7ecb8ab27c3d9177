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
    write_sentence_transformers_config(folder, spec, student.dim)
    exported = spec.model_copy(update={"path": ".", "dim": student.dim, "format": "hf",
                                       "role": "student", "folder": None})
    exported.model_copy(update={"sha256": folder_sha256(folder)}).write(folder)
    return folder


def write_sentence_transformers_config(folder: Path, spec: ModelSpec, dim: int) -> None:
    """The sentence-transformers files of a student folder whose encoder and tokenizer are at
    its root: modules, pooling, Normalize, max_seq_length (the passage limit Tailor encodes
    at) and the query/passage prompts, so SentenceTransformer(folder) embeds as Tailor does."""
    folder = Path(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _POOLING},
    ]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": spec.max_passage_length, "do_lower_case": False})
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
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


def complete_student_folder(folder: Path) -> bool:
    """Make a store's Hugging Face student folder a complete sentence-transformers folder
    (`write_sentence_transformers_config`) when its files are missing or disagree with its
    spec; records the new files' sha256 in the spec. Returns True when it wrote anything.

    Without these files SentenceTransformer (and Infinity) read a raw folder with their own
    defaults: 512 tokens where Tailor cuts at 256, so long passages got other vectors."""
    folder = Path(folder)
    spec = ModelSpec.read(folder)
    if spec.role != "student" or spec.format != "hf" or spec.path not in (".", ""):
        return False
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dim = int(spec.dim or config["hidden_size"])
    try:
        if spec_from_sentence_transformers(folder).model_dump(
                include=_FOLDER_FIELDS) == spec.model_dump(include=_FOLDER_FIELDS):
            return False
    except (ValueError, KeyError, OSError):
        pass  # missing or unreadable: write them
    write_sentence_transformers_config(folder, spec, dim)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    spec.model_copy(update={"sha256": folder_sha256(folder), "dim": dim}).write(folder)
    return True


# What the sentence-transformers files say about a student, compared with its spec.
_FOLDER_FIELDS = {"pooling", "normalize", "query_prefix", "passage_prefix", "max_passage_length"}


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


# --------------------------------------------------------------------------------------------
# Model card


_LICENCE_IDS = {"apache-2.0": "apache-2.0", "mit": "mit", "bsd-3-clause": "bsd-3-clause"}


def render_model_card(report: dict[str, Any], base: ModelSpec, *, name: str,
                      recipe: dict[str, Any] | None = None) -> str:
    """The README.md of a tuned model's download: what it was tuned from, how, how it scored
    (the evaluate stage's report.json: base, tuned, gain, significance, recommendation,
    warnings) and under which licence, with a front matter that model hubs read.

    `base` is the base model's spec (its licence and source), `name` the tuned model's id or
    name, `recipe` the job's recipe settings (teacher, query types, hyperparameters), if any."""
    from ml_core.report import report_lines

    licence = base.licence or "unknown"
    licence_id = _LICENCE_IDS.get(licence.lower(), "other")
    origin = base.source.split(" (")[0] if base.source else base.name
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags:", "- sentence-transformers", "- feature-extraction", "- dense-retrieval",
             f"base_model: {origin}", f"license: {licence_id}", "---", ""]
    lines = [
        f"# {name}",
        "",
        f"A dense retriever tuned by Tailor from **{base.name}** ({origin}) on a customer "
        "corpus: synthetic queries generated from the corpus, kept when a cross-encoder "
        "teacher ranks their source passage first, hard negatives mined, then listwise "
        "distillation from the teacher plus a small InfoNCE term.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        "model = SentenceTransformer(\"path/to/this/folder\")",
        "queries = model.encode([\"how is lift produced\"], prompt_name=\"query\")",
        "passages = model.encode([\"Lift is produced by ...\"], prompt_name=\"passage\")",
        "```",
        "",
        f"Pooling: {base.pooling}; normalised: {'yes' if base.normalize else 'no'}; inputs are "
        f"cut at {base.max_passage_length} tokens; query prompt {base.query_prefix!r}, passage "
        f"prompt {base.passage_prefix!r}. The same vectors as Tailor's `/v1/embed`.",
        "",
    ]
    if recipe:
        lines += ["## Recipe", ""]
        lines += [f"- {key}: `{json.dumps(value, sort_keys=True)}`"
                  for key, value in sorted(recipe.items()) if value not in (None, {}, [])]
        lines.append("")
    lines += ["## Evaluation", "", "```", *report_lines(report), "```", ""]
    if report.get("judgements") == "synthetic":
        lines += ["Scores are on held-out synthetic queries (no customer judgements).", ""]
    lines += [
        "## Licence",
        "",
        f"The base model's licence applies to these weights: {licence}.",
        "",
    ]
    return "\n".join(front + lines)


def write_model_card(folder: Path, report: dict[str, Any], base: ModelSpec, *, name: str,
                     recipe: dict[str, Any] | None = None) -> Path:
    """Write `render_model_card(...)` as `folder/README.md`; returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(report, base, name=name, recipe=recipe), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# ONNX


ONNX_FILE = "onnx/model.onnx"


def export_onnx(folder: Path, target: Path | None = None, opset: int = 17) -> Path:
    """Export a student folder's encoder to ONNX (default `folder/onnx/model.onnx`, where
    sentence-transformers' ONNX backend looks); returns the file.

    Inputs input_ids, attention_mask (and token_type_ids where the tokenizer makes them), all
    int64 [batch, tokens]; outputs `last_hidden_state` (what sentence-transformers pools) and
    `sentence_embedding` (pooled and normalised as the spec says: the vectors of /v1/embed, for
    onnxruntime alone). Verified against PyTorch on a sample batch (ValueError past 1e-4)."""
    import numpy as np
    import torch

    from ml_core.student import Student

    folder = Path(folder)
    target = Path(target) if target is not None else folder / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    student = Student.load(folder, device="cpu")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
             if n in student.tokenizer.model_input_names]
    sample = ["a short query", "a longer passage that pads the first input of this batch"]
    batch = student.tokenizer(student.encoding_texts(sample, "passage"), padding=True,
                              return_tensors="pt")
    inputs = tuple(batch[n] for n in names)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feeds = dict(zip(names, tensors, strict=True))
            hidden = self.student.model(**feeds).last_hidden_state
            return hidden, self.student.pool(hidden, feeds["attention_mask"])

    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    axes |= {"last_hidden_state": {0: "batch", 1: "tokens"}, "sentence_embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), inputs, str(target), input_names=names,
                          output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
        expected = student.encode_passages(sample)
    got = onnx_sentence_embeddings(target, {n: batch[n].numpy() for n in names})
    error = float(np.abs(got - expected).max())
    if error > 1e-4:
        raise ValueError(f"the ONNX export of {folder.name} differs from PyTorch by {error:.2e}")
    return target


def onnx_sentence_embeddings(path: Path, feeds: dict[str, Any]) -> Any:
    """float32 [batch, dim] `sentence_embedding` of an exported model for tokenized `feeds`."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    inputs = {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items() if k in wanted}
    return np.asarray(session.run(["sentence_embedding"], inputs)[0], dtype=np.float32)
