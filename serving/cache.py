"""Exact-match response cache for deterministic requests (temperature 0, fixed seed)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from serving.contract import LlmRequest


@dataclass(frozen=True)
class CacheKey:
    model: str
    version: int
    request: LlmRequest


@dataclass(frozen=True)
class CachedCompletion:
    deltas: tuple[str, ...]  # one per token served, so usage stays exact
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class ResponseCache:
    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.data: OrderedDict[CacheKey, CachedCompletion] = OrderedDict()

    def get(self, key: CacheKey) -> CachedCompletion | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: CacheKey, value: CachedCompletion) -> None:
        if not self.entries:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.entries:
            self.data.popitem(last=False)

    def invalidate(self, model: str) -> int:
        """Drop every entry of `model` (its versions changed)."""
        stale = [key for key in self.data if key.model == model]
        for key in stale:
            del self.data[key]
        return len(stale)
