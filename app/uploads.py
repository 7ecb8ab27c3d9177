"""Streaming multipart uploads with hard limits, and the one byte-level reading of every file.

FastAPI's `UploadFile` parameters parse the whole body before the handler runs, so an oversized
upload would be written to disk in full before anyone could refuse it. Here the request stream is
counted while it is parsed: a body past the limit is refused at once (413), and by Content-Length
before a byte is read when the client sends one. File parts spool to disk past 1 MiB (Starlette),
then are copied in chunks to a named temporary file the validators can open.

Every uploaded file (corpora, eval sets' queries and qrels, query sets) is then read once as the
validators will read it, decompressed when it is gzip, in bounded chunks: corrupt gzip data, more
text than `max_decompressed_bytes` or a line longer than `max_line_bytes` is refused naming the
file and line before any parser holds a line in memory. The record-level rules (JSON nesting,
integer sizes, lone surrogates, field types) are the readers' in ml_core.corpus.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidRequest, PayloadTooLarge
from app.settings import Settings

CHUNK = 1024 * 1024
# Room for the multipart framing and the small text fields around the file parts.
FORM_OVERHEAD = 64 * 1024
GZIP_MAGIC = b"\x1f\x8b"


# The length of a resource's name column (corpora, eval sets): a `name` form field is checked
# against it, a name taken from the file name is cut to it.
NAME_MAX = 200


@dataclass(frozen=True)
class UploadRules:
    """How one route reads its files: the limits, and its error (InvalidCorpus...)."""

    max_bytes: int
    max_decompressed_bytes: int
    max_line_bytes: int
    invalid: type[InvalidRequest]
    # False for an archive (a model upload): its own reader bounds what it decompresses.
    text: bool = True

    @classmethod
    def of(cls, settings: Settings, invalid: type[InvalidRequest]) -> UploadRules:
        """A text upload (JSON lines, TSV) within the settings' limits."""
        return cls(settings.max_upload_bytes, settings.max_decompressed_bytes,
                   settings.max_line_bytes, invalid)

    @classmethod
    def archive(cls, max_bytes: int, invalid: type[InvalidRequest]) -> UploadRules:
        """A binary archive of at most `max_bytes` as sent, not read as text here."""
        return cls(max_bytes, max_bytes, max_bytes, invalid, text=False)


@dataclass(frozen=True)
class SpooledFile:
    """An uploaded file copied to local disk."""

    path: Path
    filename: str
    size: int
    gzipped: bool

    @property
    def default_name(self) -> str:
        """The resource's name when the client sends none: the file name, cut to fit."""
        return self.filename[:NAME_MAX]


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", limit=limit)


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit - FORM_OVERHEAD)
        yield chunk


@asynccontextmanager
async def multipart_form(request: Request, max_file_bytes: int) -> AsyncIterator[FormData]:
    """Parse a multipart/form-data body of at most `max_file_bytes` (+ framing) as it streams."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("expected a multipart/form-data body", field="content-type")
    limit = max_file_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_file_bytes)
    parser = MultiPartParser(
        request.headers, _limited(request.stream(), limit), max_files=4, max_fields=16
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        yield form
    finally:
        await form.close()


def form_text(
    form: FormData, name: str, *, required: bool = False, max_length: int = NAME_MAX
) -> str:
    """A text field of the form ("" when absent and optional)."""
    value: Any = form.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"form field {name!r} is required", field=name)
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"form field {name!r} must be text, not a file", field=name)
    if len(value) > max_length:
        raise InvalidRequest(f"form field {name!r} is longer than {max_length}", field=name)
    return value


def form_file(form: FormData, name: str) -> UploadFile:
    """A required file field of the form."""
    value: Any = form.get(name)
    if not isinstance(value, UploadFile):
        raise InvalidRequest(f"file field {name!r} is required", field=name)
    return value


def _copy(source: BinaryIO, dest: Path, limit: int) -> tuple[int, bool]:
    size = 0
    head = b""
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK):
            if not head:
                head = chunk[:2]
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            out.write(chunk)
    return size, head == GZIP_MAGIC


class _Text:
    """Counts the decompressed bytes and lines of a file read in chunks, checking the limits."""

    def __init__(self, field: str, filename: str, rules: UploadRules) -> None:
        self.field, self.filename, self.rules = field, filename, rules
        self.total = 0
        self.line = 1  # the line the next byte belongs to
        self.partial = 0  # bytes of that line seen so far

    def refuse(self, message: str, line: int | None = None) -> InvalidRequest:
        return self.rules.invalid(f"{self.filename}: {message}", file=self.field, line=line,
                                  field=None)

    def feed(self, chunk: bytes) -> None:
        limit = self.rules.max_line_bytes
        self.total += len(chunk)
        if self.total > self.rules.max_decompressed_bytes:
            raise PayloadTooLarge(
                f"{self.filename}: more than {self.rules.max_decompressed_bytes} bytes of text "
                f"once decompressed", limit=self.rules.max_decompressed_bytes, file=self.field)
        # split() and len() run in C: a chunk of short lines costs no Python loop per line.
        pieces = chunk.split(b"\n")
        lengths = [self.partial + len(pieces[0]), *map(len, pieces[1:])]
        if max(lengths) > limit:
            too_long = next(i for i, length in enumerate(lengths) if length > limit)
            raise self.refuse(f"line {self.line + too_long} is longer than {limit} bytes",
                              self.line + too_long)
        self.line += len(pieces) - 1
        self.partial = lengths[-1]


def _read_text(path: Path, gzipped: bool, text: _Text) -> None:
    try:
        with gzip.open(path, "rb") if gzipped else path.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                text.feed(chunk)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        message = f"unreadable gzip data near line {text.line} ({exc})"
        raise text.refuse(message, text.line) from None


async def spool(
    form: FormData, field: str, folder: Path, stem: str, rules: UploadRules
) -> SpooledFile:
    """Copy the form's file `field` to `folder` as `<stem>` (+ `.gz` for gzip data), counting
    bytes, then (a text upload) read it through once as text within the rules' limits."""
    upload = form_file(form, field)
    await upload.seek(0)
    tmp = folder / f"{stem}.part"
    size, gzipped = await run_in_threadpool(_copy, upload.file, tmp, rules.max_bytes)
    # The name follows the content, not the client's file name.
    path = folder / (f"{stem}.gz" if gzipped else stem)
    tmp.rename(path)
    # Only metadata (never a path on our side); capped to the column's length.
    filename = (upload.filename or stem)[:255]
    if rules.text:
        await run_in_threadpool(_read_text, path, gzipped, _Text(field, filename, rules))
    return SpooledFile(path=path, filename=filename, size=size, gzipped=gzipped)


@asynccontextmanager
async def upload_folder(base: Path | None) -> AsyncIterator[Path]:
    """A private temporary folder for one request's uploads, removed afterwards."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="tailor-upload-", dir=base))
    try:
        yield folder
    finally:
        await run_in_threadpool(shutil.rmtree, folder, True)


def file_upload_body(description: str) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that takes one multipart `file` (described by
    `description`) and an optional `name` (the body is parsed here, not by FastAPI)."""
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": description},
                        "name": {"type": "string", "maxLength": NAME_MAX,
                                 "description": "Display name (default: the file name)."},
                    },
                }
            }
        },
    }
