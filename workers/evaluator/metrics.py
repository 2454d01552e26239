"""Evaluation metrics: unbiased pass@k, chrF, compile rate."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache

from sacrebleu.metrics import CHRF


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) for stability."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs."""
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


@cache
def _chrf() -> CHRF:
    return CHRF()  # sacrebleu's defaults: character 6-grams, no word n-grams, beta 2


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (0-100) of a completion against the reference solution."""
    return _chrf().sentence_score(hypothesis, [reference]).score


def compile_rate(statuses: Iterable[str]) -> float:
    """Share of candidates that compiled (anything but a syntax or compile error)."""
    values = list(statuses)
    return sum(status != "syntax_error" for status in values) / len(values) if values else 0.0
