"""Near-duplicate detection: MinHash signatures, LSH bands, and the decision rules.

Signatures are MinHash over 5-token shingles with 256 permutations, each a random
multiplication `a * x mod 2**32` (a odd, so a bijection) of 32-bit shingle hashes,
computed for every permutation and shingle in one numpy operation (datasketch's
per-shingle SHA-1 costs more than parsing the file). The shingle hashes are already
well mixed (`exforge.elixir.hashing`), so an offset `+ b` would add a pass over the
data and no quality: `benchmarks/neardup_quality.py` measures both.

The signature is cut into `bands` bands of `rows` rows, chosen to minimise the sum of
the false-positive and false-negative probabilities at the Jaccard threshold (0.7,
BigCode's parameters): `optimal_bands`. Two files whose band hashes collide in any band
are candidates; each band hash is a bucket key `band:hash`.

The decision is made in the stream (see `streams.dedup`), by these pure rules:

* `Bucket` keeps the smallest sha256 ever registered in it. A newcomer is told about a
  smaller member (`earlier`); a displaced member is told about the newcomer
  (`displaced`), and the newcomer waits for its answer (`later`). So once every file of
  a batch is registered, each file knows whether *some* file of a smaller sha256 shares
  a bucket with it, whatever the order the registrations came in; a displaced member
  that was decided in an earlier batch answers the newcomer with its cluster. It also
  keeps the members it displaced, so that a registration delivered again tells each
  file concerned again what it told it the first time (its outputs may be lost).
* `decide`: a held file colliding with an already decided file (an earlier batch) is a
  near-duplicate of that file's cluster; otherwise a file with a smaller colliding file
  in its own batch is a near-duplicate of the smallest one it heard of; otherwise it is
  kept and starts its own cluster.

Both rules depend only on the set of files, never on their arrival order, so the kept
set does not depend on the number of workers or partitions.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from exforge.elixir.hashing import ngram_hashes, text_ngram_hashes

__all__ = [
    "NUM_PERM",
    "SHINGLE",
    "THRESHOLD",
    "Bucket",
    "Held",
    "band_keys",
    "bucket_partition",
    "decide",
    "lsh_errors",
    "multipliers",
    "optimal_bands",
    "shingles",
    "signature",
    "text_band_keys",
]

NUM_PERM = 256
SHINGLE = 5
THRESHOLD = 0.7
SEED = 42
_BLOCK = 512


def _integrate(f: Callable[[float], float], a: float, b: float, steps: int = 200) -> float:
    """Composite Simpson's rule (`steps` even)."""
    h = (b - a) / steps
    total = f(a) + f(b)
    for i in range(1, steps):
        total += (4 if i % 2 else 2) * f(a + i * h)
    return total * h / 3


def lsh_errors(threshold: float, bands: int, rows: int) -> tuple[float, float]:
    """(false-positive, false-negative) areas of banding with `bands` x `rows`.

    A pair of Jaccard similarity s collides in at least one band with probability
    1 - (1 - s^rows)^bands: below the threshold that is a false positive, above it
    a miss is a false negative.
    """

    def collide(s: float) -> float:
        return 1 - (1 - s**rows) ** bands

    false_positive = _integrate(collide, 0.0, threshold)
    false_negative = _integrate(lambda s: 1 - collide(s), threshold, 1.0)
    return false_positive, false_negative


