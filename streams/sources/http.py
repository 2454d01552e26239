"""A polite async HTTP client for source registries (httpx).

Crawls run unattended for weeks against services that meter their clients, so every
request goes through the same discipline: a User-Agent, bounded concurrency, a rate-limit
budget learnt from `x-ratelimit-limit/remaining/reset` that is never overspent (a
request waits for the reset instead of being sent while the budget is 0), rate limits
are waited out in the forms GitHub documents for its primary and secondary limits (a
403 or 429 with `retry-after`, or with `x-ratelimit-remaining: 0` and
`x-ratelimit-reset`; otherwise, for a 429 or a message naming a secondary rate limit,
at least `http_secondary_wait_s`, doubling while it repeats), timeouts and 5xx are
retried with exponential backoff and full jitter, and ETags are persisted so an
unchanged resource costs a 304.

Bodies are read as servers send them: httpx asks for every content coding it can decode
(gzip, deflate, and br and zstd with the `brotli` and `zstandard` packages installed),
redirects are followed (archive downloads go through CDNs), and a size limit holds for
both the bytes received and the decoded body.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import HttpCacheEntry
from exforge.core.settings import Settings

log = logging.getLogger("exforge.sources.http")

RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
THROTTLE_STATUS = frozenset({403, 429})
SECONDARY_LIMIT = re.compile(r"secondary rate limit|abuse detection", re.IGNORECASE)
# What a rebuilt response must not claim: its body is decoded and its length is new.
ENCODING_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
MAX_RATE_LIMIT_WAITS = 20
RESET_MARGIN_S = 0.05


class SourceHTTPError(RuntimeError):
    """A request failed for good (after retries, or with a status that is not retried)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(SourceHTTPError):
    """A download exceeded its size limit; it was stopped, not buffered."""


@dataclass
class RateLimiter:
    """The budget of one metered service, as its headers describe it.

    Every send takes a sequence number and spends one unit locally. A response to send
    `seq` reporting `remaining` after it means the budget left for new sends is
    `remaining` minus the sends made after `seq` and minus older sends still in flight
    (the server may not have counted those yet): responses of concurrent requests arrive
    out of order, so within one window the estimate only ever goes down, and a report of
    a later reset opens a new window. The client can therefore never overspend.
    """

    remaining: int | None = None
    limit: int | None = None
    reset_at: float = 0.0
    sent: int = 0
    waits: int = 0
    in_flight: set[int] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def acquire(self) -> int:
        """Wait until the budget allows one more send; its sequence number."""
        async with self.lock:
            while self.remaining is not None and self.remaining <= 0:
                delay = self.reset_at + RESET_MARGIN_S - time.time()
                if delay <= 0:
                    self.remaining = self.limit  # the window has turned over
                    break
                self.waits += 1
                log.info("rate limit spent: waiting %.2fs for the reset", delay)
                await asyncio.sleep(delay)
            if self.remaining is not None:
                self.remaining -= 1
            self.sent += 1
            self.in_flight.add(self.sent)
            return self.sent

    def done(self, seq: int) -> None:
        self.in_flight.discard(seq)

    def observe(self, headers: httpx.Headers, seq: int) -> None:
        try:
            remaining = int(headers["x-ratelimit-remaining"])
            reset_at = float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return
        if "x-ratelimit-limit" in headers:
            self.limit = int(headers["x-ratelimit-limit"])
        self.update(remaining, reset_at, seq)

    def update(self, remaining: int, reset_at: float, seq: int) -> None:
        """Take a report of the budget left after send `seq` (headers, or GitHub
        GraphQL's `rateLimit` object)."""
        older = sum(1 for other in self.in_flight if other < seq)
        estimate = remaining - (self.sent - seq) - older
        if reset_at > self.reset_at:
            self.reset_at = reset_at
            self.remaining = estimate
        elif self.remaining is None or estimate < self.remaining:
            self.remaining = estimate


