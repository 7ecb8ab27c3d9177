"""Files sent as multipart uploads, read in chunks, with an optional progress callback."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO

# on_progress(bytes so far, total bytes or None): uploads and downloads report through it.
ProgressFn = Callable[[int, int | None], None]


class CountingReader:
    """A binary file that reports how far it has been read (httpx reads uploads in chunks)."""

    def __init__(self, file: IO[bytes], total: int, on_progress: ProgressFn) -> None:
        self._file, self._total, self._on_progress = file, total, on_progress

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._on_progress(self._file.tell(), self._total)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def open_upload(
    stack: ExitStack, path: Path, on_progress: ProgressFn | None = None
) -> tuple[str, IO[bytes] | CountingReader]:
    """(file name, readable) for httpx's `files=`; the file closes with `stack`. A missing
    file fails here, naming it, before any request is sent."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    file = stack.enter_context(path.open("rb"))
    if on_progress is None:
        return path.name, file
    return path.name, CountingReader(file, path.stat().st_size, on_progress)
