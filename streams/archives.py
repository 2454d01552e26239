"""Safe streamed archive reading: tar, gzip'd tar, and the Hex tarball (format 3).

Archives come from the internet, so every member is checked before its bytes are used:
absolute paths, `..` components, symbolic and hard links, device files and anything but
regular files and directories are refused, as is a member or a whole archive over the
size limits. Nothing is extracted to disk and no archive is held whole: it is read as a
stream (from the store's reader, a file, or bytes), inflated in bounded steps and
passed on one member at a time, so memory is bounded by the largest member (the member
limit), not by the archive, and a gzip bomb stops at the uncompressed limit rather than
when memory runs out. A Hex tarball's contents.tar.gz is spooled (to a temporary file
past `SPOOL_BYTES`) until its checksum is verified, then streamed. Each refusal is a
`BadMessage` subclass whose class name and message say precisely what was wrong (they
become the dead letter's reason).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, cast

from exforge.core.settings import Settings
from exforge.core.store import digest_of_stream
from streams.stage import BadMessage

GZIP_MAGIC = b"\x1f\x8b"
READ_STEP = 256 * 1024  # bytes read (or inflated) from a stream at a time
SPOOL_BYTES = 1024 * 1024  # a Hex contents.tar.gz larger than this is spooled to disk
HEX_OUTER_MEMBERS = ("VERSION", "CHECKSUM", "metadata.config", "contents.tar.gz")
HEX_FORMAT_VERSION = b"3"
DEVICE_TYPES = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


class ArchiveError(BadMessage):
    """An archive was refused; the subclass names the rule it broke."""


class CorruptArchive(ArchiveError):
    """Not a readable tar (or gzip) stream."""


class UnsafeMember(ArchiveError):
    """A member that could land outside the extraction directory or is not a plain file."""


class AbsolutePath(UnsafeMember):
    pass


class PathTraversal(UnsafeMember):
    pass


class LinkMember(UnsafeMember):
    pass


class DeviceMember(UnsafeMember):
    pass


class ArchiveTooLarge(ArchiveError):
    """A size limit was exceeded (compressed size, one member, or the total)."""


class MemberTooLarge(ArchiveTooLarge):
    pass


class UncompressedTooLarge(ArchiveTooLarge):
    pass


class ChecksumMismatch(ArchiveError):
    """The archive's sha256 is not the one its source declared."""


def verify_sha256(data: bytes, expected: str | None, what: str = "archive") -> str:
    """The sha256 of `data`, checked against the expected one (when there is one)."""
    return check_sha256(hashlib.sha256(data).hexdigest(), expected, what)


def check_sha256(actual: str, expected: str | None, what: str = "archive") -> str:
    """`actual`, when it is the expected sha256 (or nothing was expected)."""
    if expected is not None and actual != expected.lower():
        raise ChecksumMismatch(f"{what} sha256 {actual} does not match the expected {expected}")
    return actual


class NotHexTarball(ArchiveError):
    """The outer tar does not have the Hex format 3 layout or its inner checksum is wrong."""


@dataclass(frozen=True)
class Limits:
    """Size limits, in bytes, applied to every archive read."""

    compressed: int
    uncompressed: int
    member: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            compressed=settings.archive_max_compressed_bytes,
            uncompressed=settings.archive_max_uncompressed_bytes,
            member=settings.archive_max_member_bytes,
        )

    @classmethod
    def defaults(cls) -> Limits:
        """The limits of the settings' defaults (for callers without settings)."""
        fields = Settings.model_fields
        return cls(
            compressed=fields["archive_max_compressed_bytes"].default,
            uncompressed=fields["archive_max_uncompressed_bytes"].default,
            member=fields["archive_max_member_bytes"].default,
        )


@dataclass(frozen=True)
class Member:
    """A regular file of an archive: its safe relative path and its bytes."""

    path: str
    data: bytes


def check_compressed(size: int, limits: Limits, what: str = "archive") -> None:
    if size > limits.compressed:
        raise ArchiveTooLarge(
            f"{what} is {size} bytes, over the {limits.compressed}-byte compressed limit"
        )


class Bounded(io.RawIOBase):
    """A reader that passes on at most `limit` bytes of `source`: reading past them raises
    the error `refuse(total)` makes (so a stream is refused as soon as it is too long,
    without ever holding it)."""

    def __init__(self, source: BinaryIO, limit: int, refuse: Callable[[int], ArchiveError]) -> None:
        self.source = source
        self.limit = limit
        self.refuse = refuse
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        self.total += len(data)
        if self.total > self.limit:
            raise self.refuse(self.total)
        buffer[: len(data)] = data
        return len(data)


