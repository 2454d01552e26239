"""Decontamination against evaluation benchmarks (MultiPL-E style JSONL files).

Each benchmark problem gives two texts, its `prompt` and its `tests` (a reference
`solution`/`canonical_solution` too, when the file has one). Texts are normalised to
lowercase word tokens and cut into n-grams; n-grams shared by many problems (the
`defmodule HumanEval do`/`ExUnit.start()` boilerplate) are dropped from the index, so
what is left identifies one problem. A file is contaminated when it holds at least
`threshold` of the distinctive n-grams of any one problem text.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from exforge.elixir.hashing import ngram_hashes, text_ngram_hashes, tokens

__all__ = ["BenchmarkIndex", "Contamination", "load_index", "ngrams"]

TEXT_FIELDS = ("prompt", "tests", "solution", "canonical_solution")
# An n-gram found in more problem texts than this is boilerplate, not evidence.
MAX_SHARED_TEXTS = 5
MIN_DISTINCTIVE = 3  # texts with fewer distinctive n-grams are too generic to match
_FILTER_BITS = 20  # of each n-gram hash, for the index's one-byte-per-slot prefilter
_LOW_BITS = np.uint64((1 << _FILTER_BITS) - 1)


def ngrams(words: Sequence[str], n: int) -> np.ndarray:
    """Distinct hashes of the n-grams of word tokens (`hashing.tokens`), case folded."""
    return ngram_hashes(words, n, fold_case=True)


@dataclass(frozen=True)
class Contamination:
    problem: str  # `name` of the problem, `#field`: which of its texts matched
    overlap: float


class BenchmarkIndex:
    """Distinctive n-grams of every benchmark text, and which text each belongs to."""

    def __init__(self, texts: Sequence[tuple[str, str]], n: int, threshold: float) -> None:
        self.n = n
        self.threshold = threshold
        grams = [ngrams(tokens(text), n) for _, text in texts]
        values, counts = np.unique(
            np.concatenate([*grams, np.empty(0, np.uint64)]), return_counts=True
        )
        boilerplate = values[counts > MAX_SHARED_TEXTS]
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.owners: dict[int, list[int]] = defaultdict(list)
        for (name, _), gs in zip(texts, grams, strict=True):
            distinctive = gs[~np.isin(gs, boilerplate, assume_unique=True)]
            if len(distinctive) < MIN_DISTINCTIVE:
                continue
            index = len(self.names)
            self.names.append(name)
            self.sizes.append(len(distinctive))
            for g in distinctive.tolist():
                self.owners[g].append(index)
        # Whether any indexed n-gram ends with given low bits: one vectorised lookup per
        # n-gram of a file rules out nearly all of them before the (cache-missing) dict.
        self.filter = np.zeros(1 << _FILTER_BITS, dtype=bool)
        self.filter[np.fromiter(self.owners, np.uint64, len(self.owners)) & _LOW_BITS] = True

    def __len__(self) -> int:
        return len(self.names)

    def check(self, words: Sequence[str]) -> Contamination | None:
        """The benchmark text a file's word tokens overlap most, if that overlap reaches
        the threshold."""
        if not self.owners:
            return None
        return self._best(ngram_hashes(words, self.n, fold_case=True, unique=False))

    def check_text(self, text: str) -> Contamination | None:
        """`check(tokens(text))`, faster."""
        if not self.owners:
            return None
        return self._best(text_ngram_hashes(text, self.n, fold_case=True, unique=False))

    def _best(self, grams: np.ndarray) -> Contamination | None:
        """`check` of a file's n-gram hashes (case folded, repeats allowed)."""
        candidates = grams[self.filter[grams & _LOW_BITS]].tolist()
        hits: Counter[int] = Counter()
        for g in sorted(self.owners.keys() & candidates):  # ascending: breaks ties alike
            hits.update(self.owners[g])
        best: Contamination | None = None
        for index, count in hits.items():
            overlap = count / self.sizes[index]
            if overlap >= self.threshold and (best is None or overlap > best.overlap):
                best = Contamination(self.names[index], overlap)
        return best


def read_problems(paths: Iterable[Path]) -> list[tuple[str, str]]:
    """(`name#field`, text) for every benchmark text field of every JSONL line."""
    texts: list[tuple[str, str]] = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            problem = json.loads(line)
            name = str(problem.get("name") or f"{path.name}:{number}")
            for field in TEXT_FIELDS:
                value = problem.get(field)
                if isinstance(value, str) and value.strip():
                    texts.append((f"{name}#{field}", value))
    return texts


@cache
def load_index(paths: tuple[Path, ...], n: int, threshold: float) -> BenchmarkIndex:
    """The index of the benchmark files (built once per process and parameters)."""
    return BenchmarkIndex(read_problems(paths), n, threshold)
