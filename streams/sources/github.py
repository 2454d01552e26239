"""GitHub repositories: GraphQL search and metadata, head-commit archives.

A search answers at most 1,000 results however many match, so a query whose
`repositoryCount` is larger is split by creation-date ranges (halving a range until each
part fits) and the parts are paged through with cursors. Every GraphQL answer carries a
`rateLimit` object, which feeds the same budget as the `x-ratelimit-*` headers. Per
repository the crawl records what the quality score needs (stars, forks, license, commit
history and contributor diversity) and stores the head commit's archive
content-addressed.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from schemas.records import SourceRequest
from streams.sources.crawl import MissingSetting, Progress, SeenReleases, Sink, Summary
from streams.sources.http import SECONDARY_LIMIT, PoliteClient, SourceHTTPError

SEARCH_CAP = 1000  # results one search query can reach
PAGE_SIZE = 100
HISTORY_SAMPLE = 100  # commits read per repository for the history metrics
EPOCH = date(2008, 1, 1)  # no repository is older

REPO_FIELDS = f"""
  nameWithOwner
  url
  createdAt
  stargazerCount
  forkCount
  isFork
  isArchived
  licenseInfo {{ spdxId }}
  defaultBranchRef {{
    name
    target {{
      ... on Commit {{
        oid
        history(first: {HISTORY_SAMPLE}) {{
          totalCount
          nodes {{ committedDate author {{ email user {{ login }} }} }}
        }}
        oldest: history(last: 1) {{ nodes {{ committedDate }} }}
      }}
    }}
  }}
