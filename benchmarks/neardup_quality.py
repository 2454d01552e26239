"""Near-duplicate detection quality on a generated set, against exact-only dedup.

    python benchmarks/neardup_quality.py [--families 200]

Each family is a generated module (`streams.elixir.synthetic`) and three near-duplicates
of it: a variable renamed, the functions reordered, comments rewritten. Every pair
within a family is a known near-duplicate pair. Each family also gets a *related*
module sharing half of its functions with the family's module: it and every pair across
families are known distinct pairs. Separately, a fourth variant with all three edits
at once (Jaccard about 0.7, right at the threshold) shows the LSH curve's behaviour
there: about half are caught, as `1 - (1 - s**rows)**bands` predicts.

A pair is detected by near-dedup when the two files share an LSH band (what sends them
to the same bucket in the stream), by exact dedup when their normalised contents have
the same sha256. Precision and recall are over all pairs of the set.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.elixir import normalise
from streams.elixir.hashing import tokens
from streams.elixir.neardup import band_keys, optimal_bands, shingles
from streams.elixir.synthetic import mixed, module, recommented, renamed, reordered

KINDS = ("renamed", "reordered", "recommented")
AT_THRESHOLD = "all three"


def generated(families: int, seed: int) -> list[tuple[str, int, str]]:
    """(text, family, kind); related modules get a family of their own."""
    rng = random.Random(seed)
    bases = [module(rng, f"Gen.M{i}") for i in range(families)]
    files = []
    for index, base in enumerate(bases):
        variants = (renamed(rng, base), reordered(rng, base), recommented(rng, base))
        files.append((base.source(), index, "base"))
        files.extend((v.source(), index, kind) for v, kind in zip(variants, KINDS, strict=True))
        edited = renamed(rng, recommented(rng, reordered(rng, base)))
        files.append((edited.source(), 2 * families + index, AT_THRESHOLD))
        other = bases[(index + 1) % families]
        files.append((mixed(rng, base, other, 4).source(), families + index, "related"))
    return files


def colliding_pairs(keys: list[list[str]]) -> set[tuple[int, int]]:
    buckets: dict[str, list[int]] = defaultdict(list)
    for index, file_keys in enumerate(keys):
        for key in file_keys:
            buckets[key].append(index)
    return {pair for members in buckets.values() for pair in itertools.combinations(members, 2)}


def score(predicted: set[tuple[int, int]], positive: set[tuple[int, int]]) -> str:
    hits = len(predicted & positive)
    precision = f"{hits / len(predicted):.4f}" if predicted else "n/a (no pair found)"
    return f"precision {precision}  recall {hits / len(positive):.4f}"


def jaccard(a: str, b: str) -> float:
    x, y = shingles(tokens(a)), shingles(tokens(b))
    return len(np.intersect1d(x, y)) / len(np.union1d(x, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    files = generated(args.families, args.seed)
    family = [f for _, f, _ in files]
    kind = [k for _, _, k in files]
    positive = {
        (i, j) for i, j in itertools.combinations(range(len(files)), 2) if family[i] == family[j]
    }
    edited = {
        (i, j)
        for i, j in itertools.combinations(range(len(files)), 2)
        if kind[i] == "base"
        and kind[j] == AT_THRESHOLD
        and family[j] == family[i] + 2 * args.families
    }
    scored = [f for f in range(len(files)) if kind[f] != AT_THRESHOLD]
    near = colliding_pairs([band_keys(tokens(text)) for text, _, _ in files])
    exact = colliding_pairs(
        [[hashlib.sha256(normalise(text).encode()).hexdigest()] for text, _, _ in files]
    )
    in_scope = {(i, j) for i, j in itertools.combinations(scored, 2)}
    bands, rows = optimal_bands()
    print(f"set: {len(scored)} files, {len(positive)} near-duplicate pairs of {len(in_scope)}")
    print(f"LSH: {bands} bands x {rows} rows of 256 permutations, threshold 0.7")
    for name, predicted in (("near-dedup (MinHash LSH)", near), ("exact-only (sha256)", exact)):
        print(f"{name:26s} {score(predicted & in_scope, positive)}")
    print("near-dedup recall by variant (pairs with the family's module):")
    for variant in (*KINDS, AT_THRESHOLD):
        subset = {(i, j) for i, j in positive | edited if kind[i] == "base" and kind[j] == variant}
        similarity = [jaccard(files[i][0], files[j][0]) for i, j in subset]
        expected = np.mean([1 - (1 - s**rows) ** bands for s in similarity])
        print(
            f"  {variant:12s} recall {len(subset & near) / len(subset):.4f}"
            f" (LSH curve: {expected:.2f})"
            f"  Jaccard min {min(similarity):.2f} mean {np.mean(similarity):.2f}"
        )
    related = [
        (i, j)
        for i, j in itertools.combinations(range(len(files)), 2)
        if kind[j] == "related" and kind[i] == "base" and family[j] == family[i] + args.families
    ]
    similarity = [jaccard(files[i][0], files[j][0]) for i, j in related]
    flagged = sum(1 for pair in related if pair in near)
    print(
        f"related modules (half the functions shared): {flagged}/{len(related)} flagged,"
        f" Jaccard mean {np.mean(similarity):.2f} max {max(similarity):.2f}"
    )


if __name__ == "__main__":
    main()
