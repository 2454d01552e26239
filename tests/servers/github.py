"""A GitHub GraphQL + archive server: repository search with the real 1,000-result cap,
cursor pagination, `created:A..B` and `stars:>=N` qualifiers, a `rateLimit` object and
`x-ratelimit-*` headers, and head-commit tarballs.

As the real API: the REST tarball endpoint answers a 302 to a codeload URL that serves
the archive; bodies are compressed whenever the client accepts it (the base server);
the GraphQL budget is metered per window, and a spent budget is answered with a 200
whose errors say `RATE_LIMITED`, `x-ratelimit-remaining: 0` and the reset; paths can be
given secondary rate limits (403 or 429, `retry-after`, the documented message). A
request sent while a limit is in force (after a short grace for requests already in
flight) is a `violation`: a polite client never sends it."""

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

from servers.base import COMPRESSORS, Handler, serve
from servers.hex import elixir_module, file_entry, tar_of

SEARCH_CAP = 1000
HISTORY_PAGE = 100  # the `first:` of the client's history query
SECONDARY_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try "
    "again. If you reach out to GitHub Support for help, please include the request ID "
    "0000:0000:0000000:0000000:00000000."
)


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
    window_s: float = 3600.0
    searches: list[str] = field(default_factory=list)
    archives: Counter[str] = field(default_factory=Counter)
    redirects: int = 0
    max_page_offset: int = 0
    # path → the statuses (403 or 429) of the secondary-limit answers it still gets
    secondary: dict[str, list[int]] = field(default_factory=dict)
    retry_after_s: int = 1
    # GraphQL answers that find the budget spent by another client of the same token
    spent_elsewhere: int = 0
    limited: Counter[str] = field(default_factory=Counter)  # limit answers sent, by form
    forbidden: set[str] = field(default_factory=set)  # repositories whose archive is a 403
    violations: int = 0
    grace_s: float = 0.25
    lock: threading.Lock = field(default_factory=threading.Lock)
    _remaining: int = 0
    _reset: float = 0.0
    _blocked_from: float = 0.0  # when the limit in force was announced
    _blocked_until: float = 0.0

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

    def blocked(self) -> bool:
        """Whether a request arrives while a limit is in force (a violation, unless it
        was in flight when the limit was announced)."""
        with self.lock:
            now = time.time()
            if self._blocked_from + self.grace_s <= now < self._blocked_until:
                self.violations += 1
                return True
            return False

    def block(self, until: float) -> None:
        """A limit is in force until `until` (the caller holds the lock)."""
        self._blocked_from = time.time()
        self._blocked_until = until

    def secondary_limit(self, path: str) -> int | None:
        """The status of the secondary-limit answer `path` gets now, if any (which blocks
        everything for `retry_after_s`)."""
        with self.lock:
            statuses = self.secondary.get(path)
            if not statuses:
                return None
            status = statuses.pop(0)
            self.limited[f"secondary_{status}"] += 1
            self.block(time.time() + self.retry_after_s)
            return status

    def meter(self) -> dict[str, Any] | None:
        """Spend one GraphQL point; the budget after it, or None when it was spent."""
        with self.lock:
            now = time.time()
            if now >= self._reset:
                self._remaining = self.rate_limit
                self._reset = float(int(now + self.window_s) + 1)
            if self.spent_elsewhere > 0:
                self.spent_elsewhere -= 1
                self._remaining = 0
                self._reset = float(int(now) + 2)
            if self._remaining <= 0:
                self.limited["primary"] += 1
                if self._blocked_until < self._reset:
                    self.block(self._reset)
                return None
            self._remaining -= 1
            return {"limit": self.rate_limit, "remaining": self._remaining, "reset": self._reset}

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.rate_limit),
            "x-ratelimit-remaining": str(max(self._remaining, 0)),
            "x-ratelimit-reset": str(int(self._reset)),
            "x-ratelimit-resource": "graphql",
        }


class GitHubHandler(Handler):
    def limit(self, path: str) -> bool:
        """Answer a secondary rate limit on `path` when one is due; whether it was."""
        state: GitHubState = self.state
        status = state.secondary_limit(path)
        if status is None:
            return False
        body = {
            "message": SECONDARY_MESSAGE,
            "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
        }
        headers = {"retry-after": str(state.retry_after_s), **state.headers()}
        self.reply_json(status, body, headers)
        return True

    def do_POST(self) -> None:
        state: GitHubState = self.state
        path = urlparse(self.path).path
        if path != "/graphql":
            self.reply(404)
            return
        if not self.headers.get("authorization", "").startswith("bearer "):
            self.reply_json(401, {"message": "Bad credentials"})
            return
        body = self.read_json()
        state.blocked()
        if self.limit(path):
            return
        variables = body.get("variables") or {}
        rate = state.meter()
        if rate is None:
            errors = [{"type": "RATE_LIMITED", "message": "API rate limit exceeded for user ID 1."}]
            self.reply_json(200, {"errors": errors}, state.headers())
            return
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
        self.reply_json(200, {"data": data}, state.headers())

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
        """`/repos/{owner}/{repo}/tarball/{ref}` answers a 302 to codeload's
        `/{owner}/{repo}/legacy.tar.gz/{ref}`, which serves the archive."""
        state: GitHubState = self.state
        path = urlparse(self.path).path
        api = re.fullmatch(r"/repos/([^/]+)/([^/]+)/tarball/([0-9a-f]+)", path)
        codeload = re.fullmatch(r"/codeload/([^/]+)/([^/]+)/legacy\.tar\.gz/([0-9a-f]+)", path)
        match = api or codeload
        repo = None
        if match:
            full = f"{unquote(match.group(1))}/{unquote(match.group(2))}"
            repo = next((r for r in state.repos if r.full == full), None)
        if repo is None or match is None or repo.sha != match.group(3):
            self.reply(404)
            return
        if api is not None:
            state.blocked()
            if self.limit(path):
                return
            if repo.full in state.forbidden:
                message = {"message": "Resource not accessible by integration"}
                self.reply_json(403, message, state.headers())
                return
            with state.lock:
                state.redirects += 1
            host = self.headers.get("host")
            self.redirect(f"http://{host}/codeload/{repo.full}/legacy.tar.gz/{repo.sha}")
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
def github_server(
    state: GitHubState, encodings: tuple[str, ...] = tuple(COMPRESSORS)
) -> Iterator[str]:
    """Serve the state (compressing with `encodings`); yields the base URL."""
    with serve(GitHubHandler, state, encodings) as base:
        yield base
