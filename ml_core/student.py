"""The student: a bi-encoder (Hugging Face encoder + pooling + prefixes + optional L2 norm).

One object serves both paths: `encode_queries` / `encode_passages` for retrieval (no grad,
batched, length-sorted, float32 numpy) and `forward_queries` / `forward_passages` for training
(differentiable tensors). Pooling and prefixes come from the model's spec, because getting either
wrong silently ruins results (recipe.md, Training).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ml_core.records import Passage, ProgressFn, no_progress
from ml_core.registry import SPEC_FILE, ModelSpec

Kind = Literal["query", "passage"]
Precision = Literal["fp32", "bf16"]
# CPU flags (/proc/cpuinfo) of instructions that compute bf16 matrix products natively.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX-BF16).

    `cpuinfo` is /proc/cpuinfo's text (read when None; False where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(_NATIVE_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def resolve_precision(wanted: str, device: str | torch.device = "cpu",
                      cpuinfo: str | None = None) -> Precision:
    """The precision to compute in (encoding, generation): "auto" is bf16 where `device`
    computes it natively (see `cpu_has_native_bf16`; CUDA devices that support bf16) and fp32
    elsewhere."""
    if wanted in ("fp32", "bf16"):
        return wanted  # type: ignore[return-value]
    if wanted != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {wanted!r}")
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"


# Torch threads this process asked for (`limit_threads`); TAILOR_TORCH_THREADS still wins.
_THREADS: int | None = None


def configure_threads() -> int:
    """Use every CPU this process may run on for torch (once), or what `limit_threads` or
    TAILOR_TORCH_THREADS asked for; returns the thread count."""
    if "TAILOR_TORCH_THREADS" in os.environ or torch.cuda.is_available():
        wanted = int(os.environ.get("TAILOR_TORCH_THREADS", torch.get_num_threads()))
    elif _THREADS is not None:
        wanted = _THREADS
    else:
        affinity = getattr(os, "sched_getaffinity", None)
        wanted = len(affinity(0)) if affinity else os.cpu_count()
    if wanted and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def limit_threads(threads: int) -> int:
    """Give torch `threads` intra-op threads in this process from now on (a server running
    several encoder threads side by side), unless TAILOR_TORCH_THREADS says otherwise."""
    global _THREADS
    _THREADS = max(1, threads)
    return configure_threads()


def passage_text(passage: Passage | str) -> str:
    """The text a passage is encoded as: "title text" (BEIR convention), or the text alone."""
    if isinstance(passage, str):
        return passage
    return f"{passage.title} {passage.text}" if passage.title else passage.text


def load_encoder(folder: Path) -> PreTrainedModel:
    """AutoModel from a local folder, without BERT's unused pooler head where the model has one.

    The pooler is dropped because sentence embeddings never use it and its parameters would get
    no gradient in training (which distributed data parallel rejects).
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the skipped pooler weights
    try:
        return AutoModel.from_pretrained(folder, add_pooling_layer=False)
    except TypeError:  # architectures without that option
        return AutoModel.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)


