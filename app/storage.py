"""Object storage behind one interface: a local folder (embedded default) or S3 (production).

Keys are '/'-separated relative names (`corpora/<id>/corpus.jsonl`, `jobs/<id>/<stage>/...`,
see docs/architecture.md, "Contract: object store layout"). Both stores stream: nothing reads a
whole object into memory except the small-object helpers `get_bytes` / `put_bytes` (manifests,
reports).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024
# Anything S3 would accept is fine; we refuse only what could escape the store's root or is
# ambiguous on a filesystem (control characters, backslashes, empty / dot segments).
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class ObjectStoreError(Exception):
    """A storage operation failed (missing object, invalid key, backend error)."""


class ObjectNotFound(ObjectStoreError, KeyError):
    """The key names no object."""

    def __str__(self) -> str:  # KeyError's str() would add quotes
        return f"object not found: {self.args[0]}"


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key; raise ObjectStoreError otherwise."""
    if not key or key.startswith("/") or _BAD_CHARS.search(key):
        raise ObjectStoreError(f"invalid object key: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ObjectStoreError(f"invalid object key: {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    """A list/delete prefix: empty, or a key that may end with '/'."""
    if prefix:
        validate_key(prefix.rstrip("/") or "/")
    return prefix


@runtime_checkable
class ObjectStore(Protocol):
    """Where uploads, stage artifacts and model archives live."""

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file to `key` (replacing any object there)."""

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        """Upload a binary stream without buffering it whole; returns the bytes written."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object."""

    def get_file(self, key: str, dest: Path) -> Path:
        """Download `key` to `dest` (atomically: dest appears only when complete); returns dest."""

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""

    def open_stream(self, key: str) -> Any:
        """A context manager yielding a readable binary stream of the object."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    def size(self, key: str) -> int:
        """The object's size in bytes (ObjectNotFound when missing)."""

    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, sorted."""

    def delete(self, key: str) -> None:
        """Delete one object (no error when missing)."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many were deleted."""

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        """A time-limited GET URL, or None when the store cannot sign (the API then streams)."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when the store is a local folder (the API then serves the file
        itself, with HEAD and Range), else None. ObjectNotFound when it is missing."""


def _atomic_copy(stream: BinaryIO, dest: Path) -> int:
    """Copy a stream into `dest` via a temporary file in the same folder and a rename.

    The rename is atomic on POSIX, so readers never see a half-written file and a crash leaves
    only a stray temporary file, never a truncated object.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return written


class LocalObjectStore:
    """Objects as files under a root folder (the embedded default)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # Symlinks inside the root could still point outside it.
        if not path.is_relative_to(self.root):
            raise ObjectStoreError(f"invalid object key: {key!r}")
        return path

    def put_file(self, key: str, path: Path) -> None:
        with Path(path).open("rb") as source:
            _atomic_copy(source, self._path(key))

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        return _atomic_copy(stream, self._path(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        _atomic_copy(io.BytesIO(data), self._path(key))

    def get_file(self, key: str, dest: Path) -> Path:
        dest = Path(dest)
        with self.open_stream(key) as source:
            _atomic_copy(source, dest)
        return dest

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None

    @contextmanager
    def open_stream(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        with handle:
            yield handle

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the full prefix.
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.endswith(".part"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        # Remove folders left empty, deepest first, so listings and disk usage stay clean.
        if prefix:
            base = self.root / prefix.rstrip("/")
            if base.is_dir():
                for folder in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()
                if not any(base.iterdir()):
                    base.rmdir()
        return len(keys)

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path


class S3ObjectStore:
    """Objects in an S3 bucket (AWS, MinIO, nanio), optionally under a key prefix.

    Path-style addressing and SigV4 signing work with every S3-compatible server. Credentials
    are explicit or come from boto3's usual chain (AWS_ACCESS_KEY_ID, instance roles, ...).
    `public_endpoint_url` signs download URLs for a host name clients can reach when the
    service itself talks to the store on an internal one (compose: http://minio:9000).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: dict[str, str | None] | None = None,
        public_endpoint_url: str | None = None,
        create_bucket: bool = False,
        multipart_chunk_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region or "us-east-1"
        creds = {k: v for k, v in (credentials or {}).items() if v}
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
        )
        session = boto3.session.Session(region_name=self.region, **creds)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._signer = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )
        # upload_fileobj switches to multipart above the threshold and reads the stream in
        # chunks, so an upload never holds more than a few chunks in memory.
        self._transfer = TransferConfig(
            multipart_threshold=multipart_chunk_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=4,
        )
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _not_found(self, error: Exception) -> bool:
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (dev and compose set-ups)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if not self._not_found(error) and "NoSuchBucket" not in str(error):
                raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            self._client.create_bucket(**kwargs)

    def ping(self) -> bool:
        """Whether the bucket is reachable with these credentials."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True

    def put_file(self, key: str, path: Path) -> None:
        self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        counter = _CountingReader(stream)
        self._client.upload_fileobj(counter, self.bucket, self._key(key), Config=self._transfer)
        return counter.count

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, dest: Path) -> Path:
        dest = Path(dest)
        with self.open_stream(key) as body:
            _atomic_copy(body, dest)
        return dest

    def get_bytes(self, key: str) -> bytes:
        with self.open_stream(key) as body:
            return body.read()

    @contextmanager
    def open_stream(self, key: str) -> Iterator[BinaryIO]:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if self._not_found(error):
                raise ObjectNotFound(key) from None
            raise
        body = response["Body"]
        try:
            yield body
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if self._not_found(error):
                raise ObjectNotFound(key) from None
            raise
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", []):
                keys.append(item["Key"][len(self.prefix) :])
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        if not prefix and not self.prefix:
            # Refuse to empty a whole bucket by accident.
            raise ObjectStoreError("delete_prefix needs a prefix on an unprefixed bucket")
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + key} for key in keys[start : start + 1000]]
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if response.get("Errors"):
                raise ObjectStoreError(f"delete_prefix {prefix!r}: {response['Errors'][:3]}")
        return len(keys)

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        return self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )

    def local_path(self, key: str) -> Path | None:
        return None


class _CountingReader:
    """Wraps a stream to count the bytes boto3 reads from it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


def object_store_from_url(url: str, settings: Any = None) -> ObjectStore:
    """The store a URL names: `file:///abs/path`, `file://rel/path` or a bare path -> local;
    `s3://bucket[/prefix]` -> S3, configured from `settings` (s3_endpoint_url, s3_region,
    s3_public_endpoint_url, aws_access_key_id, aws_secret_access_key, s3_create_bucket; each
    optional, boto3's credential chain fills in missing keys).
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ObjectStoreError(f"object store URL names no bucket: {url!r}")

        def setting(name: str) -> Any:
            value = getattr(settings, name, None)
            # pydantic SecretStr keeps secrets out of reprs and logs.
            return value.get_secret_value() if hasattr(value, "get_secret_value") else value

        return S3ObjectStore(
            parsed.netloc,
            prefix=parsed.path,
            endpoint_url=setting("s3_endpoint_url"),
            region=setting("s3_region"),
            credentials={
                "aws_access_key_id": setting("aws_access_key_id"),
                "aws_secret_access_key": setting("aws_secret_access_key"),
            },
            public_endpoint_url=setting("s3_public_endpoint_url"),
            create_bucket=bool(setting("s3_create_bucket")),
        )
    if parsed.scheme == "file":
        # file:///abs -> /abs; file://var/objects (netloc "var") -> var/objects, relative.
        return LocalObjectStore(Path(parsed.netloc + parsed.path) if parsed.netloc else parsed.path)
    if parsed.scheme == "":
        return LocalObjectStore(Path(url))
    raise ObjectStoreError(f"unsupported object store URL: {url!r} (use file:// or s3://)")


@contextmanager
def stored_until_committed(session: Session, store: ObjectStore, prefix: str) -> Iterator[None]:
    """Objects written under `prefix` in the block stay only if the block and the session's
    commit after it succeed; otherwise the session rolls back and they are deleted again (best
    effort, logged), so a failed upload leaves neither a row nor an orphaned file."""
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        try:
            store.delete_prefix(prefix)
        except Exception:
            log.exception("could not delete the objects under %s", prefix)
        raise


def copy_tree_to_store(
    store: ObjectStore, folder: Path, prefix: str, last: str | None = None
) -> list[str]:
    """Upload every file under `folder` to `prefix/<relative path>`; the file named `last`
    (relative path) goes up after all others, so its presence marks the upload complete.
    Returns the uploaded keys in upload order."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    rel = [p.relative_to(folder).as_posix() for p in files]
    order = [r for r in rel if r != last] + ([last] if last in rel else [])
    keys = []
    for name in order:
        key = f"{prefix.rstrip('/')}/{name}"
        store.put_file(key, Path(folder) / name)
        keys.append(key)
    return keys


def copy_store_to_tree(
    store: ObjectStore, prefix: str, folder: Path, skip: tuple[str, ...] = ()
) -> list[Path]:
    """Download every object under `prefix/` into `folder`, skipping files already present
    with the same size (resume after a crash downloads only what is missing) and the relative
    names in `skip`."""
    prefix = prefix.rstrip("/") + "/"
    fetched = []
    for key in store.list(prefix):
        if key[len(prefix) :] in skip:
            continue
        dest = Path(folder) / key[len(prefix) :]
        if dest.is_file() and dest.stat().st_size == store.size(key):
            continue
        store.get_file(key, dest)
        fetched.append(dest)
    return fetched


__all__ = [
    "LocalObjectStore",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "S3ObjectStore",
    "copy_store_to_tree",
    "copy_tree_to_store",
    "object_store_from_url",
    "validate_key",
]


def delete_objects(store: ObjectStore, prefix: str) -> int:
    """Delete what a deleted resource left under `prefix`, after its row's commit: best effort
    (nothing reaches these objects any more), logged when the store refuses; returns the count."""
    try:
        return store.delete_prefix(prefix)
    except Exception:
        log.exception("could not delete the objects under %s", prefix)
        return 0
