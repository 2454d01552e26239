"""Safe archive reading, the Erlang-terms reader and license normalisation."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from servers.hex import elixir_module, file_entry, hex_tarball, metadata_config, tar_of

from streams import archives
from streams.archives import Limits, read_hex_tarball, read_tar, source_members
from streams.parse import elixir_members
from streams.sources.erlterms import TermError, parse_metadata, parse_terms
from streams.sources.licenses import decide, normalise

LIMITS = Limits(compressed=1 << 20, uncompressed=4 << 20, member=256 << 10)
ALLOW = frozenset({"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC"})


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


HOSTILE = {
    "parent": ([file_entry("lib/../../evil.ex", b"x")], archives.PathTraversal, "'..'"),
    "absolute": ([file_entry("/tmp/evil.ex", b"x")], archives.AbsolutePath, "absolute"),
    "symlink": (
        [special("lib/link.ex", tarfile.SYMTYPE, "/etc/passwd")],
        archives.LinkMember,
        "symbolic link to '/etc/passwd'",
    ),
    "hardlink": (
        [file_entry("lib/a.ex", b"a"), special("lib/b.ex", tarfile.LNKTYPE, "lib/a.ex")],
        archives.LinkMember,
        "hard link",
    ),
    "device": ([special("dev/null", tarfile.CHRTYPE)], archives.DeviceMember, "character device"),
    "fifo": ([special("lib/pipe", tarfile.FIFOTYPE)], archives.DeviceMember, "fifo"),
    "oversize": (
        [file_entry("lib/big.ex", b"#" * (LIMITS.member + 1))],
        archives.MemberTooLarge,
        "over the 262144-byte limit",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_with_a_precise_reason(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries, error, phrase = HOSTILE[case]
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd would show here
    for archive in (tar_of(entries), tar_of(entries, gz=True)):
        with pytest.raises(error, match=phrase):
            read_tar(archive, LIMITS)
    tarball = hex_tarball("evil", "1.0.0", contents=tar_of(entries, gz=True))
    with pytest.raises(error, match=phrase):
        list(elixir_members(tarball, LIMITS))
    assert os.listdir(tmp_path) == []
    assert not Path("/tmp/evil.ex").exists()


def test_a_gzip_bomb_stops_at_the_uncompressed_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    assert len(bomb) < LIMITS.compressed
    with pytest.raises(archives.UncompressedTooLarge, match="4194304-byte uncompressed limit"):
        read_tar(bomb, LIMITS)
    tarball = hex_tarball("bomb", "1.0.0", contents=bomb)
    with pytest.raises(archives.UncompressedTooLarge):
        list(elixir_members(tarball, LIMITS))


def test_compressed_limit_and_corrupt_streams() -> None:
    with pytest.raises(archives.ArchiveTooLarge, match="compressed limit"):
        read_tar(b"x" * (LIMITS.compressed + 1), LIMITS)
    with pytest.raises(archives.CorruptArchive):
        read_tar(b"not a tar at all" * 64, LIMITS)
    with pytest.raises(archives.CorruptArchive, match="truncated gzip"):
        read_tar(gzip.compress(b"abc" * 1000)[:-20], LIMITS)


def test_hex_tarball_layout_and_inner_checksum() -> None:
    files = {"lib/a.ex": elixir_module("A"), "mix.exs": b"# mix", "README.md": b"hi"}
    tarball = hex_tarball("a", "0.1.0", files, licenses=["Apache 2"])
    parsed = read_hex_tarball(tarball, LIMITS)
    metadata = parse_metadata(parsed.metadata_config)
    assert metadata["name"] == "a" and metadata["licenses"] == ["Apache 2"]
    assert metadata["requirements"] == [
        {"name": "jason", "app": "jason", "optional": False, "requirement": "~> 1.0"}
    ]
    assert {m.path for m in source_members(tarball, LIMITS)} == set(files)
    assert [m.path for m in elixir_members(tarball, LIMITS)] == ["lib/a.ex", "mix.exs"]

    members = tar_of(
        [
            file_entry("VERSION", b"3"),
            file_entry("CHECKSUM", b"0" * 64),
            file_entry("metadata.config", b""),
            file_entry("contents.tar.gz", tar_of([], gz=True)),
        ]
    )
    with pytest.raises(archives.NotHexTarball, match="inner CHECKSUM"):
        read_hex_tarball(members, LIMITS)
    with pytest.raises(archives.NotHexTarball, match="expected exactly"):
        read_hex_tarball(tar_of([file_entry("VERSION", b"3")]), LIMITS)


def test_github_archives_lose_their_top_directory() -> None:
    archive = tar_of(
        [file_entry("o-r-abc123/lib/x.ex", b"x"), file_entry("o-r-abc123/README.md", b"r")],
        gz=True,
    )
    paths = [m.path for m in source_members(archive, LIMITS, strip_root=True)]
    assert paths == ["lib/x.ex", "README.md"]


def test_erlang_terms_subset() -> None:
    text = (
        '%% comment\n{<<"name">>,<<"caf\\303\\251">>}.\n'
        '{<<"unicode">>,<<"héllo"/utf8>>}.\n'
        '{<<"bytes">>,<<104,105>>}.\n{<<"empty">>,<<>>}.\n'
        '{<<"nums">>,[1,-2,3.5]}.\n{<<"flags">>,{true,false,nil,\'quoted atom\'}}.\n'
        '{<<"str">>,"a \\"q\\" \\n"}.\n'
    )
    metadata = parse_metadata(text)
    assert metadata == {
        "name": "caf\u00c3\u00a9",  # octal escapes are bytes, as Erlang prints them
        "unicode": "héllo",
        "bytes": "hi",
        "empty": "",
        "nums": [1, -2, 3.5],
        "flags": [True, False, "nil", "quoted atom"],
        "str": 'a "q" \n',
    }
    assert parse_metadata(metadata_config({"licenses": ["MIT", "Apache 2"]}).decode()) == {
        "licenses": ["MIT", "Apache 2"]
    }
    for bad in ('{<<"a">>,os:cmd("rm")}.', "{a,b", "fun() -> ok end.", "[" * 100 + "]" * 100 + "."):
        with pytest.raises(TermError):
            parse_terms(bad)


@pytest.mark.parametrize(
    ("declared", "spdx", "allowed", "reason"),
    [
        ("Apache 2", "Apache-2.0", True, None),
        ("Apache License, Version 2.0", "Apache-2.0", True, None),
        ("MIT License", "MIT", True, None),
        ("BSD 3-Clause", "BSD-3-Clause", True, None),
        ("MIT OR GPL-3.0", "MIT OR GPL-3.0-only", True, None),
        ("GPL v3", "GPL-3.0-only", False, "not_permissive"),
        ("LGPL-2.1", "LGPL-2.1-only", False, "not_permissive"),
        ("MIT AND Some Custom", "MIT", False, "unknown_license"),
        ("Proprietary", None, False, "unknown_license"),
        (None, None, False, "no_license"),
    ],
)
def test_license_normalisation_and_allow_list(
    declared: str | None, spdx: str | None, allowed: bool, reason: str | None
) -> None:
    decision = decide(declared, ALLOW)
    assert (decision.spdx, decision.allowed, decision.reason) == (spdx, allowed, reason)


def test_normalise_accepts_spdx_ids_in_any_case() -> None:
    assert normalise("apache-2.0") == "Apache-2.0"
    assert normalise("isc") == "ISC"
    assert normalise("Something Else") is None


MEMBER_BYTES = 1 << 20
STREAM_LIMITS = Limits(compressed=64 << 20, uncompressed=256 << 20, member=32 << 20)


def write_large_archive(path: Path, members: int, hex_layout: bool) -> None:
    """A gzip'd tar of `members` incompressible 1 MiB files written to `path` member by
    member (so the test itself never holds it), as a Hex tarball when `hex_layout`."""
    inner = path.with_suffix(".contents") if hex_layout else path
    with tarfile.open(inner, mode="w:gz", compresslevel=1) as tar:
        for index in range(members):
            info = tarfile.TarInfo(f"lib/m{index}.ex")
            info.size = MEMBER_BYTES
            tar.addfile(info, io.BytesIO(os.urandom(MEMBER_BYTES)))
    if not hex_layout:
        return
    version, metadata = b"3", metadata_config({"name": "big", "version": "1.0.0"})
    digest = hashlib.sha256(version + metadata)
    with inner.open("rb") as handle:
        digest.update(handle.read())  # the helper may; the reader under test may not
    with tarfile.open(path, mode="w") as tar:
        for name, data in (
            ("VERSION", version),
            ("CHECKSUM", digest.hexdigest().upper().encode()),
            ("metadata.config", metadata),
        ):
            tar.addfile(file_entry(name, data)[0], io.BytesIO(data))
        tar.add(inner, arcname="contents.tar.gz")
    inner.unlink()


@pytest.mark.parametrize("hex_layout", [False, True], ids=["tar.gz", "hex"])
def test_a_large_archive_is_streamed_with_memory_bounded_by_a_member(
    hex_layout: bool, tmp_path: Path
) -> None:
    members = 24
    path = tmp_path / "big.tar"
    write_large_archive(path, members, hex_layout)
    size = path.stat().st_size
    assert size > members * MEMBER_BYTES  # incompressible: the archive is as large
    seen = 0
    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            for member in source_members(handle, STREAM_LIMITS):
                assert len(member.data) == MEMBER_BYTES
                seen += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == members
    # a few members and read buffers at a time, never the archive
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte archive"


def test_streamed_hex_tarball_still_verifies_its_inner_checksum(tmp_path: Path) -> None:
    path = tmp_path / "big.tar"
    write_large_archive(path, 3, hex_layout=True)
    data = bytearray(path.read_bytes())
    data[-4096] ^= 0xFF  # inside contents.tar.gz (the last member), past the headers
    with pytest.raises(archives.ArchiveError):
        list(source_members(io.BytesIO(bytes(data)), STREAM_LIMITS))
