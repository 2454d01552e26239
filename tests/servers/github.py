"""A GitHub GraphQL + archive server: repository search with the real 1,000-result cap,
cursor pagination, `created:A..B` and `stars:>=N` qualifiers, a `rateLimit` object and
`x-ratelimit-*` headers, and head-commit tarballs."""

from __future__ import annotations

import base64
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any
from urllib.parse import unquote, urlparse

from servers.base import Handler, serve
from servers.hex import elixir_module, file_entry, tar_of

SEARCH_CAP = 1000
HISTORY_PAGE = 100  # the `first:` of the client's history query


@dataclass
class Repo:
    owner: str
    name: str
    created: date
    stars: int
    sha: str
    license: str | None = "MIT"
    commits: list[tuple[str, str]] = field(default_factory=list)  # (date, login)

    @property
    def full(self) -> str:
        return f"{self.owner}/{self.name}"

    def node(self) -> dict[str, Any]:
        return {
            "nameWithOwner": self.full,
            "url": f"http://127.0.0.1/{self.full}",
            "createdAt": f"{self.created.isoformat()}T00:00:00Z",
            "stargazerCount": self.stars,
            "forkCount": self.stars // 10,
            "isFork": False,
            "isArchived": False,
            "licenseInfo": {"spdxId": self.license} if self.license else None,
            "defaultBranchRef": {
                "name": "main",
                "target": {
                    "oid": self.sha,
                    # as the real API: `history(first: N)` gives the newest N commits,
                    # `oldest: history(last: 1)` the first one
                    "history": {
                        "totalCount": len(self.commits),
                        "nodes": [
                            {
                                "committedDate": f"{day}T12:00:00Z",
                                "author": {"email": f"{login}@x", "user": {"login": login}},
                            }
                            for day, login in sorted(self.commits, reverse=True)[:HISTORY_PAGE]
                        ],
                    },
                    "oldest": {
                        "nodes": [
                            {"committedDate": f"{day}T12:00:00Z"}
                            for day, _ in sorted(self.commits)[:1]
                        ]
                    },
                },
            },
        }

    def archive(self) -> bytes:
        root = f"{self.owner}-{self.name}-{self.sha[:7]}"
        module = "".join(part.title() for part in self.name.split("_"))
        return tar_of([file_entry(f"{root}/lib/{self.name}.ex", elixir_module(module))], gz=True)


@dataclass
class GitHubState:
    repos: list[Repo] = field(default_factory=list)
    rate_limit: int = 5000
    searches: list[str] = field(default_factory=list)
    archives: Counter[str] = field(default_factory=Counter)
    max_page_offset: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _remaining: int = 5000

    def matching(self, query: str) -> list[Repo]:
        created = re.search(r"created:(\S+)\.\.(\S+)", query)
        stars = re.search(r"stars:>=(\d+)", query)
        found = []
        for repo in self.repos:
            if created and not (
                date.fromisoformat(created.group(1))
                <= repo.created
                <= date.fromisoformat(created.group(2))
            ):
                continue
            if stars and repo.stars < int(stars.group(1)):
                continue
            found.append(repo)
        return sorted(found, key=lambda r: (-r.stars, r.full))

    def meter(self) -> dict[str, Any]:
        with self.lock:
            self._remaining -= 1
            reset = int(time.time()) + 3600
            return {"limit": self.rate_limit, "remaining": self._remaining, "reset": reset}


class GitHubHandler(Handler):
    def do_POST(self) -> None:
        state: GitHubState = self.state
        if urlparse(self.path).path != "/graphql":
            self.reply(404)
            return
        if not self.headers.get("authorization", "").startswith("bearer "):
            self.reply_json(401, {"message": "Bad credentials"})
            return
        body = self.read_json()
        variables = body.get("variables") or {}
        rate = state.meter()
        reset_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rate["reset"]))
        data: dict[str, Any] = {
            "rateLimit": {
                "limit": rate["limit"],
                "remaining": rate["remaining"],
                "resetAt": reset_at,
                "cost": 1,
            }
        }
        if "search(" in body["query"]:
            data["search"] = self.search(variables)
        else:
            full = f"{variables['owner']}/{variables['name']}"
            match = [r for r in state.repos if r.full == full]
            data["repository"] = match[0].node() if match else None
        headers = {
            "x-ratelimit-limit": str(rate["limit"]),
            "x-ratelimit-remaining": str(rate["remaining"]),
            "x-ratelimit-reset": str(rate["reset"]),
        }
        self.reply_json(200, {"data": data}, headers)

    def search(self, variables: dict[str, Any]) -> dict[str, Any]:
        state: GitHubState = self.state
        query = variables["q"]
        with state.lock:
            state.searches.append(query)
        found = state.matching(query)
        after = variables.get("after")
        offset = int(base64.b64decode(after).decode()) if after else 0
        end = min(offset + variables["first"], len(found), SEARCH_CAP)
        with state.lock:
            state.max_page_offset = max(state.max_page_offset, end)
        return {
            "repositoryCount": len(found),
            "pageInfo": {
                "hasNextPage": end < min(len(found), SEARCH_CAP),
                "endCursor": base64.b64encode(str(end).encode()).decode(),
            },
            "nodes": [r.node() for r in found[offset:end]],
        }

    def do_GET(self) -> None:
        state: GitHubState = self.state
        match = re.fullmatch(
            r"/repos/([^/]+)/([^/]+)/tarball/([0-9a-f]+)", urlparse(self.path).path
        )
        repo = None
        if match:
            full = f"{unquote(match.group(1))}/{unquote(match.group(2))}"
            repo = next((r for r in state.repos if r.full == full), None)
        if repo is None or match is None or repo.sha != match.group(3):
            self.reply(404)
            return
        with state.lock:
            state.archives[repo.full] += 1
        self.reply(200, repo.archive(), {"content-type": "application/x-gzip"})


def many_repos(count: int, start: date = date(2012, 1, 1), days: int = 4000) -> list[Repo]:
    """`count` repositories created across `days` days, with commit histories."""
    repos = []
    for i in range(count):
        created = start + timedelta(days=i * days // count)
        commits = [
            ((created + timedelta(days=30 * k)).isoformat(), "alice" if k % 3 else f"dev{i % 5}")
            for k in range(6)
        ]
        repos.append(
            Repo(
                "org",
                f"repo_{i:05d}",
                created,
                stars=10 + i % 500,
                sha=f"{i:040x}",
                commits=commits,
            )
        )
    return repos


@contextmanager
def github_server(state: GitHubState) -> Iterator[str]:
    with serve(GitHubHandler, state) as base:
        yield base
