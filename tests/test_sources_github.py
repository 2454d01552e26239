"""The GitHub crawler against a local GraphQL + archive server."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from datetime import date
from pathlib import Path

import httpx
import pytest
from servers.github import GitHubState, Repo, github_server, many_repos
from sqlalchemy import Engine

from exforge.core.db import engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore
from schemas.records import SourceRequest
from streams.archives import Limits
from streams.parse import elixir_members
from streams.sources import github
from streams.sources.http import PoliteClient, throttled_until


def settings_for(tmp_path: Path, url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"github_token": "t0ken", "http_backoff_s": 0.01, **overrides}
    return load_settings(data_dir=tmp_path, github_api_url=url, **values)


def run_crawl(
    settings: Settings,
    engine: Engine,
    store: FileStore,
    names: list[str],
    search: str | None,
    limit: int | None = None,
) -> tuple[dict, list[SourceRequest]]:
    requests: list[SourceRequest] = []

    async def sink(request: SourceRequest) -> None:
        requests.append(request)

    summary = asyncio.run(github.crawl(settings, store, engine, names, search, limit, sink))
    return summary, requests


def test_search_past_the_1000_result_cap_by_splitting_creation_dates(tmp_path: Path) -> None:
    state = GitHubState(repos=many_repos(2500))
    with github_server(state) as url:
        settings = settings_for(tmp_path, url)

        async def everything() -> list[dict]:
            async with PoliteClient(settings, headers=github.auth_headers(settings)) as http:
                client = github.GitHubClient(settings, http)
                found = [n async for n in client.search("language:Elixir", date(2026, 1, 1))]
                assert http.limiter.remaining is not None  # learnt from rateLimit/headers
                return found

        found = asyncio.run(everything())
    assert len(found) == 2500
    assert len({n["nameWithOwner"] for n in found}) == 2500
    assert any("created:" in q for q in state.searches)
    assert state.max_page_offset <= 1000


def test_crawl_records_metrics_stores_archives_and_skips_known_heads(tmp_path: Path) -> None:
    repos = many_repos(30)
    repos.append(Repo("solo", "gpl_thing", date(2020, 1, 1), 5, "f" * 40, "GPL-3.0"))
    state = GitHubState(repos=repos)
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = FileStore(tmp_path / "store")
    with github_server(state) as url:
        settings = settings_for(tmp_path, url)
        summary, requests = run_crawl(
            settings, engine, store, ["solo/gpl_thing", "nobody/absent"], "stars:>=10", 20
        )
        again, second = run_crawl(settings, engine, store, [], "stars:>=10", 20)
    assert summary["requested"] == 21 and summary["failed_by_reason"] == {"not_found": 1}
    by_id = {r.source_id: r for r in requests}
    gpl = by_id[f"github:solo/gpl_thing@{'f' * 40}"]
    assert gpl.license == "GPL-3.0"
    top = requests[0] if requests[0].name != "solo/gpl_thing" else requests[1]
    repo = next(r for r in repos if r.full == top.name)
    months = {day[:7] for day, _ in repo.commits}
    assert top.options["commits"] == "6" and top.options["active_months"] == str(len(months))
    assert top.options["authors"] == "2" and top.options["top_author_share"] == "0.6667"
    archive = store.get(top.archive_key or "")
    members = [m.path for m in elixir_members(archive, Limits.defaults(), strip_root=True)]
    assert members == [f"lib/{top.name.split('/')[1]}.ex"]
    assert second == [] and again["skipped_by_reason"] == {"unchanged": 20}
    assert sum(state.archives.values()) == 21  # nothing downloaded the second time


def test_history_metrics_of_a_long_history_use_the_true_first_commit() -> None:
    commits = [(f"{2015 + i // 12}-{i % 12 + 1:02d}-01", f"dev{i % 3}") for i in range(150)]
    repo = Repo("old", "timeline", date(2015, 1, 1), 40, "a" * 40, commits=commits)
    info = github.repo_info(repo.node())
    assert info is not None
    assert info.commits == 150
    assert info.first_commit == "2015-01-01T12:00:00Z"  # outside the newest-100 sample
    assert info.last_commit == f"{commits[-1][0]}T12:00:00Z"
    assert info.active_months == 100


CODINGS = [(), ("gzip",), ("deflate",), ("br",), ("zstd",)]


@pytest.mark.parametrize("encodings", CODINGS, ids=lambda c: c[0] if c else "plain")
def test_compressed_answers_and_codeload_redirects_give_the_same_archives(
    encodings: tuple[str, ...], tmp_path: Path
) -> None:
    repos = many_repos(8)
    state = GitHubState(repos=repos)
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = FileStore(tmp_path / "store")
    with github_server(state, encodings) as url:
        summary, requests = run_crawl(settings_for(tmp_path, url), engine, store, [], "x")
    expected = {f"github:{r.full}@{r.sha}": github.sha256_hex(r.archive()) for r in repos}
    assert {r.source_id: r.sha256 for r in requests} == expected
    assert state.redirects == 8 and sum(state.archives.values()) == 8
    coding = encodings[0] if encodings else "identity"
    assert summary["http"]["encodings"] == {coding: 1 + 8}  # one search page, 8 archives


def test_primary_and_secondary_rate_limits_are_waited_out_not_failed(tmp_path: Path) -> None:
    repos = many_repos(6)
    state = GitHubState(repos=repos)
    state.secondary["/graphql"] = [403, 429]
    state.secondary[f"/repos/{repos[2].full}/tarball/{repos[2].sha}"] = [403]
    state.spent_elsewhere = 1  # GraphQL: a 200 with RATE_LIMITED, remaining 0, the reset
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = FileStore(tmp_path / "store")
    names = [r.full for r in repos]
    with github_server(state) as url:
        summary, requests = run_crawl(settings_for(tmp_path, url), engine, store, names, None)
    assert sorted(r.name for r in requests) == sorted(names)
    assert summary["failed"] == 0
    assert state.limited["secondary_403"] == 2 and state.limited["secondary_429"] == 1
    assert state.limited["primary"] >= 1  # requests already in flight see the spent budget too
    assert summary["http"]["throttled"] == state.limited.total()
    assert state.violations == 0, "a request was sent while a rate limit was in force"


def test_forbidden_without_a_rate_limit_is_a_failure_not_a_wait(tmp_path: Path) -> None:
    repos = many_repos(2)
    state = GitHubState(repos=repos, forbidden={repos[0].full})
    engine = engine_for(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = FileStore(tmp_path / "store")
    with github_server(state) as url:
        names = [r.full for r in repos]
        summary, requests = run_crawl(settings_for(tmp_path, url), engine, store, names, None)
    assert [r.name for r in requests] == [repos[1].full]
    assert summary["failed_by_reason"] == {"download_error": 1}
    assert "HTTP 403" in summary["errors"][0]
    assert summary["http"]["throttled"] == 0


def limit_answer(status: int, headers: dict[str, str], message: str = "") -> httpx.Response:
    body = json.dumps({"message": message}).encode()
    return httpx.Response(status, headers=headers, content=body)


def test_the_documented_rate_limit_forms() -> None:
    now = time.time()
    reset = str(int(now) + 900)
    date_header = email.utils.formatdate(now + 120, usegmt=True)
    secondary = "You have exceeded a secondary rate limit. Please wait a few minutes."
    # retry-after first, even when the primary budget has points left and resets later
    until = throttled_until(
        limit_answer(403, {"retry-after": "30", "x-ratelimit-remaining": "17"}, secondary), 60
    )
    assert until is not None and 29 <= until - now <= 31
    until = throttled_until(limit_answer(429, {"retry-after": date_header}), 60)
    assert until is not None and 118 <= until - now <= 122
    # a spent primary budget: until its reset
    primary = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}
    assert throttled_until(limit_answer(403, primary, "API rate limit exceeded"), 60) == int(reset)
    # a secondary limit naming no time, or a bare 429: at least the fallback
    for answer in (limit_answer(403, {}, secondary), limit_answer(429, {})):
        until = throttled_until(answer, 60)
        assert until is not None and until - now >= 59
    # a 403 that is no rate limit (permissions), and a success
    assert (
        throttled_until(limit_answer(403, {}, "Resource not accessible by integration"), 60) is None
    )
    assert throttled_until(limit_answer(200, primary), 60) is None
