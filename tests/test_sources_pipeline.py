"""Sources end to end: the CLI against the local Hex server, a real worker on the
embedded broker, hostile archives to the DLQ, licenses withheld, book segments out."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Pipeline
from servers.hex import (
    HexRegistry,
    Package,
    Release,
    elixir_module,
    file_entry,
    hex_server,
    hex_tarball,
    populated,
    tar_of,
)
from test_sources_books import CODE_BLOCKS, make_pdf

from exforge.core.kafka import read_all
from exforge.core.stack import free_port
from schemas.records import ParsedFile

pytestmark = pytest.mark.slow

MEMBER_LIMIT = 64 * 1024
UNCOMPRESSED_LIMIT = 4 * 1024 * 1024


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


@pytest.fixture
def hostile_registry(tmp_path: Path) -> Iterator[tuple[HexRegistry, dict, Path]]:
    escape = tmp_path / f"escaped-{uuid.uuid4().hex}.ex"
    contents = {
        "traversal": (
            tar_of([file_entry(f"lib/../../../../../../..{escape}", b"x")], gz=True),
            "PathTraversal",
            "'..' component",
        ),
        "absolute": (tar_of([file_entry(str(escape), b"x")], gz=True), "AbsolutePath", "absolute"),
        "symlink": (
            tar_of([special("lib/l.ex", tarfile.SYMTYPE, "/etc/passwd")], gz=True),
            "LinkMember",
            "symbolic link",
        ),
        "hardlink": (
            tar_of(
                [file_entry("lib/a.ex", b"a"), special("lib/h.ex", tarfile.LNKTYPE, "lib/a.ex")],
                gz=True,
            ),
            "LinkMember",
            "hard link",
        ),
        "device": (
            tar_of([special("lib/dev", tarfile.CHRTYPE)], gz=True),
            "DeviceMember",
            "character device",
        ),
        "oversize": (
            tar_of([file_entry("lib/big.ex", b"#" * (MEMBER_LIMIT + 1))], gz=True),
            "MemberTooLarge",
            f"over the {MEMBER_LIMIT}-byte limit",
        ),
        "bomb": (
            gzip.compress(b"\0" * (32 << 20)),
            "UncompressedTooLarge",
            "uncompressed limit",
        ),
    }
    registry = HexRegistry()
    expected = {}
    for name, (inner, error, phrase) in contents.items():
        tarball = hex_tarball(name, "1.0.0", contents=inner)
        registry.add(Package(name, [Release("1.0.0", tarball)]))
        expected[f"hex:{name}@1.0.0"] = ("parse", error, phrase)
    good = {"lib/good.ex": elixir_module("Good.Module", 2)}
    registry.add(Package("good", [Release("1.0.0", hex_tarball("good", "1.0.0", good))]))
    for name, license in (("copyleft", "GPL v3"), ("secret", "Proprietary")):
        tarball = hex_tarball(name, "1.0.0", good, licenses=[license])
        registry.add(Package(name, [Release("1.0.0", tarball)], licenses=[license]))
    bad_inner = corrupt_inner_checksum(hex_tarball("badinner", "1.0.0", good))
    registry.add(Package("badinner", [Release("1.0.0", bad_inner)]))
    expected["hex:badinner@1.0.0"] = ("ingest", "NotHexTarball", "inner CHECKSUM")
    with hex_server(registry) as urls:
        yield registry, {"urls": urls, "expected": expected}, escape


def corrupt_inner_checksum(tarball: bytes) -> bytes:
    """The same tarball with a CHECKSUM that does not match its contents."""
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members["CHECKSUM"] = b"0" * 64
    return tar_of([file_entry(name, data) for name, data in members.items()])


def test_hostile_archives_licenses_and_a_book_through_the_pipeline(
    pipeline: Pipeline, hostile_registry: tuple[HexRegistry, dict, Path], tmp_path: Path
) -> None:
    registry, info, escape = hostile_registry
    pipeline.env.update(
        EXFORGE_HEX_API_URL=info["urls"][0],
        EXFORGE_HEX_REPO_URL=info["urls"][1],
        EXFORGE_HTTP_BACKOFF_S="0.01",
        EXFORGE_ARCHIVE_MAX_MEMBER_BYTES=str(MEMBER_LIMIT),
        EXFORGE_ARCHIVE_MAX_UNCOMPRESSED_BYTES=str(UNCOMPRESSED_LIMIT),
    )
    summary = pipeline.json("ingest", "hex", *sorted(registry.packages))
    assert summary["requested"] == len(registry.packages) and summary["failed"] == 0
    book_pdf = tmp_path / "elixir-by-example.pdf"
    book_pdf.write_bytes(make_pdf())
    book = pipeline.json("ingest", "book", str(book_pdf), "--license", "CC0-1.0")
    assert len(book["chapters"]) == 3 and book["depends_on"]["3"] == [1]
    assert book["warnings"] == []

    pipeline.run_until_idle()

    letters = {d["key"]: d for d in pipeline.json("dlq", "list")}
    assert set(letters) == set(info["expected"])
    for key, (stage, error, phrase) in info["expected"].items():
        assert letters[key]["stage"] == stage, key
        assert letters[key]["error_class"] == error, key
        assert phrase in letters[key]["error_message"], key
    assert not escape.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elixir-by-example.pdf"]

    stats = pipeline.json("dataset", "stats")
    assert stats["licenses"]["withheld_by_reason"] == {"not_permissive": 1, "unknown_license": 1}
    assert stats["samples"]["by_kind"].get("doc_to_code") == 2  # the good package: the worker
    # kept going past every hostile archive

    records = asyncio.run(read_all(pipeline.settings, "parsed.files"))
    files = [ParsedFile.model_validate_json(r.value) for r in records]
    segments = [f.book for f in files if f.kind == "book_segment" and f.book]
    assert sorted(s.code for s in segments if s.code) == sorted(CODE_BLOCKS)
    assert {s.chapter_title for s in segments} == {
        "Getting Started",
        "Pattern Matching",
        "Processes",
    }
    assert all(s.depends_on == [1] for s in segments if s.chapter == 3)


def test_cli_top_250_then_a_second_run_downloads_no_tarball(pipeline: Pipeline) -> None:
    registry = populated(260)
    registry.rate_limit = 1000
    registry.fail_503["/repo/tarballs/pkg_0003-1.0.0.tar"] = 1
    with hex_server(registry) as (api, repo):
        pipeline.env.update(
            EXFORGE_HEX_API_URL=api, EXFORGE_HEX_REPO_URL=repo, EXFORGE_HTTP_BACKOFF_S="0.01"
        )
        first = pipeline.json("ingest", "hex", "--top", "250")
        downloads = registry.tarball_requests.total()
        second = pipeline.json("ingest", "hex", "--top", "250")
    assert first["pages"] == 3 and first["fetched"] == 250 and first["requested"] == 250
    assert downloads == 251  # one 503, retried
    assert registry.tarball_requests.total() == downloads
    assert second["fetched"] == 0 and second["skipped_by_reason"] == {"unchanged": 250}
    assert second["http"]["not_modified"] == 253


def test_ingest_exit_codes_are_documented_and_kept(pipeline: Pipeline, tmp_path: Path) -> None:
    """0: everything listed was handled; 1: some items failed, listed and counted;
    2: usage errors. `--help` of each ingest command says so."""
    for command in ("hex", "github", "dir", "book"):
        shown = pipeline.cli("ingest", command, "--help")
        assert "Exit codes: 0 when every item" in " ".join(shown.stdout.split()), command
    registry = populated(3)
    with hex_server(registry) as (api, repo):
        pipeline.env.update(EXFORGE_HEX_API_URL=api, EXFORGE_HEX_REPO_URL=repo)
        handled = pipeline.cli("ingest", "hex", "pkg_0000", "pkg_0001", "--json")
        partly = pipeline.cli("ingest", "hex", "pkg_0002", "no_such_pkg", "--json", check=False)
        usage = pipeline.cli("ingest", "hex", "--top", "2", "--since", "2026-01-01", check=False)
    assert handled.returncode == 0 and json.loads(handled.stdout)["requested"] == 2
    assert partly.returncode == 1
    summary = json.loads(partly.stdout)
    assert summary["requested"] == 1 and summary["failed_by_reason"] == {"not_found": 1}
    assert "no_such_pkg" in partly.stderr
    assert usage.returncode == 2 and "one of them" in usage.stderr
    not_a_project = pipeline.cli("ingest", "dir", str(tmp_path), check=False)
    assert not_a_project.returncode == 2 and "mix.exs" in not_a_project.stderr
    (tmp_path / "mix.exs").write_text(
        "defmodule P.MixProject do\n  def project, do: [app: :p]\nend\n"
    )
    pipeline.env["EXFORGE_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"  # nothing listens
    unreachable = pipeline.cli("ingest", "dir", str(tmp_path), check=False)
    assert unreachable.returncode == 1 and "dir:p@0.0.0: not requested" in unreachable.stderr