class Gunzip(io.RawIOBase):
    """The inflated bytes of a gzip stream (all its concatenated members), `READ_STEP`
    of input and at most the caller's buffer of output at a time."""

    def __init__(self, source: BinaryIO, what: str) -> None:
        self.source = source
        self.what = what
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.tail = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            while True:
                if self.inflater.eof:
                    rest = self.inflater.unused_data or self.source.read(READ_STEP)
                    if not rest:
                        return 0
                    self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self.tail = rest
                if not self.tail:
                    self.tail = self.source.read(READ_STEP)
                    if not self.tail:
                        raise CorruptArchive(f"{self.what}: truncated gzip stream")
                out = self.inflater.decompress(self.tail, len(buffer))
                self.tail = self.inflater.unconsumed_tail
                if out:
                    buffer[: len(out)] = out
                    return len(out)
        except zlib.error as exc:
            raise CorruptArchive(f"{self.what}: corrupt gzip stream: {exc}") from exc


def tar_stream(source: BinaryIO, limits: Limits, what: str = "archive") -> BinaryIO:
    """The tar bytes of a tar or gzip'd tar read from `source`, within the compressed and
    uncompressed limits (a gzip bomb stops at the uncompressed limit)."""

    def over_compressed(total: int) -> ArchiveError:
        return ArchiveTooLarge(f"{what} is over the {limits.compressed}-byte compressed limit")

    def over_uncompressed(total: int) -> ArchiveError:
        return UncompressedTooLarge(
            f"{what} inflates past the {limits.uncompressed}-byte uncompressed limit"
        )

    compressed = io.BufferedReader(Bounded(source, limits.compressed, over_compressed))
    raw: BinaryIO = compressed
    if compressed.peek(len(GZIP_MAGIC)).startswith(GZIP_MAGIC):
        raw = io.BufferedReader(Gunzip(compressed, what), READ_STEP)
    return io.BufferedReader(Bounded(raw, limits.uncompressed, over_uncompressed), READ_STEP)


class MemberReader(io.RawIOBase):
    """The bytes of the current member of a streamed tar; a stream that ends early is a
    `CorruptArchive`."""

    def __init__(self, handle: IO[bytes], what: str) -> None:
        self.handle = handle
        self.what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.handle.read(len(buffer))
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptArchive(f"corrupt {self.what}: {exc}") from exc
        buffer[: len(data)] = data
        return len(data)


def tar_entries(
    source: BinaryIO | bytes, limits: Limits, what: str = "archive"
) -> Iterator[tuple[str, BinaryIO]]:
    """Every regular file of a tar or gzip'd tar, checked, in archive order, as (safe
    path, reader of its bytes), read from `source` as a stream: one member at a time, a
    member's reader valid until the next is asked for. After the last member the rest
    of the stream is read through (not kept), so the limits and the gzip framing hold
    for all of it."""
    if isinstance(source, bytes):
        check_compressed(len(source), limits, what)  # known before reading
        source = io.BytesIO(source)
    stream = tar_stream(source, limits, what)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                tar.members.clear()  # tarfile keeps every header read; none is needed again
                path = check_member(info, limits)
                if path is None:
                    continue
                handle = tar.extractfile(info)
                if handle is None:
                    raise CorruptArchive(f"{what}: member {info.name!r} has no data")
                yield path, cast(BinaryIO, MemberReader(handle, what))
        while stream.read(READ_STEP):
            pass
    except (tarfile.TarError, EOFError) as exc:
        raise CorruptArchive(f"corrupt {what}: {exc}") from exc


def safe_path(name: str) -> str:
    """The member name as a relative POSIX path, or an `UnsafeMember` error."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise AbsolutePath(f"member {name!r} has an absolute path")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PathTraversal(f"member {name!r} has a '..' component (escapes the archive)")
    return "/".join(parts)


def check_member(member: tarfile.TarInfo, limits: Limits) -> str | None:
    """The member's safe path if it is a regular file, None for a directory; raise for
    anything else, or for a file over the member limit."""
    path = safe_path(member.name)
    if member.issym():
        raise LinkMember(f"member {member.name!r} is a symbolic link to {member.linkname!r}")
    if member.islnk():
        raise LinkMember(f"member {member.name!r} is a hard link to {member.linkname!r}")
    if member.type in DEVICE_TYPES:
        raise DeviceMember(f"member {member.name!r} is a {DEVICE_TYPES[member.type]}")
    if member.isdir():
        return None
    if not member.isreg():
        raise UnsafeMember(f"member {member.name!r} has unsupported type {member.type!r}")
    if member.size > limits.member:
        raise MemberTooLarge(
            f"member {member.name!r} is {member.size} bytes, over the {limits.member}-byte limit"
        )
    if not path:
        raise UnsafeMember(f"member {member.name!r} has an empty path")
    return path


def members(source: BinaryIO | bytes, limits: Limits, what: str = "archive") -> Iterator[Member]:
    """Every regular file of a tar or gzip'd tar, checked, in archive order, one at a time."""
    for path, handle in tar_entries(source, limits, what):
        yield Member(path, handle.read())


