"""The teacher: a cross-encoder that scores (query, passage) pairs, on torch or onnxruntime.

The teacher is the CPU bottleneck (models.md), so both backends share the batching that made it
usable: pairs are sorted by length so each batch pads only to its own longest pair (the ONNX
tokenizer.json pads every pair to 512 unless told otherwise), truncated to 512 tokens, and the
scores are returned in input order.

On a GPU an int8 ONNX BERT cross-encoder (the default teacher) runs de-quantised on torch:
onnxruntime's CPU build would leave the GPU idle while the worker's CPUs score every pair.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ml_core.records import ProgressFn, no_progress
from ml_core.registry import ModelRegistry, ModelSpec
from ml_core.student import configure_threads

MAX_PAIR_TOKENS = 512
# A de-quantised teacher must score like its ONNX original: on CHECK_PAIRS at load, no logit
# may differ by more than this share of the ONNX logits' range: int8 rounding alone stays well
# under it, a wrong head count in the config (which still correlates) lands well over it.
MAX_DEQUANTIZED_DEVIATION = 0.03
CHECK_PAIRS = (
    ("how is lift produced on a swept wing",
     "Lift on a swept wing depends on the component of the flow normal to the leading edge."),
    ("how is lift produced on a swept wing",
     "Insulin resistance in obese mice was reversed by a change of diet."),
    ("insulin resistance in mice", "Insulin resistance in obese mice was reversed by a change "
     "of diet."),
    ("insulin resistance in mice", "The boundary layer on a flat plate thickens downstream."),
    ("boundary layer thickness on a flat plate",
     "The boundary layer on a flat plate thickens downstream as the square root of distance."),
    ("boundary layer thickness on a flat plate", "Heat transfer rises at high Mach numbers."),
    ("does vitamin D prevent fractures", "Vitamin D supplements did not reduce fractures in "
     "older adults living at home."),
    ("does vitamin D prevent fractures", "Shock waves form where the flow turns supersonic."),
)

log = logging.getLogger(__name__)


class Teacher(ABC):
    """Scores (query, passage) pairs; higher means more relevant (raw logits)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.folder)
        # tokenizer.json files exported for ONNX often fix padding at 512: pad per batch instead.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            backend.no_padding()
            backend.no_truncation()
        self.max_length = min(MAX_PAIR_TOKENS, spec.max_passage_length)

    @property
    def name(self) -> str:
        """The model's registry name."""
        return self.spec.name

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
              progress: ProgressFn | None = None) -> np.ndarray:
        """float32 [n] scores for (query, passage) pairs, in input order.

        Batches hold pairs of similar length (longest first), padded to the batch's longest and
        truncated to 512 tokens (longest side first). `progress` gets the fraction done; it may
        raise to cancel.
        """
        report = progress or no_progress
        scores = np.zeros(len(pairs), dtype=np.float32)
        order = np.argsort([-(len(q) + len(p)) for q, p in pairs], kind="stable")
        for start in range(0, len(pairs), batch_size):
            index = order[start:start + batch_size]
            batch = self.tokenizer([pairs[i][0] for i in index], [pairs[i][1] for i in index],
                                   padding="longest", truncation="longest_first",
                                   max_length=self.max_length, return_tensors="np")
            scores[index] = self._logits(dict(batch))
            report(min(1.0, (start + len(index)) / len(pairs)), "teacher scored pairs")
        return scores

    @abstractmethod
    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Relevance logits [batch] for one tokenized batch."""


class TorchCrossEncoder(Teacher):
    """A Hugging Face sequence-classification cross-encoder (one logit) on torch."""

    def __init__(self, spec: ModelSpec, device: str | None = None) -> None:
        super().__init__(spec)
        configure_threads()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self._load().to(self.device).eval()

    def _load(self) -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(self.spec.weights)

    @torch.no_grad()
    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
        return self.model(**inputs).logits[:, 0].float().cpu().numpy()


def cpu_onnx_session(spec: ModelSpec, threads: int | None = None) -> tuple[Any, list[str]]:
    """An onnxruntime CPU session of the spec's graph (intra-op threads: `threads`, else the
    process's torch threads; one inter-op thread) and its input names."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or configure_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(spec.weights), options, providers=["CPUExecutionProvider"])
    return session, [i.name for i in session.get_inputs()]