def freeze_lower_layers(model: nn.Module, train_layers: int) -> int:
    """Leave only the top `train_layers` transformer layers trainable: the embeddings and every
    layer below are frozen, so a few hundred queries cannot move the token embeddings of their
    own words away from the rest of the vocabulary. Returns the number of frozen layers."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"training.train_layers: cannot find the transformer layers of a "
                         f"{type(model).__name__} (a BERT-style encoder.layer list is needed)")
    frozen = max(0, len(layers) - train_layers)
    for module in (getattr(model, "embeddings", None), *layers[:frozen]):
        for param in module.parameters() if module is not None else ():
            param.requires_grad_(False)
    return frozen


class Student(nn.Module):
    """A bi-encoder student: encoder + tokenizer + the spec's pooling, prefixes and norm."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 spec: ModelSpec) -> None:
        super().__init__()
        if spec.format != "hf":
            raise ValueError(f"student {spec.name!r} must be a Hugging Face model: {spec.format}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        # The number format of `encode` (the inference path only; training is always fp32).
        # fp32 by default, so served and exported vectors agree exactly; the pipeline sets bf16
        # for whole-corpus encoding where the hardware has it (RecipeConfig.encode_precision).
        self.encode_precision: Precision = "fp32"

    @classmethod
    def load(cls, spec_or_folder: ModelSpec | Path | str, device: str | None = None) -> Student:
        """A Student from a registry spec, a folder with tailor-model.json, or a plain
        sentence-transformers folder (its pooling, Normalize and prompts are read)."""
        if isinstance(spec_or_folder, ModelSpec):
            spec = spec_or_folder
        else:
            folder = Path(spec_or_folder)
            if (folder / SPEC_FILE).is_file():
                spec = ModelSpec.read(folder)
            else:
                from ml_core.export import spec_from_sentence_transformers

                spec = spec_from_sentence_transformers(folder)
        configure_threads()
        weights = spec.weights
        model = load_encoder(weights)
        tokenizer = AutoTokenizer.from_pretrained(weights)
        student = cls(model, tokenizer, spec)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return student.to(device).eval()

    # -- properties -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live."""
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.config.hidden_size)

    @property
    def max_query_length(self) -> int:
        """The spec's query token limit (training default for queries)."""
        return self.spec.max_query_length

    @property
    def max_passage_length(self) -> int:
        """The spec's passage token limit (training default; chunk passages to this)."""
        return self.spec.max_passage_length

    @property
    def max_seq_length(self) -> int:
        """Token limit used when encoding (both kinds; the exported model has one limit too)."""
        return self.spec.max_passage_length

    def prefix(self, kind: Kind) -> str:
        """The spec's query or passage prefix."""
        return self.spec.query_prefix if kind == "query" else self.spec.passage_prefix

    def prefix_tokens(self, kind: Kind) -> int:
        """How many tokens the prefix takes (reserve these when chunking passages)."""
        prefix = self.prefix(kind).strip()
        return len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0

    # -- differentiable path (training) ----------------------------------------------------------

    def embed(self, texts: Sequence[str | Passage], kind: Kind,
              max_length: int | None = None) -> torch.Tensor:
        """Embeddings [n, dim] with gradients: prefix, tokenize (pad to longest), encode, pool,
        and L2-normalise when the spec says so."""
        if max_length is None:
            spec = self.spec
            max_length = spec.max_query_length if kind == "query" else spec.max_passage_length
        inputs = self.encoding_texts(texts, kind)
        batch = self.tokenizer(inputs, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()  # bf16 under autocast
        return self.pool(hidden, batch["attention_mask"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors from token states: mean over real tokens or the [CLS] state."""
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1) if self.spec.normalize else pooled

    def forward_queries(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Differentiable query embeddings (default limit: spec.max_query_length)."""
        return self.embed(texts, "query", max_length)

    def forward_passages(self, passages: Sequence[str | Passage],
                         max_length: int | None = None) -> torch.Tensor:
        """Differentiable passage embeddings (default limit: spec.max_passage_length)."""
        return self.embed(passages, "passage", max_length)

    def forward(self, texts: Sequence[str | Passage], kind: Kind = "passage",
                max_length: int | None = None) -> torch.Tensor:
        """Same as `embed`."""
        return self.embed(texts, kind, max_length)

    # -- inference path --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, texts: Sequence[str | Passage], kind: Kind, batch_size: int = 32,
               progress: ProgressFn | None = None) -> np.ndarray:
        """float32 [n, dim] embeddings in input order; batches sorted by length for speed.

        Truncates at `max_seq_length` for both kinds, exactly as the exported
        sentence-transformers model does. Computes under bf16 autocast when
        `encode_precision` is "bf16" (vectors are returned as float32 either way).
        """
        report = progress or no_progress
        was_training = self.training
        self.eval()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.encode_precision == "bf16")
        try:
            order = np.argsort([-len(passage_text(t)) for t in texts], kind="stable")
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                with autocast:
                    vectors = self.embed([texts[i] for i in index], kind, self.max_seq_length)
                out[index] = vectors.float().cpu().numpy()
                report(min(1.0, (start + len(index)) / len(texts)), f"encoded {kind}s")
        finally:
            self.train(was_training)
        return out

    def serving_tokenizer(self) -> Tokenizer:
        """A private copy of the fast tokenizer set up exactly as `encode` tokenizes (special
        tokens, cut at `max_seq_length`, no padding), for callers that tokenize once and encode
        the ids later (`encode_token_ids`); a copy because truncation settings are shared state.
        """
        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.enable_truncation(self.max_seq_length,
                                  direction=self.tokenizer.truncation_side)
        return backend

    def encoding_texts(self, texts: Sequence[str | Passage], kind: Kind) -> list[str]:
        """The strings `encode` tokenizes: the kind's prefix plus the text, stripped."""
        prefix = self.prefix(kind)
        return [(prefix + passage_text(t)).strip() for t in texts]

    @torch.inference_mode()
    def encode_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dim] for inputs already tokenized by `serving_tokenizer`, padded into one
        batch (send inputs of similar length together): the vectors `encode` gives their texts.
        """
        longest = max(len(row) for row in ids)
        input_ids = np.full((len(ids), longest), self.tokenizer.pad_token_id or 0, np.int64)
        mask = np.zeros((len(ids), longest), np.int64)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            batch["token_type_ids"] = np.zeros_like(input_ids)
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.encode_precision == "bf16")
        with autocast:
            hidden = self.model(**tensors).last_hidden_state.float()
            vectors = self.pool(hidden, tensors["attention_mask"])
        return vectors.float().cpu().numpy()

    def encode_queries(self, texts: Sequence[str], batch_size: int = 32,
                       progress: ProgressFn | None = None) -> np.ndarray:
        """float32 [n, dim] query embeddings (query prefix applied)."""
        return self.encode(texts, "query", batch_size, progress)

    def encode_passages(self, passages: Sequence[str | Passage], batch_size: int = 32,
                        progress: ProgressFn | None = None) -> np.ndarray:
        """float32 [n, dim] passage embeddings ("title text", passage prefix applied)."""
        return self.encode(passages, "passage", batch_size, progress)

    def save(self, folder: Path) -> Path:
        """Export as a sentence-transformers folder that Student.load also reads; returns it."""
        from ml_core.export import export_student

        return export_student(self, folder)
