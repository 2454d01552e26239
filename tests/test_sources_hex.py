"""The Hex crawler and the ingest handler against a local Hex API + repository server."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from conftest import EXFORGE, REPO
from servers.hex import (
    HexRegistry,
    Package,
    Release,
    elixir_module,
    hex_server,
    hex_tarball,
    populated,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import LicenseOutcome, SeenRelease, engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore, ObjectStore
from schemas.records import SourceRequest
from streams.archives import ChecksumMismatch, CorruptArchive
from streams.ingest import IngestDeps, ingest_request
from streams.sources import hex as hexsrc
from streams.sources.hex import Selection


@pytest.fixture
def engine(database_url: str) -> Engine:
    return engine_for(database_url)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return FileStore(tmp_path / "store")


def settings_for(tmp_path: Path, urls: tuple[str, str], **overrides: object) -> Settings:
    return load_settings(
        data_dir=tmp_path,
        hex_api_url=urls[0],
        hex_repo_url=urls[1],
        http_backoff_s=0.01,
        **overrides,
    )


def crawl(
    settings: Settings, store: ObjectStore, engine: Engine, selection: Selection
) -> tuple[dict, list[SourceRequest]]:
    requests: list[SourceRequest] = []

    async def sink(request: SourceRequest) -> None:
        requests.append(request)

    summary = asyncio.run(hexsrc.crawl(settings, store, engine, selection, sink))
    return summary, requests


@pytest.fixture
def top_registry() -> Iterator[tuple[HexRegistry, tuple[str, str]]]:
    registry = populated(260)
    # a budget that even a loaded machine's crawl spends in each window (a client slower
    # than the budget never waits, which is right but not what is tested): 30 in 4-5 s
    # is 6-7.5 API requests a second, where a fresh clone's `make test` crawled at ~12
    # (60 a window, 12-15 a second, left some windows unspent there)
    registry.rate_limit = 30
    registry.window_s = 4.0
    registry.fail_503["/api/packages"] = 2  # the first listing request fails twice
    registry.fail_503["/api/packages/pkg_0007/releases/1.0.0"] = 3
    registry.fail_503["/repo/tarballs/pkg_0011-1.0.0.tar"] = 2
    registry.throttle_once.add("/api/packages/pkg_0020/releases/1.0.0")
    with hex_server(registry) as urls:
        yield registry, urls


def test_top_250_politely_then_a_second_run_downloads_nothing(
    top_registry: tuple[HexRegistry, tuple[str, str]],
    tmp_path: Path,
    store: ObjectStore,
    engine: Engine,
) -> None:
    registry, urls = top_registry
    settings = settings_for(tmp_path, urls)
    summary, requests = crawl(settings, store, engine, Selection(top=250))

    assert summary["pages"] == 3 and summary["listed"] == 250
    assert summary["fetched"] == summary["requested"] == 250
    assert summary["failed"] == 0
    assert sorted(r.name for r in requests) == [f"pkg_{i:04d}" for i in range(250)]
    assert set(registry.tarball_requests) == {f"pkg_{i:04d}-1.0.0" for i in range(250)}
    assert registry.tarball_requests["pkg_0011-1.0.0"] == 3  # two 503s, then the tarball
    assert registry.violations == 0, "a request was sent while the budget was spent"
    assert registry.throttled == 1 and summary["http"]["throttled"] >= 1
    # 253 API requests, 30 per window: windows were spent down to what concurrent sends
    # might still need (older requests in flight are reserved for), and waited out
    spent = [low for low in registry.window_lows.values() if low < settings.http_concurrency]
    assert len(spent) >= 3
    assert summary["http"]["budget_waits"] >= 3
    assert summary["http"]["retries"] == {"503": 7}  # 2 listing, 3 release, 2 tarball
    assert registry.user_agents == {settings.http_user_agent}
    for request in requests:
        assert request.kind == "hex" and request.license == "MIT"
        assert store.get(request.archive_key or "") and request.sha256
        assert request.archive_key == f"raw/hex/{request.name}/1.0.0/{request.sha256}.tar"

    downloads = registry.tarball_requests.total()
    registry.rate_limit = 1000  # the second run is about requests, not budget
    again, second = crawl(settings, store, engine, Selection(top=250))
    assert registry.tarball_requests.total() == downloads, "the second run downloaded"
    assert second == [] and again["fetched"] == 0
    assert again["skipped_by_reason"] == {"unchanged": 250}
    assert again["http"]["not_modified"] == 253  # three pages and 250 releases: all 304
    assert registry.violations == 0


def test_checksums_retirements_versions_and_missing_packages(
    tmp_path: Path, store: ObjectStore, engine: Engine
) -> None:
    registry = HexRegistry()
    good = hex_tarball("good", "2.0.0", {"lib/good.ex": elixir_module("Good")})
    old = hex_tarball("good", "1.0.0", {"lib/good.ex": elixir_module("Old")})
    registry.add(Package("good", [Release("2.0.0", good), Release("1.0.0", old)]))
    tampered = hex_tarball("tampered", "1.0.0", {"lib/t.ex": b"x"})
    registry.add(Package("tampered", [Release("1.0.0", tampered, checksum="ab" * 32)]))
    retired = hex_tarball("retired", "0.1.0", {"lib/r.ex": b"x"})
    retirement = {"reason": "security", "message": "CVE-2026-1"}
    registry.add(Package("retired", [Release("0.1.0", retired, retirement=retirement)]))
    with hex_server(registry) as urls:
        settings = settings_for(tmp_path, urls)
        names = ("good", "good@1.0.0", "tampered", "retired", "absent")
        summary, requests = crawl(settings, store, engine, Selection(names=names))

    assert sorted(r.source_id for r in requests) == ["hex:good@1.0.0", "hex:good@2.0.0"]
    assert summary["failed_by_reason"] == {"checksum_mismatch": 1, "not_found": 1}
    assert summary["skipped_by_reason"] == {"retired": 1}
    assert any("does not match" in e for e in summary["errors"])
    assert not list(store.list("raw/hex/tampered"))  # verified before anything else
    with Session(engine) as session:
        row = session.scalar(select(SeenRelease).where(SeenRelease.package == "retired"))
    assert row is not None and row.retired and row.retirement == "security: CVE-2026-1"


def test_since_takes_only_packages_updated_after_the_date(
    tmp_path: Path, store: ObjectStore, engine: Engine
) -> None:
    registry = populated(120)
    for i, package in enumerate(registry.packages.values()):
        package.updated_at = f"2026-{1 + i % 12:02d}-15T00:00:00Z"
    expected = sum(1 for i in range(120) if 1 + i % 12 >= 10)
    with hex_server(registry) as urls:
        summary, requests = crawl(
            settings_for(tmp_path, urls), store, engine, Selection(since=date(2026, 10, 1))
        )
    assert summary["requested"] == len(requests) == expected
    assert all(r.options["updated_at"] >= "2026-10" for r in requests)


def test_ingest_handler_fetches_gates_licenses_and_checks_the_layout(
    tmp_path: Path, store: ObjectStore, engine: Engine
) -> None:
    registry = HexRegistry()
    files = {"lib/ok.ex": elixir_module("Ok")}
    registry.add(Package("ok", [Release("1.0.0", hex_tarball("ok", "1.0.0", files))]))
    gpl = hex_tarball("gpl", "1.0.0", files, licenses=["GPL v3"])
    registry.add(Package("gpl", [Release("1.0.0", gpl)], licenses=["GPL v3"]))
    not_hex = b"plain bytes, not a tar" * 30
    registry.add(Package("nothex", [Release("1.0.0", not_hex)]))

    def request(name: str, sha: str, license: str | None = None) -> SourceRequest:
        return SourceRequest(
            source_id=f"hex:{name}@1.0.0",
            kind="hex",
            name=name,
            version="1.0.0",
            sha256=sha,
            license=license,
        )

    with hex_server(registry) as urls:
        deps = IngestDeps(settings_for(tmp_path, urls), store, engine)
        ok_sha = registry.packages["ok"].releases[0].declared_checksum

        async def scenario() -> None:
            (output,) = (await ingest_request(request("ok", ok_sha), deps)).outputs
            assert output.record.license == "MIT"  # from metadata.config, normalised
            assert (
                store.get(output.record.archive_key) == registry.packages["ok"].releases[0].tarball
            )
            assert output.record.metadata["fetched"] is True

            withheld = await ingest_request(request("gpl", hexsrc.sha256_hex(gpl), "GPL v3"), deps)
            assert withheld.outputs == [] and withheld.dropped == {"license_not_permissive": 1}
            with pytest.raises(ChecksumMismatch):
                await ingest_request(request("ok", "0" * 64), deps)
            with pytest.raises(CorruptArchive, match="corrupt"):
                await ingest_request(request("nothex", hexsrc.sha256_hex(not_hex)), deps)
            await deps.close()

        asyncio.run(scenario())
    with Session(engine) as session:
        outcomes = {o.source_id: o for o in session.scalars(select(LicenseOutcome))}
    assert outcomes["hex:gpl@1.0.0"].spdx == "GPL-3.0-only"
    assert not outcomes["hex:gpl@1.0.0"].allowed
    assert outcomes["hex:ok@1.0.0"].allowed


def test_hex_command_without_base_urls_exits_2_naming_the_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(tmp_path), EXFORGE_CONFIG=str(tmp_path / "absent.toml"))
    result = subprocess.run(
        [EXFORGE, "ingest", "hex", "jason"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert "EXFORGE_HEX_API_URL" in result.stderr
    env["EXFORGE_HEX_API_URL"] = "http://127.0.0.1:9/api"
    result = subprocess.run(
        [EXFORGE, "ingest", "github", "a/b"], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "EXFORGE_GITHUB_API_URL" in result.stderr


CODINGS = [(), ("gzip",), ("deflate",), ("br",), ("zstd",)]


@pytest.mark.parametrize("encodings", CODINGS, ids=lambda c: c[0] if c else "plain")
def test_compressed_answers_and_cdn_redirects_give_the_same_packages(
    encodings: tuple[str, ...], tmp_path: Path, store: ObjectStore, engine: Engine
) -> None:
    registry = populated(12)
    registry.cdn = True
    expected = {
        f"hex:{p.name}@1.0.0": hexsrc.sha256_hex(p.releases[0].tarball)
        for p in registry.packages.values()
    }
    with hex_server(registry, encodings) as urls:
        settings = settings_for(tmp_path, urls)
        summary, requests = crawl(settings, store, engine, Selection(top=12))
        assert registry.redirects == 12  # every tarball came through the CDN
        ingested = ingest_without_archive(settings, store, engine, requests[0])

    assert {r.source_id: r.sha256 for r in requests} == expected
    assert summary["failed"] == 0
    coding = encodings[0] if encodings else "identity"
    assert summary["http"]["encodings"] == {coding: 1 + 12 + 12}  # page, releases, tarballs
    assert ingested == registry.packages[requests[0].name].releases[0].tarball


def ingest_without_archive(
    settings: Settings, store: ObjectStore, engine: Engine, crawled: SourceRequest
) -> bytes:
    """The ingest stage's own download of a request that names no stored archive."""
    request = crawled.model_copy(update={"archive_key": None})
    deps = IngestDeps(settings, store, engine)

    async def fetch() -> bytes:
        try:
            (output,) = (await ingest_request(request, deps)).outputs
            return store.get(output.record.archive_key)
        finally:
            await deps.close()

    return asyncio.run(fetch())


