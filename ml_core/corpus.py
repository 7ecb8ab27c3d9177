"""Customer corpora: BEIR-format readers with precise errors, hygiene, chunking and sampling.

Files are BEIR JSON lines (`{"_id", "title", "text"}` per line) or BEIR qrels TSV, plain or gzip
(recognised by its magic bytes, whatever the file is called). Every problem raises `CorpusError`
naming the file, the 1-based line and the field, so the API can answer 422 with a line number.

Hygiene follows Tamber et al. 2025 (arXiv 2502.19712, corpus preparation): a normalised key (NFKC,
lowercase, digits and punctuation stripped) finds duplicates; passages under `min_chars` and exact
or contained duplicates are dropped. Long passages are chunked to the student's length with
overlap instead of being silently truncated.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import unicodedata
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from ml_core.config import CorpusConfig
from ml_core.errors import MLCoreError
from ml_core.records import Passage, Query

GZIP_MAGIC = b"\x1f\x8b"


class CorpusError(MLCoreError, ValueError):
    """A problem in a corpus, queries or qrels file, located by file, line and field."""

    code = "invalid_corpus"

    def __init__(self, path: Path | str, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        """{"file", "line", "field", "message"}: the error as the API reports it."""
        return {"file": self.path, "line": self.line, "field": self.field, "message": self.message}


@dataclass(frozen=True)
class CorpusStats:
    """What validation learned about a corpus file (hashes are of the file as stored)."""

    documents: int
    bytes: int
    sha256: str
    compressed: bool
    text_bytes: int  # uncompressed size


# --------------------------------------------------------------------------------------------
# Reading


class _HashingReader(io.RawIOBase):
    """A binary stream that hashes and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.count += len(data)
        return len(data)

    def drain(self) -> None:
        """Read (and hash) whatever the parser left unread."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()
        super().close()


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes (its name does not matter)."""
    with Path(path).open("rb") as handle:
        return handle.read(2) == GZIP_MAGIC


@contextmanager
def _open_binary(path: Path, hasher: _HashingReader | None = None) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when gzip; read through `hasher` when given."""
    compressed = is_gzip(path)
    raw: IO[bytes] = Path(path).open("rb") if hasher is None else io.BufferedReader(hasher, 1 << 20)
    try:
        yield gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[misc]
    finally:
        raw.close()


def _lines(path: Path, stream: IO[bytes]) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) for non-blank lines; CorpusError on bad bytes."""
    number = 0
    try:
        for number, raw_line in enumerate(stream, start=1):  # noqa: B007
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(path, number, None, f"not valid UTF-8 ({exc.reason})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield number, line
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise CorpusError(path, number + 1, None, f"unreadable data: {exc}") from None


# Integers in a record are ids or small numbers: a longer one is refused before Python's own
# digit limit (4,300) would raise from inside the parser.
MAX_INT_DIGITS = 64
# Lone UTF-16 surrogates: JSON's \ud800 escapes decode to them, and no UTF-8 writer accepts them.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _LongInteger(ValueError):
    pass


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(text)
    return int(text)


_DECODER = json.JSONDecoder(parse_int=_bounded_int)


def _json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = _DECODER.decode(line)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} at column {exc.colno}"
        raise CorpusError(path, number, None, message) from None
    except RecursionError:
        raise CorpusError(path, number, None, "invalid JSON: nested too deeply") from None
    except _LongInteger:
        message = f"invalid JSON: an integer of more than {MAX_INT_DIGITS} digits"
        raise CorpusError(path, number, None, message) from None
    if not isinstance(record, dict):
        raise CorpusError(path, number, None, "expected a JSON object")
    return record


