"""Passages after reading: hygiene, chunking to the student's length, and sampling.

Hygiene follows Tamber et al. 2025 (arXiv 2502.19712, corpus preparation): a normalised key (NFKC,
lowercase, digits and punctuation stripped) finds duplicates; passages under `min_chars` and exact
or contained duplicates are dropped. Long passages are chunked to the student's length with
overlap instead of being silently truncated.
"""

from __future__ import annotations

import random
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any, Protocol

import numpy as np

from ml_core.config import CorpusConfig
from ml_core.records import Passage

# --------------------------------------------------------------------------------------------
# Hygiene


_NON_WORD = re.compile(r"[\W\d_]+")


def normalise(text: str) -> str:
    """The duplicate-finding key: NFKC, lowercase, digits/punctuation removed, spaces collapsed."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


@dataclass
class HygieneReport:
    """What corpus hygiene dropped and why (written to prepare/hygiene.json)."""

    input: int = 0
    kept: int = 0
    too_short: int = 0
    no_words: int = 0
    exact_duplicates: int = 0
    contained: int = 0
    # dropped duplicate id -> the kept passage that holds its text (for mapping judgements)
    replaced_by: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def clean_passages(
    passages: Iterable[Passage], cfg: CorpusConfig
) -> tuple[list[Passage], HygieneReport]:
    """Hygiene (Tamber et al. 2025): returns the kept passages, in input order, and a report.

    Drops passages whose stripped text is under `cfg.min_chars` characters; with `cfg.dedupe`,
    also passages whose normalised text is empty, equal to an earlier passage's (the first is
    kept), or contained word-for-word in a longer kept passage (see `find_containers`).
    """
    report = HygieneReport()
    survivors: list[Passage] = []
    for passage in passages:
        report.input += 1
        if len(passage.text.strip()) < cfg.min_chars:
            report.too_short += 1
        else:
            survivors.append(passage)
    if not cfg.dedupe:
        report.kept = len(survivors)
        return survivors, report

    unique: list[Passage] = []
    keys: list[str] = []
    first_with_key: dict[str, str] = {}
    for passage in survivors:
        key = normalise(passage.text)
        if not key:
            report.no_words += 1
        elif key in first_with_key:
            report.exact_duplicates += 1
            report.replaced_by[passage.id] = first_with_key[key]
        else:
            first_with_key[key] = passage.id
            unique.append(passage)
            keys.append(key)

    containers = find_containers([key.split() for key in keys])
    kept: list[Passage] = []
    for index, passage in enumerate(unique):
        if index in containers:
            report.contained += 1
            report.replaced_by[passage.id] = unique[containers[index]].id
        else:
            kept.append(passage)
    # A duplicate of a contained passage now maps to the passage that contains it.
    dropped_to = {unique[i].id: unique[c].id for i, c in containers.items()}
    report.replaced_by = {k: dropped_to.get(v, v) for k, v in report.replaced_by.items()}
    report.kept = len(kept)
    return kept, report


_ANCHOR_WORDS = 3


def find_containers(texts: Sequence[Sequence[str]]) -> dict[int, int]:
    """{i: j} for each word sequence i that occurs contiguously inside a longer sequence j.

    j is the longest such container, so it is never itself contained. Exact, and near-linear in
    the total number of words instead of quadratic in passages (the choice for 100k passages):
    every 3-word window of every text is hashed in one vectorised pass; each text is anchored by
    its rarest window (a text of 1-2 words by itself); a text can only be inside another where
    its anchor occurs, so only windows equal to some anchor (rare by construction) become
    candidates, and each candidate is confirmed by comparing the words. Inputs must be distinct.
    """
    n = len(texts)
    if n < 2:
        return {}
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    # Words as 64-bit hashes (C-speed); candidates are confirmed on the words themselves below.
    flat = np.fromiter(map(hash, chain.from_iterable(texts)), dtype=np.int64,
                       count=int(lengths.sum())).view(np.uint64)
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(n), lengths)
    containers: dict[int, int] = {}
    for k in range(1, _ANCHOR_WORDS + 1):
        anchored = np.minimum(lengths, _ANCHOR_WORDS) == k
        if not anchored.any() or flat.size < k:
            continue
        hashes = _window_hashes(flat, k)
        window_owner = owner[: hashes.size]
        valid = owner[k - 1:] == window_owner  # all k words in the same text
        own = np.flatnonzero(valid & anchored[window_owner])  # grouped by text, in order
        first = np.r_[True, window_owner[own][1:] != window_owner[own][:-1]]
        if k == _ANCHOR_WORDS:  # anchor each text on its rarest window
            _, inverse, counts = np.unique(hashes[valid], return_inverse=True, return_counts=True)
            frequency = np.zeros(hashes.size, dtype=np.int64)
            frequency[valid] = counts[inverse]
            group_start = np.flatnonzero(first)
            rarest = np.minimum.reduceat(frequency[own], group_start)
            is_rarest = frequency[own] == np.repeat(rarest, np.diff(np.r_[group_start, own.size]))
            own = own[is_rarest]
            first = np.r_[True, window_owner[own][1:] != window_owner[own][:-1]]
        anchors: dict[int, list[tuple[int, int]]] = {}
        for position in own[first]:
            text = int(window_owner[position])
            anchors.setdefault(int(hashes[position]), []).append(
                (text, int(position - starts[text])))
        anchor_hashes = np.sort(np.fromiter(anchors, dtype=np.uint64))
        slot = np.minimum(np.searchsorted(anchor_hashes, hashes), anchor_hashes.size - 1)
        hits = np.flatnonzero(valid & (anchor_hashes[slot] == hashes))
        for position in hits:
            j = int(window_owner[position])
            for i, anchor_offset in anchors[int(hashes[position])]:
                at = int(position - starts[j]) - anchor_offset
                if lengths[i] >= lengths[j] or at < 0 or at + lengths[i] > lengths[j]:
                    continue
                if list(texts[j][at:at + lengths[i]]) == list(texts[i]):
                    best = containers.get(i)
                    if best is None or lengths[j] > lengths[best]:
                        containers[i] = j
    return containers


def _window_hashes(flat: np.ndarray, k: int) -> np.ndarray:
    """A 64-bit polynomial hash of every k-word window (wrapping arithmetic)."""
    count = flat.size - k + 1
    hashes = np.zeros(count, dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for j in range(k):
            hashes = hashes * base + flat[j:j + count]
    return hashes


# --------------------------------------------------------------------------------------------
# Chunking and sampling


class Tokenizer(Protocol):
    """The part of a Hugging Face fast tokenizer that chunking uses."""

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...

    def num_special_tokens_to_add(self, pair: bool = False) -> int: ...


def chunk_passages(
    passages: Sequence[Passage],
    tokenizer: Tokenizer,
    max_tokens: int,
    overlap: int,
    reserved_tokens: int = 0,
    batch_size: int = 256,
) -> list[Passage]:
    """Passages split so each fits `max_tokens` model tokens; returns the passages and chunks.

    `max_tokens` is the model's passage length; the tokenizer's special tokens, the title's
    tokens and `reserved_tokens` (e.g. a passage prefix) are taken from it, so the title is
    repeated on every chunk. Chunks are cut on token boundaries from the original text (via
    offsets, `chunk_spans`), overlap by `overlap` tokens (at most half a chunk), are numbered
    `<parent>#<k>` from 0 and keep `parent_id`. Passages that fit are returned unchanged.
    """
    chunked: list[Passage] = []
    spans = chunk_spans(passages, tokenizer, max_tokens, overlap, reserved_tokens, batch_size)
    for passage, cuts in zip(passages, spans, strict=True):
        if cuts is None:
            chunked.append(passage)
            continue
        parent = passage.parent_id or passage.id
        for k, (start, end) in enumerate(cuts):
            chunked.append(Passage(id=f"{passage.id}#{k}", text=passage.text[start:end],
                                   title=passage.title, parent_id=parent))
    return chunked


def chunk_spans(
    passages: Sequence[Passage],
    tokenizer: Tokenizer,
    max_tokens: int,
    overlap: int,
    reserved_tokens: int = 0,
    batch_size: int = 256,
) -> list[list[tuple[int, int]] | None]:
    """For each passage, None when it fits `max_tokens` (see `chunk_passages`), else the
    character spans [start, end) of its text that its chunks are, in order."""
    spans: list[list[tuple[int, int]] | None] = []
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    for start in range(0, len(passages), batch_size):
        batch = passages[start:start + batch_size]
        # verbose=False: measuring a long text is the point here, not a model input error.
        encoded = tokenizer([p.text for p in batch], add_special_tokens=False,
                            return_offsets_mapping=True, truncation=False, verbose=False)
        titles = tokenizer([p.title for p in batch], add_special_tokens=False, truncation=False,
                           verbose=False)
        for i in range(len(batch)):
            offsets = encoded["offset_mapping"][i]
            room = max_tokens - specials - reserved_tokens
            budget = room - min(len(titles["input_ids"][i]), room // 2)
            if len(offsets) <= budget:
                spans.append(None)
                continue
            tokens = _chunk_spans(encoded.word_ids(i), budget, min(overlap, budget // 2))
            spans.append([(offsets[first][0], offsets[end - 1][1]) for first, end in tokens])
    return spans


def _chunk_spans(word_ids: list[int | None], budget: int, overlap: int) -> list[tuple[int, int]]:
    """Token spans [first, end) of at most `budget` tokens that start and end on word boundaries
    (so a chunk re-tokenizes to the same pieces) and overlap by at most `overlap` tokens."""
    size = len(word_ids)
    starts = [t for t in range(size) if t == 0 or word_ids[t] != word_ids[t - 1]]
    spans: list[tuple[int, int]] = []
    first = 0
    while True:
        if first + budget >= size:
            spans.append((first, size))
            return spans
        end = starts[bisect_right(starts, first + budget) - 1]
        if end <= first:  # one word longer than a chunk: cut inside it
            end = first + budget
        spans.append((first, end))
        # the next chunk starts at the first word inside the last `overlap` tokens
        at = bisect_left(starts, end - overlap)
        following = starts[at] if overlap and at < len(starts) else end
        first = following if first < following < end else end


def sample_passages(passages: Sequence[Passage], n: int, seed: int) -> list[Passage]:
    """A seeded uniform sample of n passages without replacement (all when fewer), input order."""
    if n >= len(passages):
        return list(passages)
    chosen = sorted(random.Random(seed).sample(range(len(passages)), n))
    return [passages[i] for i in chosen]