class EtagCache:
    """ETags and bodies of API responses, persisted in the ledger database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, url: str) -> HttpCacheEntry | None:
        with Session(self.engine) as session:
            return session.scalar(select(HttpCacheEntry).where(HttpCacheEntry.url == url))

    def put(self, url: str, etag: str, body: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.merge(HttpCacheEntry(url=url, etag=etag, body=body))


@dataclass
class HttpStats:
    """What a client did, for summaries and tests."""

    requests: int = 0
    not_modified: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    throttled: int = 0  # rate-limit answers, each waited out
    paused: int = 0  # sends held back while a rate limit was in force
    encodings: Counter[str] = field(default_factory=Counter)  # content codings received


def _retry_after(value: str) -> float | None:
    """`Retry-After` (delay seconds or an HTTP date) as an epoch time."""
    value = value.strip()
    if value.isdigit():
        return time.time() + int(value)
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def throttled_until(
    response: httpx.Response, fallback_s: float, limited: bool = False
) -> float | None:
    """When a rate-limited request may be sent again; None when `response` is no rate
    limit (a 403 that is neither is a permission error, not a wait).

    In the order GitHub documents: `retry-after`; `x-ratelimit-remaining: 0` until
    `x-ratelimit-reset` (epoch seconds); then `fallback_s` from now for a 429 or a
    message naming a secondary rate limit. `limited` says the caller already knows the
    response is a rate limit (GraphQL reports one in a 200's body)."""
    if not limited and response.status_code not in THROTTLE_STATUS:
        return None
    headers = response.headers
    if (retry_after := headers.get("retry-after")) and (until := _retry_after(retry_after)):
        return until
    if headers.get("x-ratelimit-remaining", "").strip() == "0":
        try:
            return float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            pass
    if limited or response.status_code == 429 or SECONDARY_LIMIT.search(response.text):
        return time.time() + fallback_s
    return None


class PoliteClient:
    """One metered service: shared budget, concurrency bound, retries, ETag cache."""

    def __init__(
        self,
        settings: Settings,
        cache: EtagCache | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.limiter = RateLimiter()
        self.paused_until: dict[str, float] = {}  # host → when a rate limit ends
        self.stats = HttpStats()
        self.semaphore = asyncio.Semaphore(settings.http_concurrency)
        self.client = httpx.AsyncClient(
            headers={"user-agent": settings.http_user_agent, **(headers or {})},
            timeout=settings.http_timeout_s,
            follow_redirects=True,
        )

    async def __aenter__(self) -> PoliteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2^attempt]."""
        return random.uniform(0, self.settings.http_backoff_s * 2**attempt)

    async def request(
        self,
        method: str,
        url: str,
        *,
        metered: bool = True,
        max_bytes: int | None = None,
        limited: Callable[[httpx.Response], bool] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with the whole discipline; the response is read (within `max_bytes`) and
        decoded. `limited` tells a rate limit the status does not show (GraphQL's)."""
        attempt = 0
        rate_waits = 0
        host = httpx.URL(url).netloc.decode()
        while True:
            await self._wait_pause(host)
            async with self.semaphore:  # the budget is taken only when about to send
                seq = await self.limiter.acquire() if metered else 0
                try:
                    response = await self._send(method, url, max_bytes, **kwargs)
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    reason = exc.__class__.__name__
                    response = None
                else:
                    if metered:
                        self.limiter.observe(response.headers, seq)
                finally:
                    self.limiter.done(seq)
            if response is not None:
                fallback = self.settings.http_secondary_wait_s * 2**rate_waits
                until = throttled_until(
                    response, fallback, limited is not None and limited(response)
                )
                if until is not None and rate_waits < MAX_RATE_LIMIT_WAITS:
                    rate_waits += 1
                    self.stats.throttled += 1
                    # every request to the host waits (the budget is left as the headers
                    # described it: a secondary limit does not spend the primary one)
                    self.paused_until[host] = max(self.paused_until.get(host, 0.0), until)
                    continue
                if response.status_code not in RETRYABLE_STATUS:
                    return response
                reason = str(response.status_code)
            attempt += 1
            self.stats.retries[reason] += 1
            if attempt >= self.settings.http_retries:
                status = response.status_code if response is not None else None
                raise SourceHTTPError(
                    f"{method} {url} failed after {attempt} attempts (last: {reason})", status
                )
            await asyncio.sleep(self.backoff(attempt - 1))

    async def _wait_pause(self, host: str) -> None:
        while (delay := self.paused_until.get(host, 0.0) - time.time()) > 0:
            self.stats.paused += 1
            log.info("rate limited by %s: waiting %.2fs", host, delay)
            await asyncio.sleep(delay)

    async def _send(
        self, method: str, url: str, max_bytes: int | None, **kwargs: Any
    ) -> httpx.Response:
        """One exchange, redirects followed, its body read and decoded. Over `max_bytes`
        (declared, received or decoded) it stops reading: a compressed bomb is never
        inflated past the limit. The response returned holds the decoded body, so it
        names no content coding."""
        self.stats.requests += 1
        limit = max_bytes if max_bytes is not None else float("inf")
        async with self.client.stream(method, url, **kwargs) as response:
            self.stats.encodings[response.headers.get("content-encoding", "identity")] += 1
            declared = int(response.headers.get("content-length") or 0)
            if declared > limit:
                raise TooLarge(f"{url} is {declared} bytes, over the {max_bytes}-byte limit")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit or response.num_bytes_downloaded > limit:
                    raise TooLarge(f"{url} is over the {max_bytes}-byte limit")
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ENCODING_HEADERS
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=bytes(body),
            request=response.request,
            history=response.history,
        )

    async def get_json(self, url: str, params: dict[str, Any] | None = None) -> Any:
        """GET a JSON API resource, answering from the ETag cache on a 304."""
        full = str(httpx.URL(url, params={k: v for k, v in (params or {}).items() if v}))
        cached = self.cache.get(full) if self.cache else None
        headers = {"accept": "application/json"}
        if cached is not None:
            headers["if-none-match"] = cached.etag
        response = await self.request("GET", full, headers=headers)
        if response.status_code == 304 and cached is not None:
            self.stats.not_modified += 1
            return json.loads(cached.body)
        if response.status_code >= 400:
            raise SourceHTTPError(f"GET {full}: HTTP {response.status_code}", response.status_code)
        etag = response.headers.get("etag")
        if self.cache is not None and etag:
            self.cache.put(full, etag, response.text)
        return response.json()
