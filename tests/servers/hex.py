"""A Hex API + repository server with real format-3 tarballs and real metering.

The API side pages listings 100 at a time, answers ETags with 304s, meters every API
request with `x-ratelimit-limit/remaining/reset` (epoch seconds) and answers 429 when a
window's budget is spent — counting such requests as `violations`, since a polite client
never sends them. Paths can be made to fail with 503 a number of times, or to be
throttled once with a 429 announcing a reset. The repository side serves tarballs and
counts downloads; with `cdn` set it answers them with a 302 to a CDN path, as a mirror
behind a CDN does. Bodies are compressed as the base server does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from servers.base import COMPRESSORS, Handler, serve

PAGE_SIZE = 100


# ---------------------------------------------------------------- tarball building


def erl_term(value: Any) -> str:
    """Erlang text form of a value, as Hex writes metadata.config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'<<"{escaped}"/utf8>>' if not value.isascii() else f'<<"{escaped}">>'
    if isinstance(value, dict):
        return (
            "["
            + ",".join("{" + erl_term(k) + "," + erl_term(v) + "}" for k, v in value.items())
            + "]"
        )
    if isinstance(value, list):
        return "[" + ",".join(erl_term(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "{" + ",".join(erl_term(v) for v in value) + "}"
    raise TypeError(value)


def metadata_config(metadata: dict[str, Any]) -> bytes:
    return "".join(f"{{{erl_term(k)},{erl_term(v)}}}.\n" for k, v in metadata.items()).encode()


def file_entry(path: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(path)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    """A tar (optionally gzip'd) of prepared members: any type, any name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def hex_tarball(
    name: str,
    version: str,
    files: dict[str, bytes] | None = None,
    licenses: list[str] | None = None,
    contents: bytes | None = None,
    metadata_text: bytes | None = None,
) -> bytes:
    """A real format-3 tarball: VERSION, CHECKSUM, metadata.config, contents.tar.gz.
    `contents` (a prepared contents.tar.gz) and `metadata_text` override the defaults."""
    files = files or {}
    if contents is None:
        contents = tar_of([file_entry(p, d) for p, d in files.items()], gz=True)
    if metadata_text is None:
        metadata_text = metadata_config(
            {
                "name": name,
                "version": version,
                "app": name,
                "description": f"The {name} package.",
                "licenses": licenses if licenses is not None else ["MIT"],
                "links": {"Source": f"http://127.0.0.1/{name}"},
                "requirements": [
                    {"name": "jason", "app": "jason", "optional": False, "requirement": "~> 1.0"}
                ],
                "files": sorted({p.split("/")[0] for p in files}) or ["lib"],
                "build_tools": ["mix"],
            }
        )
    version_bytes = b"3"
    checksum = hashlib.sha256(version_bytes + metadata_text + contents).hexdigest().upper()
    return tar_of(
        [
            file_entry("VERSION", version_bytes),
            file_entry("CHECKSUM", checksum.encode()),
            file_entry("metadata.config", metadata_text),
            file_entry("contents.tar.gz", contents),
        ]
    )


def elixir_module(module: str, functions: int = 1) -> bytes:
    body = "".join(
        f'  @doc "Returns x plus {i}."\n  def add_{i}(x), do: x + {i}\n\n' for i in range(functions)
    )
    return f"defmodule {module} do\n  @moduledoc false\n\n{body}end\n".encode()


# ---------------------------------------------------------------- the registry model


@dataclass
class Release:
    version: str
    tarball: bytes
    checksum: str | None = None  # declared; None: the tarball's true sha256
    retirement: dict[str, str] | None = None

    @property
    def declared_checksum(self) -> str:
        return self.checksum or hashlib.sha256(self.tarball).hexdigest()


@dataclass
class Package:
    name: str
    releases: list[Release]  # newest first
    licenses: list[str] = field(default_factory=lambda: ["MIT"])
    downloads: int = 0
    updated_at: str = "2026-01-01T00:00:00Z"

    def api(self, base: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "latest_version": self.releases[0].version,
            "latest_stable_version": self.releases[0].version,
            "meta": {"licenses": self.licenses, "description": f"The {self.name} package."},
            "downloads": {"recent": self.downloads, "all": self.downloads * 10},
            "updated_at": self.updated_at,
            "inserted_at": "2020-01-01T00:00:00Z",
            "releases": [
                {"version": r.version, "url": f"{base}/packages/{self.name}/releases/{r.version}"}
                for r in self.releases
            ],
        }


@dataclass
class HexRegistry:
    """What the server serves and what it saw."""

    packages: dict[str, Package] = field(default_factory=dict)
    rate_limit: int = 100
    window_s: float = 1.0
    fail_503: Counter[str] = field(default_factory=Counter)  # path → 503s still to send
    throttle_once: set[str] = field(default_factory=set)  # paths answered 429 once
    api_requests: Counter[str] = field(default_factory=Counter)
    tarball_requests: Counter[str] = field(default_factory=Counter)
    not_modified: int = 0
    throttled: int = 0
    violations: int = 0
    window_lows: dict[float, int] = field(default_factory=dict)  # reset → lowest remaining
    user_agents: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    grace_s: float = 0.25
    cdn: bool = False  # tarballs redirect to /cdn/tarballs/
    redirects: int = 0
    _remaining: int = 0
    _reset: float = 0.0
    _grace_until: float = 0.0

    def add(self, package: Package) -> Package:
        self.packages[package.name] = package
        return package

    def meter(self) -> tuple[bool, dict[str, str]]:
        """Count one API request; (allowed, rate-limit headers)."""
        with self.lock:
            now = time.time()
            if now >= self._reset:
                self._remaining = self.rate_limit
                self._reset = float(int(now + self.window_s) + 1)
            allowed = self._remaining > 0
            if allowed:
                self._remaining -= 1
                self.window_lows[self._reset] = self._remaining
            elif now > self._grace_until:
                self.violations += 1
            return allowed, self._headers()

    def spend(self) -> dict[str, str]:
        """Someone else spent this window's budget: a 429 announcing the next reset.
        Requests arriving within `grace_s` were already in flight: no violation."""
        with self.lock:
            self.throttled += 1
            self._remaining = 0
            self._reset = float(int(time.time() + self.window_s) + 1)
            self._grace_until = time.time() + self.grace_s
            return self._headers()

    def _headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.rate_limit),
            "x-ratelimit-remaining": str(self._remaining),
            "x-ratelimit-reset": str(int(self._reset)),
        }

    def ranked(self, sort: str, search: str | None) -> list[Package]:
        packages = [p for p in self.packages.values() if not search or search in p.name]
        if sort == "name":
            return sorted(packages, key=lambda p: p.name)
        if sort == "updated_at":
            return sorted(packages, key=lambda p: (p.updated_at, p.name), reverse=True)
        return sorted(packages, key=lambda p: (-p.downloads, p.name))


class HexHandler(Handler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        registry: HexRegistry = self.state
        registry.user_agents.add(self.headers.get("user-agent", ""))
        if url.path.startswith("/repo/tarballs/") and registry.cdn:
            with registry.lock:
                registry.redirects += 1
            host = self.headers.get("host")
            self.redirect(f"http://{host}/cdn/tarballs/{url.path.removeprefix('/repo/tarballs/')}")
            return
        for prefix in ("/repo/tarballs/", "/cdn/tarballs/"):
            if url.path.startswith(prefix):
                self.tarball(unquote(url.path.removeprefix(prefix)))
                return
        if not url.path.startswith("/api/"):
            self.reply(404)
            return
        with registry.lock:
            registry.api_requests[url.path] += 1
            if registry.fail_503[url.path] > 0:
                registry.fail_503[url.path] -= 1
                failing = True
            else:
                failing = False
            throttled = url.path in registry.throttle_once
            registry.throttle_once.discard(url.path)
        if failing:
            self.reply(503, b"service unavailable")
            return
        if throttled:
            self.reply_json(429, {"message": "API rate limit exceeded"}, registry.spend())
            return
        allowed, limits = registry.meter()
        if not allowed:
            self.reply_json(429, {"message": "API rate limit exceeded"}, limits)
            return
        data = self.api(url.path.removeprefix("/api"), parse_qs(url.query))
        if data is None:
            self.reply_json(404, {"message": "Page not found"}, limits)
            return
        body = json.dumps(data, sort_keys=True).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if self.headers.get("if-none-match") == etag:
            registry.not_modified += 1
            self.reply(304, b"", {"etag": etag, **limits})
            return
        self.reply(200, body, {"content-type": "application/json", "etag": etag, **limits})

    def api(self, path: str, query: dict[str, list[str]]) -> Any:
        registry: HexRegistry = self.state
        base = f"http://{self.headers.get('host')}/api"
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["packages"]:
            page = int(query.get("page", ["1"])[0])
            sort = query.get("sort", ["recent_downloads"])[0]
            ranked = registry.ranked(sort, query.get("search", [None])[0])
            chosen = ranked[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
            return [p.api(base) for p in chosen]
        if len(parts) >= 2 and parts[0] == "packages" and parts[1] in registry.packages:
            package = registry.packages[parts[1]]
            if len(parts) == 2:
                return package.api(base)
            if len(parts) == 4 and parts[2] == "releases":
                for release in package.releases:
                    if release.version == parts[3]:
                        return {
                            "version": release.version,
                            "checksum": release.declared_checksum,
                            "retirement": release.retirement,
                            "meta": {"build_tools": ["mix"]},
                            "has_docs": False,
                        }
        return None

    def tarball(self, filename: str) -> None:
        registry: HexRegistry = self.state
        stem = filename.removesuffix(".tar")
        name, _, version = stem.rpartition("-")
        with registry.lock:
            registry.tarball_requests[stem] += 1
            failing = registry.fail_503[f"/repo/tarballs/{filename}"] > 0
            if failing:
                registry.fail_503[f"/repo/tarballs/{filename}"] -= 1
        if failing:
            self.reply(503)
            return
        package = registry.packages.get(name)
        for release in package.releases if package else []:
            if release.version == version:
                self.reply(200, release.tarball, {"content-type": "application/octet-stream"})
                return
        self.reply(404)


@contextmanager
def hex_server(
    registry: HexRegistry, encodings: tuple[str, ...] = tuple(COMPRESSORS)
) -> Iterator[tuple[str, str]]:
    """Serve the registry (compressing with `encodings`); yields (API base URL,
    repository base URL)."""
    with serve(HexHandler, registry, encodings) as base:
        yield f"{base}/api", f"{base}/repo"


def populated(count: int, **package_fields: Any) -> HexRegistry:
    """A registry of `count` small good packages, ranked by descending downloads."""
    registry = HexRegistry()
    for i in range(count):
        name = f"pkg_{i:04d}"
        module = f"Pkg{i:04d}"
        tarball = hex_tarball(name, "1.0.0", {f"lib/{name}.ex": elixir_module(module)})
        registry.add(
            Package(name, [Release("1.0.0", tarball)], downloads=100_000 - i, **package_fields)
        )
    return registry
