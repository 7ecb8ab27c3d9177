"""A late-interaction (ColBERT) teacher: query and passage encoded apart, scored by MaxSim.

Scoring follows ColBERT (Khattab and Zaharia 2020) as answerai-colbert-small-v1 was trained:

- query: `[CLS] [unused0] tokens [SEP]`, padded with `[MASK]` to QUERY_TOKENS tokens; the
  `[MASK]` positions are not attended to (colbert-ai's default, attend_to_mask_tokens=False)
  but their vectors score, as learned query expansion. Attending to them scored worse as a
  teacher on both development datasets (docs/benchmarks.md, "Late-interaction teacher, query
  masks unattended");
- passage: `[CLS] [unused1] tokens [SEP]`, at most the spec's max_passage_length tokens;
- every token vector (output 0 of the graph, the encoder's last hidden states) is L2-normalised
  over all its dimensions; score = sum over query tokens of the best dot product with any
  passage token.

The catalogued int8 ONNX graph has no 384->96 projection (the published checkpoint's last
layer), so the vectors are the full 384-d hidden states; cutting them to a prefix would score
a different model.

Unlike a cross-encoder, a passage's token vectors do not depend on the query: each distinct
passage in a score() call is encoded once, however many queries it is paired with, and an extra
(query, passage) pair costs a [32 x tokens] matrix product. Encoded passages are kept across
calls in a bounded cache (PassageCache), so the filter's second round, the evaluation's teacher
check and reranking reuse them.

Backends: onnxruntime on CPU; on a GPU the int8 graph is de-quantised into a float BertModel on
torch and checked against onnxruntime at load, as the cross-encoder is (ml_core.teacher).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ml_core.records import ProgressFn, no_progress
from ml_core.registry import ModelSpec
from ml_core.student import configure_threads
from ml_core.teacher import CHECK_PAIRS, Teacher, cpu_onnx_session

QUERY_TOKENS = 32
QUERY_MARKER = "[unused0]"
PASSAGE_MARKER = "[unused1]"
# Texts per forward pass on torch (length-sorted, so each batch pads to its own longest). The
# int8 graph on onnxruntime gets one text per pass: its dynamic quantisation scales activations
# by the whole batch's range, so a batch (and its padding) would change every member's vectors,
# and one at a time, unpadded, measured 2.3x faster on one thread than batches of 16 (48 SciFact
# abstracts, on a shared machine).
ENCODE_BATCH = 16
# fp16 token vectors kept across score() calls: 512 MiB holds ~2,300 passages of 300 tokens.
DEFAULT_CACHE_BYTES = 512 * 2**20
# A de-quantised encoder must agree with onnxruntime on CHECK_PAIRS at load: every passage
# token vector within this cosine, every score within this much per query token. The real
# model measured 0.994 and 0.004; with 6 heads in place of 12, 0.59 and 0.15.
MIN_TOKEN_COSINE = 0.98
MAX_TOKEN_DEVIATION = 0.04

log = logging.getLogger(__name__)


class PassageCache:
    """Least-recently-used passage token vectors, bounded by bytes.

    Memory: at most `max_bytes` of fp16 arrays ([tokens, dim], 2 bytes a number) plus a 16-byte
    key per entry; a passage larger than the whole budget is not kept. Keys are digests of the
    passage text, so the cache holds no texts. Thread-safe (the rerank service scores from
    several threads).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            vectors = self._entries.get(key)
            if vectors is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return vectors

    def put(self, key: bytes, vectors: np.ndarray) -> None:
        with self._lock:
            if key in self._entries or vectors.nbytes > self.max_bytes:
                return
            self._entries[key] = vectors
            self.bytes += vectors.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


def maxsim(query: np.ndarray, passage: np.ndarray) -> float:
    """ColBERT's score of one pair: sum over query tokens of the best dot product with a
    passage token (both [tokens, dim], rows L2-normalised)."""
    return float((query @ passage.astype(np.float32).T).max(axis=1).sum())


