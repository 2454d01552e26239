"""Admission control: per-key token buckets and a bounded queue in front of the slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


class Rejected(Exception):
    """Too many requests; `retry_after` seconds is a fair wait."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = max(1, round(retry_after + 0.49))


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = self.capacity
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.default = (rate, burst)
        self.buckets: dict[str, TokenBucket] = {}

    def check(self, key_id: str, rate: float | None, burst: int | None) -> None:
        bucket = self.buckets.get(key_id)
        if bucket is None:
            bucket = TokenBucket(rate or self.default[0], float(burst or self.default[1]))
            self.buckets[key_id] = bucket
        wait = bucket.take()
        if wait:
            raise Rejected("rate limit exceeded for this API key", wait)


class Admission:
    """`slots` generations at once, at most `queue` waiting; the rest get 429."""

    def __init__(self, slots: int, queue: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)
        self.slots = slots
        self.queue = queue
        self.waiting = 0
        self.running = 0
        self.mean_s = 1.0  # moving average of a generation's duration, for Retry-After

    @asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """Wait for a slot (TimeoutError past `timeout_s`); Rejected when the queue is full."""
        if self.semaphore.locked() and self.waiting >= self.queue:
            raise Rejected("request queue is full", self.mean_s * (self.waiting + 1) / self.slots)
        self.waiting += 1
        try:
            await asyncio.wait_for(self.semaphore.acquire(), timeout_s)
        finally:
            self.waiting -= 1
        self.running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self.semaphore.release()
            self.mean_s = 0.9 * self.mean_s + 0.1 * (time.monotonic() - started)
