"""Safe in-memory archive reading: tar, gzip'd tar, and the Hex tarball (format 3).

Archives come from the internet, so every member is checked before its bytes are used:
absolute paths, `..` components, symbolic and hard links, device files and anything but
regular files and directories are refused, as is a member or a whole archive over the
size limits. Nothing is extracted to disk: members are read into memory, and a gzip
stream is inflated in bounded steps, so a gzip bomb stops at the uncompressed limit
rather than when memory runs out. Each refusal is a `BadMessage` subclass whose class
name and message say precisely what was wrong (they become the dead letter's reason).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass

from exforge.core.settings import Settings
from streams.stage import BadMessage

GZIP_MAGIC = b"\x1f\x8b"
INFLATE_STEP = 1024 * 1024
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
    actual = hashlib.sha256(data).hexdigest()
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


def check_compressed(data: bytes, limits: Limits, what: str = "archive") -> None:
    if len(data) > limits.compressed:
        raise ArchiveTooLarge(
            f"{what} is {len(data)} bytes, over the {limits.compressed}-byte compressed limit"
        )


def inflate(data: bytes, limit: int, what: str = "archive") -> bytes:
    """Gunzip `data` (all concatenated members) without ever holding more than `limit`
    bytes of output: a bomb raises `UncompressedTooLarge` after at most limit + 1 MiB."""
    out = bytearray()
    remaining = data
    try:
        while remaining:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = remaining
            while chunk:
                out += inflater.decompress(chunk, INFLATE_STEP)
                if len(out) > limit:
                    raise UncompressedTooLarge(
                        f"{what} inflates past the {limit}-byte uncompressed limit"
                    )
                chunk = inflater.unconsumed_tail
            out += inflater.flush()
            if not inflater.eof:
                raise CorruptArchive(f"{what}: truncated gzip stream")
            remaining = inflater.unused_data
    except zlib.error as exc:
        raise CorruptArchive(f"{what}: corrupt gzip stream: {exc}") from exc
    if len(out) > limit:
        raise UncompressedTooLarge(f"{what} inflates past the {limit}-byte uncompressed limit")
    return bytes(out)


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


def read_tar(data: bytes, limits: Limits, what: str = "archive") -> list[Member]:
    """Every regular file of a tar or gzip'd tar, checked, in archive order."""
    check_compressed(data, limits, what)
    raw = inflate(data, limits.uncompressed, what) if data.startswith(GZIP_MAGIC) else data
    if len(raw) > limits.uncompressed:
        raise UncompressedTooLarge(
            f"{what} is {len(raw)} bytes, over the {limits.uncompressed}-byte uncompressed limit"
        )
    members: list[Member] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                path = check_member(info, limits)
                if path is None:
                    continue
                handle = tar.extractfile(info)
                if handle is None:
                    raise CorruptArchive(f"{what}: member {info.name!r} has no data")
                members.append(Member(path, handle.read()))
    except (tarfile.TarError, EOFError) as exc:
        raise CorruptArchive(f"corrupt {what}: {exc}") from exc
    return members


@dataclass(frozen=True)
class HexTarball:
    """A Hex package tarball (format 3), verified and unpacked in memory."""

    metadata_config: str
    contents: bytes  # the gzip'd inner tar, still compressed
    inner_checksum: str


def looks_like_hex_tarball(members: list[Member]) -> bool:
    names = {m.path for m in members}
    return "VERSION" in names and "contents.tar.gz" in names


def read_hex_tarball(data: bytes, limits: Limits) -> HexTarball:
    """Check the outer layout (VERSION "3", CHECKSUM, metadata.config, contents.tar.gz)
    and the inner checksum: sha256 of VERSION, metadata.config and contents.tar.gz."""
    members = read_tar(data, limits, "hex tarball")
    return hex_tarball(members)


def hex_tarball(members: list[Member]) -> HexTarball:
    by_name = {m.path: m.data for m in members}
    names = [m.path for m in members]
    if sorted(names) != sorted(HEX_OUTER_MEMBERS):
        raise NotHexTarball(
            f"hex tarball has members {names}, expected exactly {list(HEX_OUTER_MEMBERS)}"
        )
    version = by_name["VERSION"].strip()
    if version != HEX_FORMAT_VERSION:
        raise NotHexTarball(f"hex tarball format {version.decode(errors='replace')!r} is not 3")
    digest = hashlib.sha256(
        by_name["VERSION"] + by_name["metadata.config"] + by_name["contents.tar.gz"]
    ).hexdigest()
    declared = by_name["CHECKSUM"].strip().decode(errors="replace").lower()
    if declared != digest:
        raise NotHexTarball(f"hex tarball inner CHECKSUM {declared} does not match {digest}")
    try:
        metadata = by_name["metadata.config"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotHexTarball(f"hex metadata.config is not UTF-8 at byte {exc.start}") from None
    return HexTarball(metadata, by_name["contents.tar.gz"], digest)


def source_members(archive: bytes, limits: Limits, strip_root: bool = False) -> list[Member]:
    """The files of a source archive: a Hex tarball's inner contents, or a plain (gzip'd)
    tar; `strip_root` drops the single top directory GitHub archives put everything in."""
    members = read_tar(archive, limits)
    if looks_like_hex_tarball(members):
        members = read_tar(hex_tarball(members).contents, limits, "hex contents.tar.gz")
    if strip_root:
        members = [Member(m.path.partition("/")[2], m.data) for m in members if "/" in m.path]
    return members
