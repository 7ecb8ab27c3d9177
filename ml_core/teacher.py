"""The teacher: a cross-encoder that scores (query, passage) pairs, on torch or onnxruntime.

The teacher is the CPU bottleneck (models.md), so both backends share the batching that made it
usable: pairs are sorted by length so each batch pads only to its own longest pair (the ONNX
tokenizer.json pads every pair to 512 unless told otherwise), truncated to 512 tokens, and the
scores are returned in input order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ml_core.records import ProgressFn, no_progress
from ml_core.registry import ModelRegistry, ModelSpec
from ml_core.student import configure_threads

MAX_PAIR_TOKENS = 512


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
        model = AutoModelForSequenceClassification.from_pretrained(spec.weights)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
        return self.model(**inputs).logits[:, 0].float().cpu().numpy()


class OnnxCrossEncoder(Teacher):
    """An ONNX cross-encoder on onnxruntime (inputs input_ids, attention_mask[, token_type_ids];
    output logits [batch, 1] or [batch])."""

    def __init__(self, spec: ModelSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(spec)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or configure_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(spec.weights), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: batch[name].astype(np.int64) for name in self.input_names if name in batch}
        if "token_type_ids" in self.input_names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        logits = np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)
        return logits[:, 0] if logits.ndim == 2 else logits


def load_teacher(spec: ModelSpec | str, registry: ModelRegistry | None = None) -> Teacher:
    """The teacher backend for the spec's format: "hf" on torch, "onnx" on onnxruntime.

    `spec` may be a model name, looked up in `registry` (the default store when None).
    """
    if isinstance(spec, str):
        spec = (registry or ModelRegistry()).get(spec)
    if spec.format == "hf":
        return TorchCrossEncoder(spec)
    if spec.format == "onnx":
        return OnnxCrossEncoder(spec)
    raise ValueError(f"teacher {spec.name!r} has format {spec.format!r}; expected 'hf' or 'onnx'")
