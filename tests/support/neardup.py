"""The near-duplicate rules of `exforge.elixir.neardup` applied to one batch in one
process: the reference the streaming agent's decisions are checked against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from exforge.elixir.neardup import Bucket, Held, decide


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