class OnnxCrossEncoder(Teacher):
    """An ONNX cross-encoder on onnxruntime (inputs input_ids, attention_mask[, token_type_ids];
    output logits [batch, 1] or [batch])."""

    def __init__(self, spec: ModelSpec, threads: int | None = None) -> None:
        super().__init__(spec)
        self.session, self.input_names = cpu_onnx_session(spec, threads)

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: batch[name].astype(np.int64) for name in self.input_names if name in batch}
        if "token_type_ids" in self.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        logits = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        return logits[:, 0] if logits.ndim == 2 else logits


class DequantizedCrossEncoder(TorchCrossEncoder):
    """An int8 ONNX BERT cross-encoder (onnxruntime's quantize_dynamic) de-quantised into a float
    BertForSequenceClassification on torch; the folder's config.json gives the architecture.

    Loading raises ProvisionError when the weights do not fit the config's model, and checks the
    float model against onnxruntime on CHECK_PAIRS: ValueError when a logit deviates by more
    than MAX_DEQUANTIZED_DEVIATION of their range.
    """

    def _load(self) -> torch.nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        from ml_core.provision import load_dequantized

        config = BertConfig.from_pretrained(self.spec.folder, num_labels=1)
        model = BertForSequenceClassification(config).eval()
        load_dequantized(model, self.spec.weights)
        batch = dict(self.tokenizer([q for q, _ in CHECK_PAIRS], [p for _, p in CHECK_PAIRS],
                                    padding="longest", return_tensors="np"))
        with torch.no_grad():
            ours = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits[:, 0]
        reference = OnnxCrossEncoder(self.spec, threads=1)._logits(batch)
        deviation = float(np.abs(ours.numpy() - reference).max()
                          / max(float(np.ptp(reference)), 1e-6))
        if not deviation <= MAX_DEQUANTIZED_DEVIATION:
            raise ValueError(f"teacher {self.spec.name!r}: the de-quantised model scores unlike "
                             f"its ONNX original (on the check pairs a logit differs by "
                             f"{deviation:.3f} of their range; at most "
                             f"{MAX_DEQUANTIZED_DEVIATION})")
        log.info("teacher %s de-quantised for %s: logits within %.4f of the ONNX range",
                 self.spec.name, self.device, deviation)
        return model


def load_teacher(spec: ModelSpec | str, registry: ModelRegistry | None = None,
                 device: str | None = None) -> Teacher:
    """The teacher backend for the spec's format: "hf" on torch, "onnx" on onnxruntime; a spec
    with scoring "late_interaction" gets ml_core.late_interaction's scorer.

    `spec` may be a model name, looked up in `registry` (the default store when None). `device`
    defaults to CUDA when there is one. On CUDA an ONNX teacher whose folder has a BERT
    config.json (the default teacher's has) runs de-quantised on torch instead.
    """
    if isinstance(spec, str):
        spec = (registry or ModelRegistry()).get(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.scoring == "late_interaction":
        from ml_core.late_interaction import load_late_interaction

        return load_late_interaction(spec, device)
    if spec.format == "hf":
        return TorchCrossEncoder(spec, device)
    if spec.format == "onnx":
        if torch.device(device).type == "cuda" and _is_bert(spec.folder):
            return DequantizedCrossEncoder(spec, device)
        return OnnxCrossEncoder(spec)
    raise ValueError(f"teacher {spec.name!r} has format {spec.format!r}; expected 'hf' or 'onnx'")


def _is_bert(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == "bert"
    except (OSError, ValueError):
        return False