def _normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class LateInteractionTeacher(Teacher):
    """Scores (query, passage) pairs by ColBERT MaxSim (see the module doc); a Teacher, so the
    filter, the teacher check, the benchmarks and the rerank route take it as they take a
    cross-encoder. Subclasses provide `_hidden` (the encoder's last hidden states).

    Memory is bounded by: the passage cache (at most `cache_bytes` of fp16 vectors, see
    PassageCache); one chunk of freshly encoded passages (`batch_size` of them); and the
    current call's query vectors (QUERY_TOKENS x dim float32 per distinct query: 48 KiB at 384
    dims, 48 MiB for 1,000 queries), freed when the call returns.
    """

    def __init__(self, spec: ModelSpec, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(spec)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (QUERY_MARKER, PASSAGE_MARKER) if t not in vocab]
        if missing or self.tokenizer.mask_token_id is None:
            raise ValueError(f"teacher {spec.name!r}: its vocabulary lacks the late-interaction "
                             f"markers {missing or ['[MASK]']}")
        self.query_marker = vocab[QUERY_MARKER]
        self.passage_marker = vocab[PASSAGE_MARKER]
        self.query_tokens = QUERY_TOKENS
        self.passage_tokens = spec.max_passage_length
        self.cache = PassageCache(cache_bytes)
        self.encode_batch = ENCODE_BATCH

    # -- token ids -------------------------------------------------------------------------

    def _ids(self, text: str, marker: int, limit: int) -> list[int]:
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"][: limit - 3]
        return [self.tokenizer.cls_token_id, marker, *body, self.tokenizer.sep_token_id]

    def query_ids(self, text: str) -> list[int]:
        """`[CLS] [unused0] tokens [SEP]` padded with `[MASK]` to QUERY_TOKENS (the padding is
        encoded and scores, unattended: _encode)."""
        ids = self._ids(text, self.query_marker, self.query_tokens)
        return ids + [self.tokenizer.mask_token_id] * (self.query_tokens - len(ids))

    def passage_ids(self, text: str) -> list[int]:
        """`[CLS] [unused1] tokens [SEP]`, at most max_passage_length tokens."""
        return self._ids(text, self.passage_marker, self.passage_tokens)

    # -- encoding --------------------------------------------------------------------------

    def _encode(self, ids: Sequence[list[int]], query: bool) -> list[np.ndarray]:
        """Normalised float32 token vectors [len(ids_i), dim] for one batch of id lists (a
        query's `[MASK]` padding is encoded, not attended to)."""
        longest = max(len(i) for i in ids)
        input_ids = np.zeros((len(ids), longest), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        if query:
            mask[input_ids == self.tokenizer.mask_token_id] = 0
        hidden = self._hidden(input_ids, mask)
        return [_normalize(hidden[row, : len(seq)].astype(np.float32))
                for row, seq in enumerate(ids)]

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n, QUERY_TOKENS, dim] normalised query token vectors."""
        out = []
        for start in range(0, len(texts), self.encode_batch):
            batch = [self.query_ids(t) for t in texts[start:start + self.encode_batch]]
            out.extend(self._encode(batch, query=True))
        return np.stack(out) if out else np.zeros((0, self.query_tokens, 0), np.float32)

    def encode_passages(self, texts: Sequence[str]) -> list[np.ndarray]:
        """fp16 [tokens, dim] normalised token vectors per passage (not cached)."""
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.encode_batch):
            batch = [self.passage_ids(t) for t in texts[start:start + self.encode_batch]]
            out.extend(v.astype(np.float16) for v in self._encode(batch, query=False))
        return out

    # -- scoring ---------------------------------------------------------------------------

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
              progress: ProgressFn | None = None) -> np.ndarray:
        """float32 [n] MaxSim scores for (query, passage) pairs, in input order.

        Each distinct query and each distinct passage is encoded once (passages not in the
        cache, longest first, `self.encode_batch` per forward pass); a pair's score depends on
        its two texts only, never on the rest of the call. Pairs are scored in chunks of
        `batch_size` encoded passages; `progress` gets the fraction of pairs scored.
        """
        report = progress or no_progress
        scores = np.zeros(len(pairs), dtype=np.float32)
        if not pairs:
            return scores
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_row = {q: i for i, q in enumerate(queries)}
        query_vectors = self.encode_queries(queries)
        by_passage: dict[str, list[int]] = {}
        for index, (_, passage) in enumerate(pairs):
            by_passage.setdefault(passage, []).append(index)
        done = 0

        def score_passage(text: str, vectors: np.ndarray) -> None:
            nonlocal done
            index = by_passage[text]
            rows = query_vectors[[query_row[pairs[i][0]] for i in index]]
            # [pairs, query tokens, passage tokens] -> best passage token, summed over the query
            sims = rows @ vectors.astype(np.float32).T
            scores[index] = sims.max(axis=2).sum(axis=1)
            done += len(index)

        todo: list[tuple[str, bytes]] = []
        for text in by_passage:
            key = PassageCache.key(text)
            cached = self.cache.get(key)
            if cached is None:
                todo.append((text, key))
            else:
                score_passage(text, cached)
        report(done / len(pairs), "teacher scored pairs")
        todo.sort(key=lambda item: -len(item[0]))
        batch_size = max(1, batch_size)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for (text, key), vectors in zip(batch, self.encode_passages([t for t, _ in batch]),
                                            strict=True):
                self.cache.put(key, vectors)
                score_passage(text, vectors)
            report(done / len(pairs), "teacher scored pairs")
        return scores

    def relevance(self, scores: np.ndarray) -> np.ndarray:
        """Scores mapped into 0..1 for the rerank route: the mean best cosine per query token."""
        return np.clip(np.asarray(scores, dtype=np.float64) / self.query_tokens, 0.0, 1.0)

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise TypeError("a late-interaction teacher scores queries and passages apart; "
                        "call score()")

    def _hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 [batch, tokens, dim]: the encoder's last hidden states."""
        raise NotImplementedError


