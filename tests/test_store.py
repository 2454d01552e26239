"""The object store, on the file backend and on S3 (a moto server over HTTP)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from minio import Minio

from exforge.core.settings import load_settings
from exforge.core.store import (
    FileStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoreError,
    open_store,
)

INVALID_KEYS = ["../x", "/abs", "a//b", "", "a/../b", "./a", "a/", "a/."]


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No EXFORGE_* variable or exforge.toml from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("EXFORGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EXFORGE_CONFIG", str(tmp_path / "absent.toml"))


def _minio(endpoint: str) -> Minio:
    return Minio(endpoint, access_key="testing", secret_key="testing", secure=False)


# --- both backends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [bytes(range(256)) * 4, b"", os.urandom(5 * 1024 * 1024)],
    ids=["binary", "empty", "5MiB"],
)
def test_put_get_round_trip(store: ObjectStore, data: bytes) -> None:
    store.put("dir/blob.bin", data)
    assert store.get("dir/blob.bin") == data
    assert store.exists("dir/blob.bin")


def test_reader_streams_an_object_in_steps_and_hashes_it(store: ObjectStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put("raw/blob.tar", data)
    with store.reader("raw/blob.tar") as handle:
        first = handle.read(1024)
        rest = handle.read()
    assert first + rest == data and len(first) == 1024
    assert store.digest("raw/blob.tar") == (hashlib.sha256(data).hexdigest(), len(data))
    with pytest.raises(ObjectNotFound), store.reader("raw/absent.tar"):
        pass


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("k", b"old content, longer than the new one")
    store.put("k", b"new")
    assert store.get("k") == b"new"
    assert list(store.list()) == ["k"]


def test_get_missing_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get("no/such/key")
    assert isinstance(info.value, KeyError)
    assert info.value.args == ("no/such/key",)


def test_exists_and_delete(store: ObjectStore) -> None:
    assert not store.exists("a/b")
    store.put("a/b", b"x")
    store.put("a/c", b"y")
    assert store.exists("a/b")
    store.delete("a/b")
    assert not store.exists("a/b")
    with pytest.raises(ObjectNotFound):
        store.get("a/b")
    assert list(store.list()) == ["a/c"]


def test_delete_missing_is_a_noop(store: ObjectStore) -> None:
    store.delete("never/written")
    store.put("k", b"x")
    store.delete("k")
    store.delete("k")
    assert list(store.list()) == []


def test_key_prefix_of_a_nested_key_is_not_an_object(store: ObjectStore) -> None:
    """Key `a` is a directory on the file backend, but not an object on either backend."""
    store.put("a/b", b"x")
    assert not store.exists("a")
    with pytest.raises(ObjectNotFound):
        store.get("a")
    with pytest.raises(ObjectNotFound):
        store.get("a/b/c")
    store.delete("a")
    store.delete("a/b/c")
    assert store.get("a/b") == b"x"


def test_list_empty_store(store: ObjectStore) -> None:
    assert list(store.list()) == []
    assert list(store.list("any/")) == []


def test_list_is_sorted_with_prefix(store: ObjectStore) -> None:
    keys = ["b", "a/x", "ab/z", "a/b/d", "a-c", "a/b/c", "a.txt"]
    for key in keys:
        store.put(key, key.encode())
    # Plain string order, as S3 lists: "a-c" and "a.txt" sort before "a/..." ('-' < '.' < '/').
    assert list(store.list()) == ["a-c", "a.txt", "a/b/c", "a/b/d", "a/x", "ab/z", "b"]
    assert list(store.list("a/")) == ["a/b/c", "a/b/d", "a/x"]
    assert list(store.list("a/b")) == ["a/b/c", "a/b/d"]
    assert list(store.list("a/b/c")) == ["a/b/c"]
    # A prefix is a string prefix, not a directory.
    assert list(store.list("a")) == ["a-c", "a.txt", "a/b/c", "a/b/d", "a/x", "ab/z"]
    assert list(store.list("a/x")) == ["a/x"]
    assert list(store.list("zzz")) == []


@pytest.mark.parametrize("key", INVALID_KEYS)
@pytest.mark.parametrize("op", ["put", "get", "exists", "delete"])
def test_invalid_keys_are_rejected(store: ObjectStore, op: str, key: str) -> None:
    call = {
        "put": lambda: store.put(key, b"x"),
        "get": lambda: store.get(key),
        "exists": lambda: store.exists(key),
        "delete": lambda: store.delete(key),
    }[op]
    with pytest.raises(ValueError, match="invalid object key"):
        call()
    assert list(store.list()) == []


def test_put_content_addressed_key(store: ObjectStore) -> None:
    data = b"some archive bytes"
    digest = hashlib.sha256(data).hexdigest()
    key = store.put_content_addressed("raw/hex", data, suffix=".tar")
    assert key == f"raw/hex/{digest}.tar"
    assert store.get(key) == data
    assert store.put_content_addressed("raw/hex/", data, suffix=".tar") == key
    assert store.put_content_addressed("raw/hex", data) == f"raw/hex/{digest}"


def test_put_content_addressed_is_idempotent_without_rewriting(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1024)
    first = store.put_content_addressed("raw", data, suffix=".bin")

    puts: list[str] = []
    real_put = store.put
    monkeypatch.setattr(store, "put", lambda key, blob: (puts.append(key), real_put(key, blob)))
    second = store.put_content_addressed("raw", data, suffix=".bin")

    assert second == first
    assert puts == []
    assert list(store.list()) == [first]
    assert store.get(first) == data


# --- file backend ----------------------------------------------------------------------


def test_file_store_content_addressed_keeps_the_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    key = store.put_content_addressed("raw", b"data", suffix=".tgz")
    path = tmp_path / "store" / key
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert store.put_content_addressed("raw", b"data", suffix=".tgz") == key
    assert path.stat().st_mtime_ns == 1_000_000_000


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_file_store_write_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = FileStore(tmp_path / "store")
    store.put("dir/key.tar.gz", b"old content")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.put("dir/key.tar.gz", b"new content")
    monkeypatch.undo()

    assert store.get("dir/key.tar.gz") == b"old content"
    assert list(store.list()) == ["dir/key.tar.gz"]
    on_disk = [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert on_disk == ["key.tar.gz"]


def test_file_store_list_hides_leftover_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.put("dir/key", b"x")
    (tmp_path / "store" / "dir" / ".tmp-abc123").write_bytes(b"half written")
    assert list(store.list()) == ["dir/key"]


def test_file_store_url_and_root(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "new" / "store")
    assert store.root == (tmp_path / "new" / "store").resolve()
    assert store.root.is_dir()
    assert store.url == store.root.as_uri()


# --- open_store ------------------------------------------------------------------------


def test_open_store_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "objects"
    monkeypatch.setenv("EXFORGE_STORE_URL", root.as_uri())
    store = open_store(load_settings())
    assert isinstance(store, FileStore)
    assert store.root == root.resolve()
    store.put("k", b"v")
    assert (root / "k").read_bytes() == b"v"


def test_open_store_default_is_files_in_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data dir é"  # as_uri() percent-encodes these
    monkeypatch.setenv("EXFORGE_DATA_DIR", str(data_dir))
    store = open_store(load_settings())
    assert isinstance(store, FileStore)
    assert store.root == (data_dir / "store").resolve()
    assert store.root.is_dir()


def test_open_store_s3_creates_missing_bucket(s3_settings_env: str, s3_endpoint: str) -> None:
    bucket = s3_settings_env
    client = _minio(s3_endpoint)
    assert not client.bucket_exists(bucket)

    store = open_store(load_settings())

    assert isinstance(store, S3Store)
    assert store.bucket == bucket
    assert store.url == f"s3://{bucket}"
    assert client.bucket_exists(bucket)
    store.put("x/y", b"payload")
    response = client.get_object(bucket, "x/y")
    try:
        assert response.read() == b"payload"
    finally:
        response.close()
        response.release_conn()


def test_open_store_s3_reuses_existing_bucket(s3_settings_env: str, s3_endpoint: str) -> None:
    bucket = s3_settings_env
    client = _minio(s3_endpoint)
    client.make_bucket(bucket)
    store = open_store(load_settings())
    store.put("k", b"v")
    assert open_store(load_settings()).get("k") == b"v"


def test_open_store_s3_without_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFORGE_STORE_URL", "s3://bucket")
    with pytest.raises(StoreError, match="EXFORGE_S3_ENDPOINT"):
        open_store(load_settings())


@pytest.mark.parametrize("url", ["gs://bucket", "ftp://host/path", "/plain/path"])
def test_open_store_unknown_scheme(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("EXFORGE_STORE_URL", url)
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store(load_settings())
