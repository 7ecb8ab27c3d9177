"""Customer corpora: BEIR-format readers with precise errors (hygiene, chunking and sampling of
the passages read are in ml_core.passages).

Files are BEIR JSON lines (`{"_id", "title", "text"}` per line) or BEIR qrels TSV, plain or gzip
(recognised by its magic bytes, whatever the file is called). Every problem raises `CorpusError`
naming the file, the 1-based line and the field, so the API can answer 422 with a line number.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
