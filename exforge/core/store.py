"""Object store: one interface, a local-filesystem backend and an S3 backend.

Writes are atomic on both (temp file + rename locally; S3 PUTs are atomic by nature).
Raw archives are content-addressed: their key contains their sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import unquote, urlparse

from exforge.core.settings import Settings


class StoreError(RuntimeError):
    """The store cannot be reached or refused an operation."""


class ObjectNotFound(KeyError):
    """No object under that key."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of_stream(
    handle: BinaryIO, digest: hashlib._Hash | None = None, step: int = 256 * 1024
) -> tuple[str, int]:
    """The sha256 and the size of everything `handle` has left to read, read in steps;
    `digest` continues a hash already fed with what precedes the stream."""
    digest, size = digest or hashlib.sha256(), 0
    while chunk := handle.read(step):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(ABC):
    """Minimal blob store: put/get/exists/delete/list by key."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object's bytes as a stream, closed on leaving the context (for objects
        too large to hold whole); `ObjectNotFound` when there is none."""

    def digest(self, key: str) -> tuple[str, int]:
        """The sha256 and size of an object, read as a stream."""
        with self.reader(key) as handle:
            return digest_of_stream(handle)

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    def put_content_addressed(self, prefix: str, data: bytes, suffix: str = "") -> str:
        """Store `data` under `prefix/<sha256><suffix>` (once) and return the key."""
        key = f"{prefix.rstrip('/')}/{sha256_hex(data)}{suffix}"
        if not self.exists(key):
            self.put(key, data)
        return key


class FileStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    @contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        try:
            handle = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        with handle:
            yield handle

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():  # a "directory" key is no object: nothing to delete, as on S3
            path.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)  # plain string order, as S3 lists (not Path's per-part order)


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool,
        region: str | None = None,
    ) -> None:
        from minio import Minio

        self.bucket = bucket
        self.url = f"s3://{bucket}"
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
        )
        try:
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)
        except Exception as exc:
            raise StoreError(f"S3 endpoint {endpoint} bucket {bucket}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, _check_key(key), io.BytesIO(data), len(data))

    def get(self, key: str) -> bytes:
        with self.reader(key) as response:
            return response.read()

    @contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, _check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            raise
        try:
            yield cast(BinaryIO, response)
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, _check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, _check_key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
            yield obj.object_name


def open_store(settings: Settings) -> ObjectStore:
    """The store named by `EXFORGE_STORE_URL` (default: files under the data dir)."""
    url = urlparse(settings.resolved_store_url)
    if url.scheme == "file":
        return FileStore(Path(unquote(url.path)))
    if url.scheme == "s3":
        if not settings.s3_endpoint:
            raise StoreError("EXFORGE_STORE_URL is s3://… but EXFORGE_S3_ENDPOINT is unset")
        return S3Store(
            bucket=url.netloc or "exforge",
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
    raise StoreError(f"EXFORGE_STORE_URL: unsupported scheme {url.scheme!r} (file:// or s3://)")