def read_tar(data: bytes | BinaryIO, limits: Limits, what: str = "archive") -> list[Member]:
    """Every regular file of a tar or gzip'd tar, checked, in archive order, in a list."""
    return list(members(data, limits, what))


@dataclass(frozen=True)
class HexTarball:
    """A Hex package tarball (format 3), its layout and inner checksum verified."""

    metadata_config: str
    contents: BinaryIO  # the gzip'd inner tar, still compressed, spooled, at its start
    inner_checksum: str


def spool(handle: BinaryIO) -> BinaryIO:
    """A copy of the stream `handle`, in memory up to `SPOOL_BYTES`, else in a temporary
    file; at its start."""
    copy = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned)
    shutil.copyfileobj(handle, copy, READ_STEP)
    copy.seek(0)
    return cast(BinaryIO, copy)


@dataclass
class HexOuter:
    """The outer members of a would-be Hex tarball as they are read, in archive order:
    contents.tar.gz spooled, the others in memory."""

    names: list[str] = field(default_factory=list)
    small: dict[str, bytes] = field(default_factory=dict)
    contents: BinaryIO | None = None

    def add(self, path: str, handle: BinaryIO) -> None:
        self.names.append(path)
        if path == "contents.tar.gz":
            self.contents = spool(handle)
        else:
            self.small[path] = handle.read()

    def looks_like_hex(self) -> bool:
        return "VERSION" in self.names and "contents.tar.gz" in self.names

    def tarball(self) -> HexTarball:
        """The tarball of these members, its layout and inner checksum checked."""
        small, contents = self.small, self.contents
        if sorted(self.names) != sorted(HEX_OUTER_MEMBERS) or contents is None:
            raise NotHexTarball(
                f"hex tarball has members {self.names}, expected exactly {list(HEX_OUTER_MEMBERS)}"
            )
        version = small["VERSION"].strip()
        if version != HEX_FORMAT_VERSION:
            raise NotHexTarball(f"hex tarball format {version.decode(errors='replace')!r} is not 3")
        digest, _ = digest_of_stream(
            contents, hashlib.sha256(small["VERSION"] + small["metadata.config"]), READ_STEP
        )
        contents.seek(0)
        declared = small["CHECKSUM"].strip().decode(errors="replace").lower()
        if declared != digest:
            raise NotHexTarball(f"hex tarball inner CHECKSUM {declared} does not match {digest}")
        try:
            metadata = small["metadata.config"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotHexTarball(f"hex metadata.config is not UTF-8 at byte {exc.start}") from None
        return HexTarball(metadata, contents, digest)

    def members(self) -> Iterator[Member]:
        """The members as they were, for an archive that is not a Hex tarball after all."""
        for name in self.names:
            if name == "contents.tar.gz":
                assert self.contents is not None
                with self.contents:
                    yield Member(name, self.contents.read())
            else:
                yield Member(name, self.small[name])


def read_hex_tarball(data: bytes | BinaryIO, limits: Limits) -> HexTarball:
    """Check the outer layout (VERSION "3", CHECKSUM, metadata.config, contents.tar.gz)
    and the inner checksum: sha256 of VERSION, metadata.config and contents.tar.gz."""
    outer = HexOuter()
    for path, handle in tar_entries(data, limits, "hex tarball"):
        outer.add(path, handle)
    return outer.tarball()


def source_members(
    archive: bytes | BinaryIO, limits: Limits, strip_root: bool = False
) -> Iterator[Member]:
    """The files of a source archive, one at a time: a Hex tarball's inner contents, or
    a plain (gzip'd) tar; `strip_root` drops the single top directory GitHub archives put
    everything in.

    The archive is read as a stream. Members named like a Hex tarball's are held back
    (contents.tar.gz spooled) while every member so far has such a name; at the end, an
    archive with VERSION and contents.tar.gz is a Hex tarball, checked as one and its
    inner tar streamed from the spool. Once another name appears, it is a plain tar and
    what was held back is passed on first."""
    for member in _unwrapped(archive, limits):
        if not strip_root:
            yield member
        elif "/" in member.path:
            yield Member(member.path.partition("/")[2], member.data)


def _unwrapped(archive: bytes | BinaryIO, limits: Limits) -> Iterator[Member]:
    outer = HexOuter()
    held = True
    for path, handle in tar_entries(archive, limits):
        if held and path in HEX_OUTER_MEMBERS and path not in outer.names:
            outer.add(path, handle)
            continue
        if held:
            held = False
            yield from outer.members()
        yield Member(path, handle.read())
    if not held:
        return
    if outer.looks_like_hex():
        with outer.tarball().contents as inner:
            yield from members(inner, limits, "hex contents.tar.gz")
    else:
        yield from outer.members()
