"""Word tokens and their n-gram hashes, vectorised (numpy) and the same in every process.

Tokens are `\\w+` runs. A token hashes to its CRC-32; an n-gram to a polynomial over its
token hashes, finished with MurmurHash3's 64-bit mixer, so n-grams of a whole file are
hashed in a few array operations instead of one Python call each. (Python's `hash` is
salted per process, so it cannot name a bucket that several workers share.)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["ngram_hashes", "tokens"]

_TOKEN = re.compile(r"\w+")
_BASE = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)


@lru_cache(maxsize=8)
def tokens(text: str) -> tuple[str, ...]:
    """The word tokens of a text (the last few texts are remembered: the analysis, the
    near-duplicate bands and the contamination check of one file share them)."""
    return tuple(_TOKEN.findall(text))


def ngram_hashes(
    words: Sequence[str], n: int, fold_case: bool = False, unique: bool = True
) -> np.ndarray:
    """64-bit hashes of the n-grams of `words` (one n-gram of all of them when there are
    fewer than n; none for no words), distinct and sorted unless `unique` is False;
    `fold_case`: as if lowercased."""
    if not words:
        return np.empty(0, dtype=np.uint64)
    if fold_case:
        table = {w: zlib.crc32(w.lower().encode()) for w in set(words)}
    else:
        table = {w: zlib.crc32(w.encode()) for w in set(words)}
    ids = np.array(list(map(table.__getitem__, words)), dtype=np.uint64)
    size = min(n, len(ids))
    count = len(ids) - size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(size):
            hashes = hashes * _BASE + ids[offset : offset + count]
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX1
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX2
        hashes ^= hashes >> _SHIFT
    return np.unique(hashes) if unique else hashes
