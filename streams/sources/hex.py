"""The Hex package registry: API client, incremental crawl, tarball fetch and checks.

The API (listing, package, release) is metered and answered with ETags; the repository
serves immutable tarballs. A crawl resolves which releases to take, skips those already
seen with the same outer checksum (and retired ones, which it records), downloads the
rest within the compressed-size limit, verifies the outer checksum before anything else,
and stores each tarball content-addressed. What happens next (license gate, unpacking)
is the pipeline's job, so the crawl only emits `SourceRequest`s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from schemas.records import SourceRequest
from streams.archives import ChecksumMismatch, verify_sha256
from streams.sources.crawl import MissingSetting, Progress, SeenReleases, Sink, Summary
from streams.sources.http import EtagCache, PoliteClient, SourceHTTPError

PAGE_SIZE = 100  # the Hex API's fixed page size
SORTS = ("recent_downloads", "total_downloads", "updated_at", "inserted_at", "name")


def base_urls(settings: Settings) -> tuple[str, str]:
    """(API, repository) base URLs; both must be set, there is no built-in default."""
    if not settings.hex_api_url:
        raise MissingSetting("set EXFORGE_HEX_API_URL to the Hex API base URL")
    if not settings.hex_repo_url:
        raise MissingSetting("set EXFORGE_HEX_REPO_URL to the Hex repository base URL")
    return settings.hex_api_url.rstrip("/"), settings.hex_repo_url.rstrip("/")


class HexClient:
    """Typed calls of the Hex API and repository over one `PoliteClient`."""

    def __init__(self, settings: Settings, http: PoliteClient) -> None:
        self.api, self.repo = base_urls(settings)
        self.http = http
        self.max_bytes = settings.archive_max_compressed_bytes

    async def list_packages(
        self, page: int, sort: str = "recent_downloads", search: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"page": page, "sort": sort, "search": search}
        return await self.http.get_json(f"{self.api}/packages", params)

    async def package(self, name: str) -> dict[str, Any]:
        return await self.http.get_json(f"{self.api}/packages/{quote(name)}")

    async def release(self, name: str, version: str) -> dict[str, Any]:
        return await self.http.get_json(
            f"{self.api}/packages/{quote(name)}/releases/{quote(version)}"
        )

    def tarball_url(self, name: str, version: str) -> str:
        return f"{self.repo}/tarballs/{quote(name)}-{quote(version)}.tar"

    async def tarball(self, name: str, version: str, checksum: str | None) -> bytes:
        """The release tarball, within the compressed limit, with its outer checksum
        verified before anything else looks at it."""
        url = self.tarball_url(name, version)
        response = await self.http.request("GET", url, metered=False, max_bytes=self.max_bytes)
        if response.status_code != 200:
            raise SourceHTTPError(f"GET {url}: HTTP {response.status_code}", response.status_code)
        verify_sha256(response.content, checksum, f"tarball {name}-{version}")
        return response.content


@dataclass(frozen=True)
class Selection:
    """Which packages a crawl takes: named ones, the top N by a sort, or all updated
    since a date."""

    names: tuple[str, ...] = ()
    top: int | None = None
    sort: str = "recent_downloads"
    since: date | None = None
    search: str | None = None


def _updated(package: dict[str, Any]) -> date | None:
    stamp = package.get("updated_at")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).date() if stamp else None


Chosen = tuple[str, str | None, dict[str, Any] | None]


async def list_selection(
    client: HexClient, selection: Selection, summary: Summary, progress: Progress
) -> list[Chosen]:
    """(name, version or None for the latest, the listing's package object if listed)
    for every package the selection takes."""
    if selection.names:
        chosen: list[Chosen] = [
            (name, version or None, None)
            for name, _, version in (n.partition("@") for n in selection.names)
        ]
        for _ in chosen:
            summary.listed += 1
            progress("listed")
        return chosen
    sort = "updated_at" if selection.since else selection.sort
    chosen = []
    page = 1
    while selection.top is None or len(chosen) < selection.top:
        packages = await client.list_packages(page, sort, selection.search)
        summary.pages += 1
        for package in packages:
            if selection.since and (_updated(package) or date.min) < selection.since:
                return chosen  # sorted by updated_at: everything after is older
            chosen.append((package["name"], None, package))
            summary.listed += 1
            progress("listed")
            if selection.top is not None and len(chosen) >= selection.top:
                break
        if len(packages) < PAGE_SIZE:
            break
        page += 1
    return chosen


def latest_version(package: dict[str, Any]) -> str:
    """The latest stable version (the API's choice), else the newest release."""
    version = package.get("latest_stable_version") or package.get("latest_version")
    if version:
        return version
    releases = package.get("releases") or []
    if not releases:
        raise SourceHTTPError(f"package {package.get('name')} has no releases")
    return releases[0]["version"]


def retirement_text(release: dict[str, Any]) -> str | None:
    retirement = release.get("retirement")
    if not retirement:
        return None
    reason = retirement.get("reason", "other")
    message = retirement.get("message")
    return f"{reason}: {message}" if message else str(reason)


def declared_license(package: dict[str, Any]) -> str | None:
    """Hex's `meta.licenses` list as one declaration (a list means a choice: OR)."""
    licenses = (package.get("meta") or {}).get("licenses") or []
    return " OR ".join(licenses) or None


@dataclass
class HexCrawl:
    """One crawl: resolve, skip what is known, fetch, store, emit."""

    client: HexClient
    store: ObjectStore
    seen: SeenReleases
    sink: Sink
    progress: Progress
    summary: Summary = field(default_factory=Summary)

    async def run(self, selection: Selection) -> Summary:
        chosen = await list_selection(self.client, selection, self.summary, self.progress)
        await asyncio.gather(*(self.take(*item) for item in chosen))
        return self.summary

    def _fail(self, name: str, reason: str, exc: Exception) -> None:
        self.summary.failed[reason] += 1
        self.summary.errors.append(f"{name}: {exc}")
        self.progress("failed")

    def _skip(self, reason: str) -> None:
        self.summary.skipped[reason] += 1
        self.progress("skipped")

    async def take(self, name: str, version: str | None, listed: dict[str, Any] | None) -> None:
        """One package: the listing's object saves the package request when listed."""
        try:
            package = listed or await self.client.package(name)
            version = version or latest_version(package)
            release = await self.client.release(name, version)
        except SourceHTTPError as exc:
            self._fail(name, "not_found" if exc.status == 404 else "api_error", exc)
            return
        checksum = release.get("checksum")
        retirement = retirement_text(release)
        if retirement is not None:
            self.seen.mark(name, version, checksum, retirement)
            self._skip("retired")
            return
        known = self.seen.get(name, version)
        if known is not None and known.checksum == checksum:
            self._skip("unchanged")
            return
        try:
            data = await self.client.tarball(name, version, checksum)
        except ChecksumMismatch as exc:
            self._fail(f"{name}@{version}", "checksum_mismatch", exc)
            return
        except SourceHTTPError as exc:
            self._fail(f"{name}@{version}", "download_error", exc)
            return
        self.summary.fetched += 1
        self.summary.bytes += len(data)
        self.progress("fetched")
        request = hex_request(self.store, package, version, data, self.client.tarball_url)
        await self.sink(request)
        self.seen.mark(name, version, checksum)
        self.summary.requested += 1


def hex_request(
    store: ObjectStore,
    package: dict[str, Any],
    version: str,
    data: bytes,
    tarball_url: Callable[[str, str], str],
) -> SourceRequest:
    """Store a verified tarball content-addressed; the request the ingest stage takes."""
    name = package["name"]
    key = store.put_content_addressed(f"raw/hex/{name}/{version}", data, ".tar")
    meta = package.get("meta") or {}
    return SourceRequest(
        source_id=f"hex:{name}@{version}",
        kind="hex",
        name=name,
        version=version,
        license=declared_license(package),
        archive_key=key,
        sha256=sha256_hex(data),
        url=tarball_url(name, version),
        options={
            "licenses": json.dumps(meta.get("licenses") or []),
            "downloads": json.dumps(package.get("downloads") or {}),
            "updated_at": package.get("updated_at") or "",
        },
    )


async def crawl(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    selection: Selection,
    sink: Sink,
    progress: Progress = lambda _event: None,
) -> dict[str, Any]:
    """Run one Hex crawl end to end; the summary as a dict (with HTTP statistics)."""
    async with PoliteClient(settings, EtagCache(engine)) as http:
        client = HexClient(settings, http)
        run = HexCrawl(client, store, SeenReleases(engine, "hex"), sink, progress)
        summary = await run.run(selection)
        return summary.as_dict(http)
