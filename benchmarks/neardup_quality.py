"""Near-duplicate detection quality on a generated set, against exact-only dedup.

    python benchmarks/neardup_quality.py [--families 200]

Each family is a generated module (`exforge.elixir.synthetic`) and three near-duplicates
of it: a variable renamed, the functions reordered, comments rewritten. Every pair
within a family is a known near-duplicate pair. Each family also gets a *related*
module sharing half of its functions with the family's module: it and every pair across
families are known distinct pairs. Separately, a fourth variant with all three edits
at once (Jaccard about 0.7, right at the threshold) shows the LSH curve's behaviour
there: about half are caught, as `1 - (1 - s**rows)**bands` predicts.

A pair is detected by near-dedup when the two files share an LSH band (what sends them
to the same bucket in the stream), by exact dedup when their normalised contents have
the same sha256. Precision and recall are over all pairs of the set.

Last, the signatures themselves: how far the share of equal signature entries (the
MinHash estimate of Jaccard similarity) is from the true Jaccard similarity of the
shingle sets, for the stage's permutations (`a * x`) and, as the reference, the textbook
affine ones (`a * x + b`), over the pairs within families and as many random pairs.
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

from exforge.elixir.analysis import normalise
from exforge.elixir.hashing import tokens
from exforge.elixir.neardup import (
    NUM_PERM,
    band_keys,
    multipliers,
    optimal_bands,
    shingles,
    signature,
)
from exforge.elixir.synthetic import mixed, module, recommented, renamed, reordered

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


def estimate_errors(files: list[tuple[str, int, str]], seed: int) -> None:
    """Mean absolute error and bias of the MinHash Jaccard estimate, both permutation
    families, against the exact Jaccard similarity of the shingle sets."""
    rng = random.Random(seed)
    family = [f for _, f, _ in files]
    pairs = [
        (i, j) for i, j in itertools.combinations(range(len(files)), 2) if family[i] == family[j]
    ]
    pairs += [tuple(sorted(rng.sample(range(len(files)), 2))) for _ in range(len(pairs))]
    sets = [shingles(tokens(text)) for text, _, _ in files]
    offsets = np.random.default_rng(seed).integers(0, 2**32, NUM_PERM, dtype=np.uint64)
    offsets = offsets.astype(np.uint32)
    stage = [signature(tokens(text)) for text, _, _ in files]
    affine = [(s[:, None] * multipliers() + offsets).min(axis=0) for s in sets]
    true = np.array(
        [
            len(np.intersect1d(sets[i], sets[j])) / len(np.union1d(sets[i], sets[j]))
            for i, j in pairs
        ]
    )
    print(
        f"Jaccard estimate from {NUM_PERM} permutations, {len(pairs)} pairs"
        f" (binomial sd at 0.7: {np.sqrt(0.21 / NUM_PERM):.4f}):"
    )
    for name, signatures in (("a * x (stage)", stage), ("a * x + b", affine)):
        estimate = np.array([np.mean(signatures[i] == signatures[j]) for i, j in pairs])
        error = estimate - true
        print(f"  {name:14s} mean abs error {np.abs(error).mean():.4f}  bias {error.mean():+.4f}")


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
    estimate_errors(files, args.seed)


if __name__ == "__main__":
    main()