class OnnxLateInteraction(LateInteractionTeacher):
    """The ONNX encoder on onnxruntime (inputs input_ids, attention_mask[, token_type_ids]; output
    0 the last hidden states)."""

    def __init__(self, spec: ModelSpec, threads: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(spec, cache_bytes)
        self.session, self.input_names = cpu_onnx_session(spec, threads)
        self.encode_batch = 1
        output = self.session.get_outputs()[0]
        if len(output.shape) != 3:
            raise ValueError(f"teacher {spec.name!r}: output {output.name!r} has shape "
                             f"{output.shape}; a late-interaction teacher needs token vectors "
                             f"[batch, tokens, dim]")

    def _hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": np.zeros_like(input_ids)}
        feeds = {name: feeds[name] for name in self.input_names}
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)


class TorchLateInteraction(LateInteractionTeacher):
    """The encoder as a float BertModel on torch: a Hugging Face folder (format "hf"), or the
    int8 ONNX graph de-quantised (format "onnx", config.json beside it) and checked against
    onnxruntime on CHECK_PAIRS at load: ValueError when a score deviates by more than
    MAX_TOKEN_DEVIATION per query token or a token vector's cosine falls under
    MIN_TOKEN_COSINE."""

    def __init__(self, spec: ModelSpec, device: str | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(spec, cache_bytes)
        configure_threads()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = self._load()
        self.model = model.to(self.device).eval()
        if spec.format == "onnx":
            self._check_against_onnx()

    def _load(self) -> torch.nn.Module:
        from transformers import BertConfig, BertModel

        if self.spec.format == "hf":
            return BertModel.from_pretrained(self.spec.weights)
        from ml_core.provision import ProvisionError, dequantized_bert_state_dict, read_onnx

        config = BertConfig.from_pretrained(self.spec.folder)
        model = BertModel(config, add_pooling_layer=False).eval()
        # The pooler (in the catalogued graph as its second output) plays no part in MaxSim.
        arrays = {name: torch.from_numpy(array) for name, array
                  in dequantized_bert_state_dict(read_onnx(self.spec.weights)).items()
                  if not name.startswith("pooler.")}
        missing, unexpected = model.load_state_dict(arrays, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ProvisionError(f"{self.spec.weights}: de-quantised weights do not fit a "
                                 f"BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    @torch.no_grad()
    def _hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                         attention_mask=torch.from_numpy(attention_mask).to(self.device),
                         token_type_ids=torch.zeros(input_ids.shape, dtype=torch.long,
                                                    device=self.device))
        return out.last_hidden_state.float().cpu().numpy()

    def _check_against_onnx(self) -> None:
        reference = OnnxLateInteraction(self.spec, threads=1, cache_bytes=0)
        texts = list(dict.fromkeys(p for _, p in CHECK_PAIRS))
        cosine = min(float((a.astype(np.float32) * b.astype(np.float32)).sum(1).min())
                     for a, b in zip(self.encode_passages(texts),
                                     reference.encode_passages(texts), strict=True))
        ours = self.score(CHECK_PAIRS)
        theirs = reference.score(CHECK_PAIRS)
        self.cache.clear()
        # Per query token: a MaxSim score is a sum of QUERY_TOKENS cosines.
        deviation = float(np.abs(ours - theirs).max()) / self.query_tokens
        if not (deviation <= MAX_TOKEN_DEVIATION and cosine >= MIN_TOKEN_COSINE):
            raise ValueError(
                f"teacher {self.spec.name!r}: the de-quantised encoder scores unlike its ONNX "
                f"original (a score differs by {deviation:.4f} per query token, at most "
                f"{MAX_TOKEN_DEVIATION}; the lowest token cosine is {cosine:.4f}, at least "
                f"{MIN_TOKEN_COSINE})")
        log.info("teacher %s de-quantised for %s: scores within %.4f per query token of "
                 "onnxruntime's, token cosine >= %.4f", self.spec.name, self.device, deviation,
                 cosine)


def load_late_interaction(spec: ModelSpec, device: str | None = None,
                          cache_bytes: int = DEFAULT_CACHE_BYTES) -> LateInteractionTeacher:
    """The backend for a late-interaction teacher: onnxruntime on CPU, torch on CUDA (the int8
    graph de-quantised, needing the folder's config.json) or for a Hugging Face folder."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.format == "hf":
        return TorchLateInteraction(spec, device, cache_bytes)
    if spec.format != "onnx":
        raise ValueError(f"teacher {spec.name!r} has format {spec.format!r}; a late-interaction "
                         "teacher is 'onnx' or 'hf'")
    if torch.device(device).type == "cuda" and (spec.folder / "config.json").is_file():
        return TorchLateInteraction(spec, device, cache_bytes)
    return OnnxLateInteraction(spec, cache_bytes=cache_bytes)