"""
SEARCH_QUERY = f"""
query($q: String!, $first: Int!, $after: String) {{
  rateLimit {{ limit remaining resetAt cost }}
  search(query: $q, type: REPOSITORY, first: $first, after: $after) {{
    repositoryCount
    pageInfo {{ hasNextPage endCursor }}
    nodes {{ ... on Repository {{ {REPO_FIELDS} }} }}
  }}
}}
"""
REPO_QUERY = f"""
query($owner: String!, $name: String!) {{
  rateLimit {{ limit remaining resetAt cost }}
  repository(owner: $owner, name: $name) {{ {REPO_FIELDS} }}
}}
"""


class GraphQLError(SourceHTTPError):
    """The GraphQL API answered with errors."""


def graphql_rate_limited(response: httpx.Response) -> bool:
    """GraphQL reports its primary limit (`RATE_LIMITED`) and, sometimes, a secondary one
    in the errors of a 200 answer."""
    if response.status_code != 200 or b'"errors"' not in response.content:
        return False
    try:
        errors = response.json().get("errors") or []
    except ValueError:
        return False
    return any(
        error.get("type") == "RATE_LIMITED" or SECONDARY_LIMIT.search(error.get("message") or "")
        for error in errors
        if isinstance(error, dict)
    )


def api_url(settings: Settings) -> str:
    if not settings.github_api_url:
        raise MissingSetting("set EXFORGE_GITHUB_API_URL to the GitHub API base URL")
    return settings.github_api_url.rstrip("/")


def auth_headers(settings: Settings) -> dict[str, str]:
    """The token header, when a token is configured (public data works without)."""
    return {"authorization": f"bearer {settings.github_token}"} if settings.github_token else {}


def archive_url(settings: Settings, name_with_owner: str, sha: str) -> str:
    return f"{api_url(settings)}/repos/{name_with_owner}/tarball/{sha}"


async def fetch_archive(client: PoliteClient, url: str, settings: Settings) -> bytes:
    """A repository archive, stopped at the compressed-size limit."""
    response = await client.request(
        "GET", url, metered=False, max_bytes=settings.archive_max_compressed_bytes
    )
    if response.status_code != 200:
        raise SourceHTTPError(f"GET {url}: HTTP {response.status_code}", response.status_code)
    return response.content


@dataclass(frozen=True)
class RepoInfo:
    """What the pipeline and the quality score need to know about one repository."""

    name_with_owner: str
    head_sha: str
    license: str | None
    stars: int
    forks: int
    commits: int
    first_commit: str | None
    last_commit: str | None
    active_months: int
    authors: int
    top_author_share: float
    created_at: str


def repo_info(node: dict[str, Any]) -> RepoInfo | None:
    """Metrics from one GraphQL repository node; None for an empty repository."""
    ref = node.get("defaultBranchRef") or {}
    target = ref.get("target") or {}
    if not target.get("oid"):
        return None
    history = target.get("history") or {}
    commits = history.get("nodes") or []
    dates = sorted(c["committedDate"] for c in commits if c.get("committedDate"))
    authors = Counter(
        ((c.get("author") or {}).get("user") or {}).get("login")
        or (c.get("author") or {}).get("email")
        or "unknown"
        for c in commits
    )
    # The sample holds the newest commits only; the first one comes from its own query.
    oldest = [c["committedDate"] for c in (target.get("oldest") or {}).get("nodes") or []]
    spdx = (node.get("licenseInfo") or {}).get("spdxId")
    return RepoInfo(
        name_with_owner=node["nameWithOwner"],
        head_sha=target["oid"],
        license=None if spdx in (None, "NOASSERTION") else spdx,
        stars=node.get("stargazerCount", 0),
        forks=node.get("forkCount", 0),
        commits=history.get("totalCount", len(commits)),
        first_commit=min(oldest + dates[:1]) if oldest or dates else None,
        last_commit=dates[-1] if dates else None,
        active_months=len({d[:7] for d in dates}),
        authors=len(authors),
        top_author_share=round(max(authors.values()) / len(commits), 4) if commits else 0.0,
        created_at=node.get("createdAt", ""),
    )


class GitHubClient:
    """GraphQL queries over one `PoliteClient`, with the `rateLimit` object observed."""

    def __init__(self, settings: Settings, http: PoliteClient) -> None:
        self.api = api_url(settings)
        self.http = http

    async def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.request(
            "POST",
            f"{self.api}/graphql",
            json={"query": query, "variables": variables},
            limited=graphql_rate_limited,
        )
        if response.status_code != 200:
            raise GraphQLError(f"GraphQL: HTTP {response.status_code}", response.status_code)
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL: {body['errors'][0].get('message')}")
        data = body["data"]
        rate = data.get("rateLimit")
        if rate:
            reset = datetime.fromisoformat(rate["resetAt"].replace("Z", "+00:00")).timestamp()
            self.http.limiter.update(rate["remaining"], reset, self.http.limiter.sent)
        return data

    async def search_page(self, query: str, after: str | None) -> dict[str, Any]:
        data = await self.graphql(SEARCH_QUERY, {"q": query, "first": PAGE_SIZE, "after": after})
        return data["search"]

    async def repository(self, name_with_owner: str) -> dict[str, Any]:
        owner, _, name = name_with_owner.partition("/")
        data = await self.graphql(REPO_QUERY, {"owner": owner, "name": name})
        if data.get("repository") is None:
            raise GraphQLError(f"repository {name_with_owner} not found", 404)
        return data["repository"]

    async def search(self, query: str, today: date | None = None) -> AsyncIterator[dict]:
        """Every repository the query matches, past the 1,000-result cap, each once."""
        end = today or datetime.now(UTC).date()
        seen: set[str] = set()
        async for node in self._search_range(query, EPOCH, end):
            if node["nameWithOwner"] not in seen:
                seen.add(node["nameWithOwner"])
                yield node

    async def _search_range(self, query: str, start: date, end: date) -> AsyncIterator[dict]:
        ranged = f"{query} created:{start.isoformat()}..{end.isoformat()}"
        page = await self.search_page(ranged, None)
        if page["repositoryCount"] > SEARCH_CAP and end > start:
            middle = start + timedelta(days=(end - start).days // 2)
            async for node in self._search_range(query, start, middle):
                yield node
            async for node in self._search_range(query, middle + timedelta(days=1), end):
                yield node
            return
        while True:
            for node in page["nodes"]:
                if node:
                    yield node
            if not page["pageInfo"]["hasNextPage"]:
                return
            page = await self.search_page(ranged, page["pageInfo"]["endCursor"])


def github_request(store: ObjectStore, info: RepoInfo, data: bytes, url: str) -> SourceRequest:
    """Store a head-commit archive content-addressed; the request for the ingest stage."""
    key = store.put_content_addressed(
        f"raw/github/{info.name_with_owner}/{info.head_sha}", data, ".tar.gz"
    )
    return SourceRequest(
        source_id=f"github:{info.name_with_owner}@{info.head_sha}",
        kind="github",
        name=info.name_with_owner,
        version=info.head_sha,
        license=info.license,
        archive_key=key,
        sha256=sha256_hex(data),
        url=url,
        options={
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in info.__dict__.items()
            if k not in ("name_with_owner", "head_sha", "license") and v is not None
        },
    )


@dataclass
class GitHubCrawl:
    """One crawl: resolve repositories, skip known head commits, fetch, store, emit."""

    client: GitHubClient
    store: ObjectStore
    seen: SeenReleases
    sink: Sink
    progress: Progress
    settings: Settings
    summary: Summary

    async def run(self, names: list[str], search: str | None, limit: int | None) -> Summary:
        tasks = []
        if search:
            async for node in self.client.search(search):
                if limit is not None and self.summary.listed >= limit:
                    break
                self._listed()
                tasks.append(asyncio.create_task(self.take(node)))
        for name in names:
            self._listed()
            tasks.append(asyncio.create_task(self.take_named(name)))
        await asyncio.gather(*tasks)
        return self.summary

    def _listed(self) -> None:
        self.summary.listed += 1
        self.progress("listed")

    async def take_named(self, name: str) -> None:
        try:
            node = await self.client.repository(name)
        except SourceHTTPError as exc:
            self._fail(name, "not_found" if exc.status == 404 else "api_error", exc)
            return
        await self.take(node)

    def _fail(self, name: str, reason: str, exc: Exception) -> None:
        self.summary.failed[reason] += 1
        self.summary.errors.append(f"{name}: {exc}")
        self.progress("failed")

    async def take(self, node: dict[str, Any]) -> None:
        info = repo_info(node)
        if info is None:
            self.summary.skipped["empty"] += 1
            self.progress("skipped")
            return
        if self.seen.get(info.name_with_owner, info.head_sha) is not None:
            self.summary.skipped["unchanged"] += 1
            self.progress("skipped")
            return
        url = archive_url(self.settings, info.name_with_owner, info.head_sha)
        try:
            data = await fetch_archive(self.client.http, url, self.settings)
        except SourceHTTPError as exc:
            self._fail(info.name_with_owner, "download_error", exc)
            return
        self.summary.fetched += 1
        self.summary.bytes += len(data)
        self.progress("fetched")
        await self.sink(github_request(self.store, info, data, url))
        self.seen.mark(info.name_with_owner, info.head_sha, sha256_hex(data))
        self.summary.requested += 1


async def crawl(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    names: list[str],
    search: str | None,
    limit: int | None,
    sink: Sink,
    progress: Progress = lambda _event: None,
) -> dict[str, Any]:
    """Run one GitHub crawl end to end; the summary as a dict (with HTTP statistics)."""
    async with PoliteClient(settings, headers=auth_headers(settings)) as http:
        run = GitHubCrawl(
            GitHubClient(settings, http),
            store,
            SeenReleases(engine, "github"),
            sink,
            progress,
            settings,
            Summary(),
        )
        summary = await run.run(names, search, limit)
        return summary.as_dict(http)
