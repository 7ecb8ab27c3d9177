"""ObjectStore behaviour on a local folder and on a real S3 server (nanio, SigV4 checked)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from app.storage import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    copy_store_to_tree,
    copy_tree_to_store,
    object_store_from_url,
)
from tests.processes import NanioServer, nanio_server


@pytest.fixture(scope="module")
def nanio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanioServer]:
    root = tmp_path_factory.mktemp("nanio")
    with nanio_server(root / "data", root / "logs") as server:
        yield server


def _s3(server: NanioServer, bucket: str, **kwargs: object) -> S3ObjectStore:
    return S3ObjectStore(
        bucket,
        endpoint_url=server.endpoint_url,
        region=server.region,
        credentials={
            "aws_access_key_id": server.access_key,
            "aws_secret_access_key": server.secret_key,
        },
        create_bucket=True,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["local", "s3", "s3-prefixed"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    server = request.getfixturevalue("nanio")
    bucket = f"t-{os.urandom(4).hex()}"
    prefix = "tenant-a/data" if request.param == "s3-prefixed" else ""
    return _s3(server, bucket, prefix=prefix, multipart_chunk_bytes=5 * 1024 * 1024)


def test_put_get_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_text('{"_id": "d1", "text": "hello"}\n')
    store.put_file("corpora/crp_1/corpus.jsonl", source)
    store.put_bytes("jobs/job_1/prepare/manifest.json", b'{"stage": "prepare"}')
    store.put_bytes("jobs/job_1/prepare/passages.jsonl", b"x" * 10)
    store.put_bytes("jobs/job_10/prepare/manifest.json", b"{}")

    assert store.exists("corpora/crp_1/corpus.jsonl")
    assert not store.exists("corpora/crp_1/missing.jsonl")
    assert store.size("jobs/job_1/prepare/passages.jsonl") == 10
    assert store.get_bytes("jobs/job_1/prepare/manifest.json") == b'{"stage": "prepare"}'
    dest = store.get_file("corpora/crp_1/corpus.jsonl", tmp_path / "down" / "c.jsonl")
    assert dest.read_text() == source.read_text()
    with store.open_stream("jobs/job_1/prepare/passages.jsonl") as stream:
        assert stream.read() == b"x" * 10

    # A prefix is a string prefix, so "jobs/job_1/" must not match job_10.
    assert store.list("jobs/job_1/") == [
        "jobs/job_1/prepare/manifest.json",
        "jobs/job_1/prepare/passages.jsonl",
    ]
    assert len(store.list("jobs/")) == 3
    assert store.list("nothing/here/") == []

    assert store.delete_prefix("jobs/job_1/") == 2
    assert store.list("jobs/") == ["jobs/job_10/prepare/manifest.json"]
    store.delete("jobs/job_10/prepare/manifest.json")
    store.delete("jobs/job_10/prepare/manifest.json")  # deleting twice is not an error
    assert store.list("jobs/") == []

    with pytest.raises(ObjectNotFound):
        store.get_bytes("jobs/job_1/prepare/manifest.json")
    with pytest.raises(ObjectNotFound):
        store.get_file("jobs/job_1/prepare/manifest.json", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_put_stream_is_streamed_and_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    # 11 MiB crosses the 5 MiB multipart chunk twice on S3: three parts.
    data = os.urandom(11 * 1024 * 1024 + 123)
    assert store.put_stream("models/mdl_1/model.tar.gz", io.BytesIO(data)) == len(data)
    assert store.size("models/mdl_1/model.tar.gz") == len(data)
    digest = hashlib.sha256()
    with store.open_stream("models/mdl_1/model.tar.gz") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../outside", "jobs/../../outside", "a//b", "a/./b", "a\\b", "a/\x00b"],
)
def test_keys_that_could_escape_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ObjectStoreError):
        store.put_bytes(key, b"x")
    with pytest.raises(ObjectStoreError):
        store.exists(key)


def test_local_store_refuses_symlinks_out_of_root(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    (tmp_path / "secret").mkdir()
    (tmp_path / "objects" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ObjectStoreError):
        store.put_bytes("link/file", b"x")
    assert not (tmp_path / "secret" / "file").exists()


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("a/b.json", b"old")

    class Exploding(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise OSError("disk gone")
            return super().read(4)

    with pytest.raises(OSError):
        store.put_stream("a/b.json", Exploding(b"new contents"))
    # The old object is intact and no temporary file is visible as an object.
    assert store.get_bytes("a/b.json") == b"old"
    assert store.list("a/") == ["a/b.json"]
    assert list((tmp_path / "objects" / "a").iterdir()) == [tmp_path / "objects" / "a" / "b.json"]


def test_local_presigned_url_is_none(tmp_path: Path) -> None:
    assert LocalObjectStore(tmp_path).presigned_url("a/b") is None


def test_s3_presigned_url_downloads_and_signature_is_checked(nanio: NanioServer) -> None:
    store = _s3(nanio, "presign")
    store.put_bytes("models/mdl_x/model.tar.gz", b"archive-bytes")
    url = store.presigned_url("models/mdl_x/model.tar.gz", expires=60)
    assert url is not None and "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"archive-bytes"
    # Tampering with the signed URL (or no signature at all) is refused by the server.
    assert httpx.get(url.replace("mdl_x", "mdl_y")).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403


def test_s3_wrong_secret_is_refused(nanio: NanioServer) -> None:
    _s3(nanio, "authcheck")
    bad = S3ObjectStore(
        "authcheck",
        endpoint_url=nanio.endpoint_url,
        credentials={"aws_access_key_id": nanio.access_key, "aws_secret_access_key": "wrong"},
    )
    assert not bad.ping()
    with pytest.raises(Exception, match="SignatureDoesNotMatch|403|Forbidden"):
        bad.put_bytes("x/y", b"z")


def test_tree_copies_upload_marker_last_and_resume(store: ObjectStore, tmp_path: Path) -> None:
    folder = tmp_path / "distill"
    (folder / "model" / "1_Pooling").mkdir(parents=True)
    (folder / "model" / "1_Pooling" / "config.json").write_text("{}")
    (folder / "history.json").write_text("[]")
    (folder / "manifest.json").write_text('{"stage": "distill"}')
    keys = copy_tree_to_store(store, folder, "jobs/j/distill", last="manifest.json")
    assert keys[-1] == "jobs/j/distill/manifest.json"
    assert sorted(keys) == store.list("jobs/j/distill/")

    target = tmp_path / "work" / "distill"
    assert len(copy_store_to_tree(store, "jobs/j/distill", target)) == 3
    assert (target / "model" / "1_Pooling" / "config.json").read_text() == "{}"
    # A second sync downloads nothing: files present with the right size are kept.
    assert copy_store_to_tree(store, "jobs/j/distill", target) == []


def test_object_store_from_url(tmp_path: Path, nanio: NanioServer) -> None:
    local = object_store_from_url(f"file://{tmp_path}/objs")
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path / "objs"
    bare = object_store_from_url(str(tmp_path / "bare"))
    assert isinstance(bare, LocalObjectStore) and bare.root == tmp_path / "bare"

    settings = SimpleNamespace(
        s3_endpoint_url=nanio.endpoint_url,
        s3_region=nanio.region,
        aws_access_key_id=nanio.access_key,
        aws_secret_access_key=nanio.secret_key,
        s3_create_bucket=True,
    )
    s3 = object_store_from_url("s3://fromurl/some/prefix", settings)
    assert isinstance(s3, S3ObjectStore) and s3.prefix == "some/prefix/"
    s3.put_bytes("k/v", b"1")
    plain = object_store_from_url("s3://fromurl", settings)
    assert plain.list("some/") == ["some/prefix/k/v"]

    with pytest.raises(ObjectStoreError):
        object_store_from_url("ftp://host/x")
