"""The GitHub crawler against a local GraphQL + archive server."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

from servers.github import GitHubState, Repo, github_server, many_repos
from sqlalchemy import Engine

from exforge.core.db import engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore
from schemas.records import SourceRequest
from streams.archives import Limits
from streams.parse import elixir_members
from streams.sources import github
from streams.sources.http import PoliteClient


def settings_for(tmp_path: Path, url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path, github_api_url=url, github_token="t0ken", http_backoff_s=0.01
    )


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