@pytest.mark.parametrize("encodings", [(), ("gzip",)], ids=["plain", "gzip"])
def test_size_limit_holds_for_bytes_received_and_for_the_decoded_body(
    encodings: tuple[str, ...], tmp_path: Path, store: ObjectStore, engine: Engine
) -> None:
    registry = HexRegistry()
    small = hex_tarball("small", "1.0.0", {"lib/small.ex": elixir_module("Small")})
    # compresses ~1000:1: under the limit on the wire when gzip'd, far over it decoded
    padding = {"priv/zeros.txt": bytes(3_000_000)}
    big = hex_tarball("big", "1.0.0", {"lib/big.ex": elixir_module("Big"), **padding})
    big = big + bytes(2_000_000)  # an uncompressed tar's tail, as padding on the wire
    registry.add(Package("small", [Release("1.0.0", small)]))
    registry.add(Package("big", [Release("1.0.0", big)]))
    with hex_server(registry, encodings) as urls:
        settings = settings_for(tmp_path, urls, archive_max_compressed_bytes=1_000_000)
        summary, requests = crawl(settings, store, engine, Selection(names=("small", "big")))
    assert [r.name for r in requests] == ["small"]
    assert summary["failed_by_reason"] == {"download_error": 1}
    assert any("over the 1000000-byte limit" in e for e in summary["errors"])