@cache
def optimal_bands(threshold: float = THRESHOLD, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising FP + FN at `threshold`."""
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            error = sum(lsh_errors(threshold, bands, rows))
            if best is None or error < best[0]:
                best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


def shingles(words: Sequence[str], size: int = SHINGLE) -> np.ndarray:
    """Hashes (32-bit) of the distinct shingles of `size` word tokens (`hashing.tokens`)."""
    return np.unique(ngram_hashes(words, size).astype(np.uint32))


@cache
def multipliers(num_perm: int = NUM_PERM) -> np.ndarray:
    """The odd multipliers `a` of the permutations `a * x mod 2**32`, as one row."""
    rng = np.random.default_rng(SEED)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    return a[None, :]


def signature(words: Sequence[str], num_perm: int = NUM_PERM) -> np.ndarray | None:
    """The MinHash signature of the shingles of word tokens; None when there are none."""
    return _minhash(ngram_hashes(words, SHINGLE, unique=False), num_perm)


def _minhash(grams: np.ndarray, num_perm: int) -> np.ndarray | None:
    """The MinHash signature of shingle hashes (repeats allowed: same minimum)."""
    if not len(grams):
        return None
    grams = grams.astype(np.uint32)
    a = multipliers(num_perm)
    values = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    block = np.empty((_BLOCK, num_perm), dtype=np.uint32)
    # A row per shingle, a column per permutation: the minimum over rows is an elementwise
    # minimum of whole rows, which vectorises better than reducing along each row.
    for start in range(0, len(grams), _BLOCK):  # blocks small enough to stay in cache
        chunk = grams[start : start + _BLOCK, None]
        out = block[: chunk.shape[0]]
        np.multiply(chunk, a, out=out)
        np.minimum(values, np.minimum.reduce(out, axis=0), out=values)
    return values


def band_keys(
    words: Sequence[str], threshold: float = THRESHOLD, num_perm: int = NUM_PERM
) -> list[str]:
    """The LSH bucket keys `band:hash` of a file's word tokens (none without tokens)."""
    return _band_keys(signature(words, num_perm), threshold, num_perm)


def text_band_keys(text: str, threshold: float = THRESHOLD, num_perm: int = NUM_PERM) -> list[str]:
    """`band_keys(tokens(text), threshold, num_perm)`, faster."""
    grams = text_ngram_hashes(text, SHINGLE, unique=False)
    return _band_keys(_minhash(grams, num_perm), threshold, num_perm)


def _band_keys(values: np.ndarray | None, threshold: float, num_perm: int) -> list[str]:
    if values is None:
        return []
    bands, rows = optimal_bands(threshold, num_perm)
    raw = values.astype("<u4").tobytes()
    size = rows * 4  # bytes of one band
    return [
        f"{band}:{hashlib.blake2b(raw[band * size : (band + 1) * size], digest_size=8).hexdigest()}"
        for band in range(bands)
    ]


def bucket_partition(band_key: str, partitions: int) -> int:
    """The partition that owns an LSH bucket (the same in every process)."""
    return zlib.crc32(band_key.encode()) % partitions


# ------------------------------------------------------------------- decision rules


@dataclass(frozen=True)
class Bucket:
    """One LSH bucket's state: the smallest sha256 registered in it, and the files it
    displaced in turn (`displaced`, newest first: each larger than the one before), so
    that a registration delivered again says again what it said the first time."""

    smallest: str | None = None
    displaced: tuple[str, ...] = ()

    @classmethod
    def loads(cls, raw: str | None) -> Bucket:
        """A bucket from its table value (`dumps`; empty or None: a new bucket)."""
        if not raw:
            return cls()
        smallest, *displaced = raw.split(" ")
        return cls(smallest, tuple(displaced))

    def dumps(self) -> str:
        assert self.smallest is not None
        return " ".join((self.smallest, *self.displaced))

    def register(self, sha256: str) -> tuple[Bucket, list[tuple[str, str, str]]]:
        """Add a file; what each file concerned hears, as (file, kind, about). A newcomer
        larger than the smallest hears `earlier` of it. A smaller newcomer displaces it:
        the displaced file hears `displaced` of the newcomer (it has an `earlier` file
        now, and owes the newcomer an answer), the newcomer `later` of the displaced one
        (a file it waits for the answer of: that file may know of a decided file).

        A file registered before (a redelivery, whose first outputs may be lost) leaves
        the bucket as it is and hears, and has the file it displaced hear, what they
        heard then, however many files registered since. The files a bucket displaced
        are its smallest ones in turn: about ln(n) of n files in random order."""
        if self.smallest is None:
            return Bucket(sha256), []
        turns = (self.smallest, *self.displaced)  # ascending
        if sha256 in turns:
            index = turns.index(sha256)
            if index + 1 == len(turns):  # it was the bucket's first file
                return self, []
            return self, _displacement(turns[index + 1], sha256)
        if self.smallest < sha256:
            return self, [(sha256, "earlier", self.smallest)]
        return Bucket(sha256, turns), _displacement(self.smallest, sha256)


def _displacement(displaced: str, newcomer: str) -> list[tuple[str, str, str]]:
    return [(displaced, "displaced", newcomer), (newcomer, "later", displaced)]


@dataclass(frozen=True)
class Held:
    """What a held file has heard from its buckets before its batch is decided."""

    earlier: str | None = None  # smallest smaller file sharing a bucket
    settled: str | None = None  # smallest cluster of an already decided file in a bucket

    def hear(self, kind: str, about: str) -> Held:
        """What the file knows after hearing `kind` of `about` (`Bucket.register`'s
        kinds, and `settled`): `earlier` and `displaced` both name a smaller file sharing
        a bucket; `later` (a file to wait for) changes nothing it knows."""
        if kind in ("earlier", "displaced") and (self.earlier is None or about < self.earlier):
            return Held(about, self.settled)
        if kind == "settled" and (self.settled is None or about < self.settled):
            return Held(self.earlier, about)
        return self


def decide(held: Held) -> str | None:
    """The cluster the file is a near-duplicate of; None when it is kept."""
    if held.settled is not None:
        return held.settled
    return held.earlier
