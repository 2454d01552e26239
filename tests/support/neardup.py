"""Near-duplicate references for the tests.

`batch_decisions` drives the rules of `exforge.elixir.neardup` (buckets, held files,
`decide`) over one batch in one process, as the streaming agent applies them across
partitions. `lsh_candidates` and `reference_outcomes` compute what those rules must
give without them: the LSH candidates from datasketch's `MinHashLSH` (its own banding
and bucket hashing) over the files' MinHash signatures, and the rule stated directly —
a file is kept iff no file of a smaller sha256 is an LSH candidate of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from exforge.elixir.neardup import NUM_PERM, THRESHOLD, Bucket, Held, decide


def batch_decisions(files: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """The stream's outcome for one batch (sha256 → band keys), computed in one process:
    sha256 → cluster it is a near-duplicate of, or None when kept. Registration order
    does not matter (files are registered in the mapping's order)."""
    buckets: dict[str, Bucket] = {}
    heard: dict[str, Held] = {sha: Held() for sha in files}
    for sha, bands in files.items():
        for band in bands:
            buckets[band], sends = buckets.get(band, Bucket()).register(sha)
            for to, kind, about in sends:
                heard[to] = heard[to].hear(kind, about)
    return {sha: decide(held) for sha, held in heard.items()}


def lsh_candidates(signatures: Mapping[str, np.ndarray]) -> dict[str, set[str]]:
    """Each file's LSH candidates (the other files sharing a band), by datasketch's
    `MinHashLSH` at the near-dup threshold over the files' signatures."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sketches = {
        sha: MinHash(num_perm=NUM_PERM, hashvalues=values, scheme="affine32")
        for sha, values in signatures.items()
    }
    for sha, sketch in sketches.items():
        lsh.insert(sha, sketch)
    return {sha: set(lsh.query(sketch)) - {sha} for sha, sketch in sketches.items()}


def reference_outcomes(candidates: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """sha256 → the clusters its decision may name: its candidates of a smaller sha256
    (empty: the file must be kept)."""
    return {sha: {other for other in others if other < sha} for sha, others in candidates.items()}