def _string_field(path: Path, number: int, record: dict[str, Any], name: str, *,
                  required: bool, allow_empty: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise CorpusError(path, number, name, "missing")
        return ""
    if not isinstance(value, str):
        raise CorpusError(path, number, name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise CorpusError(path, number, name, "empty")
    if _SURROGATE.search(value):
        raise CorpusError(path, number, name, "holds a lone surrogate (an unpaired \\ud800-\\udfff "
                          "escape), which is not text")
    return value


def _record_id(path: Path, number: int, record: dict[str, Any]) -> str:
    name = "_id" if "_id" in record else "id" if "id" in record else None
    if name is None:
        raise CorpusError(path, number, "_id", "missing (expected '_id' or 'id')")
    value = record[name]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric ids are common in hand-made JSONL; ids are strings inside
    return _string_field(path, number, record, name, required=True, allow_empty=False)


def _iter_passages(path: Path, stream: IO[bytes]) -> Iterator[Passage]:
    first_line: dict[str, int] = {}
    for number, line in _lines(path, stream):
        record = _json_object(path, number, line)
        doc_id = _record_id(path, number, record)
        if doc_id in first_line:
            raise CorpusError(path, number, "_id",
                              f"duplicate id {doc_id!r} (first seen on line {first_line[doc_id]})")
        first_line[doc_id] = number
        title = _string_field(path, number, record, "title", required=False, allow_empty=True)
        # An empty text is kept (real corpora have empty documents: Cranfield 471 and 995);
        # hygiene drops it as too short and counts it, instead of refusing the whole upload.
        text = _string_field(path, number, record, "text", required=True, allow_empty=True)
        yield Passage(id=doc_id, text=text, title=title)
    if not first_line:
        raise CorpusError(path, None, None, "empty corpus: no documents")


def iter_corpus(path: Path) -> Iterator[Passage]:
    """Stream the passages of a BEIR corpus.jsonl (plain or gzip); raises CorpusError."""
    path = Path(path)
    with _open_binary(path) as stream:
        yield from _iter_passages(path, stream)


def validate_corpus(path: Path) -> CorpusStats:
    """Check every line of a corpus in one streaming pass; returns counts and the file's sha256."""
    path = Path(path)
    hasher = _HashingReader(path.open("rb"))
    with _open_binary(path, hasher) as stream:
        counting = _CountingStream(stream)
        documents = sum(1 for _ in _iter_passages(path, counting))  # type: ignore[arg-type]
        hasher.drain()
    return CorpusStats(documents=documents, bytes=hasher.count, sha256=hasher.digest.hexdigest(),
                       compressed=is_gzip(path), text_bytes=counting.count)


class _CountingStream:
    """Iterates the lines of a binary stream, counting their bytes."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self.stream:
            self.count += len(line)
            yield line


def read_queries(path: Path) -> list[Query]:
    """The queries of a BEIR queries.jsonl (`_id`/`id`, `text`), in file order; CorpusError."""
    path = Path(path)
    queries: list[Query] = []
    first_line: dict[str, int] = {}
    with _open_binary(path) as stream:
        for number, line in _lines(path, stream):
            record = _json_object(path, number, line)
            query_id = _record_id(path, number, record)
            if query_id in first_line:
                raise CorpusError(path, number, "_id", f"duplicate id {query_id!r} "
                                  f"(first seen on line {first_line[query_id]})")
            first_line[query_id] = number
            text = _string_field(path, number, record, "text", required=True, allow_empty=False)
            queries.append(Query(id=query_id, text=text))
    if not queries:
        raise CorpusError(path, None, None, "empty file: no queries")
    return queries


# What a qrels header calls its score column (BEIR's is "score"), compared without case or
# punctuation. Only such a first line is a header: a first judgement with a bad score is an error.
QRELS_SCORE_HEADERS = frozenset(
    {"score", "relevance", "rel", "label", "grade", "judgement", "judgment", "relevancescore"})


# A judgement's score: a plain integer that fits the evaluator's C int.
_SCORE = re.compile(r"[+-]?[0-9]{1,9}")


def _is_qrels_header(cells: list[str]) -> bool:
    return re.sub(r"[^a-z]", "", cells[2].lower()) in QRELS_SCORE_HEADERS


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (`query-id corpus-id score`, header optional) as {qid: {doc_id: score}}.

    Raises CorpusError for a wrong column count, a non-integer score, an empty id, conflicting
    duplicate judgements or a file without judgements.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    columns = ("query-id", "corpus-id", "score")
    first = True
    with _open_binary(path) as stream:
        for number, line in _lines(path, stream):
            cells = [c.strip() for c in line.rstrip("\r\n").split("\t")]
            if len(cells) != 3:
                raise CorpusError(path, number, None,
                                  f"expected 3 tab-separated columns, got {len(cells)}")
            if first and _is_qrels_header(cells):
                first = False
                continue
            first = False
            for name, cell in zip(columns[:2], cells[:2], strict=True):
                if not cell:
                    raise CorpusError(path, number, name, "empty")
            if not _SCORE.fullmatch(cells[2]):
                shown = cells[2] if len(cells[2]) <= 40 else cells[2][:40] + "..."
                raise CorpusError(path, number, "score",
                                  f"must be an integer of at most 9 digits, got {shown!r}")
            score = int(cells[2])
            judged = qrels.setdefault(cells[0], {})
            if judged.get(cells[1], score) != score:
                raise CorpusError(path, number, "score", f"conflicting judgement for "
                                  f"({cells[0]!r}, {cells[1]!r}): {judged[cells[1]]} and {score}")
            judged[cells[1]] = score
    if not qrels:
        raise CorpusError(path, None, None, "empty file: no judgements")
    return qrels


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
