"""Saving a streamed download, and unpacking an archive (a model's .tar.gz, a bulk embedding
job's .tar) into a folder of its own."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import httpx

from tailor_client.errors import TailorError
from tailor_client.uploads import ProgressFn

CHUNK = 1024 * 1024


class ArchiveError(TailorError):
    """The downloaded archive cannot be unpacked safely."""


def save_stream(response: httpx.Response, path: Path, on_progress: ProgressFn | None) -> Path:
    """Write a streamed body to `path` (through a temporary file, so a broken download never
    leaves a partial archive under the final name)."""
    total = int(response.headers["Content-Length"]) if "Content-Length" in response.headers \
        else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".download-", delete=False) as out:
        try:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                if on_progress:
                    on_progress(response.num_bytes_downloaded, total)
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, path)
    return path


@contextmanager
def unpacked_into(directory: Path) -> Iterator[Path]:
    """Yields a path to download the archive (.tar.gz or .tar) to; on leaving, unpacks it as
    `directory`. The archive holds one top folder (the model's or job's id); its contents
    become `directory` itself."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory}: exists and is not an empty folder")
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".tailor-download-") as scratch:
        archive = Path(scratch) / "download.tar"
        yield archive
        unpacked = Path(scratch) / "unpacked"
        top = _extract(archive, unpacked)
        if directory.exists():
            directory.rmdir()  # empty (checked above): replaced by the unpacked folder
        shutil.move(str(top), str(directory))


def _extract(archive: Path, into: Path) -> Path:
    """Extract safely (no absolute paths, no escaping links); returns the archive's single top
    folder, or `into` when the files sit at the top."""
    try:
        with tarfile.open(archive, "r:*") as tar:  # gzip or not, as the archive says
            members = tar.getmembers()
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"the downloaded archive cannot be unpacked: {exc}") from exc
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    if len(tops) == 1 and (into / next(iter(tops))).is_dir():
        return into / next(iter(tops))
    return into
