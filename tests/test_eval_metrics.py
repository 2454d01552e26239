"""pass@k (Chen et al.'s unbiased estimator), chrF and compile rate."""

from __future__ import annotations

from math import comb

import pytest
import sacrebleu

from workers.evaluator.metrics import chrf, compile_rate, mean_pass_at_k, pass_at_k


def test_pass_at_k_hand_computed_case() -> None:
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7, and the product
    # form gives 1 - (1 - 2/4)(1 - 2/5) = 1 - 0.5 * 0.6 = 0.7 exactly.
    assert pass_at_k(5, 2, 2) == 0.7
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: every k-subset passes


@pytest.mark.parametrize("n", [1, 2, 7, 20, 200])
def test_pass_at_k_matches_the_combinatorial_definition(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats() -> None:
    # C(2000, 1000) does not fit in a float; the product form still gives an answer.
    assert 0.0 < pass_at_k(2000, 1, 1000) <= 1.0
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 4, 1), (3, 1, 0), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems() -> None:
    assert mean_pass_at_k([(5, 2), (5, 5), (5, 0)], 2) == pytest.approx((0.7 + 1 + 0) / 3)


def test_chrf_uses_sacrebleu_defaults() -> None:
    reference = "Enum.map(list, &(&1 * 2))"
    hypothesis = "Enum.map(list, fn x -> x * 2 end)"
    assert chrf(reference, reference) == 100.0
    assert chrf(hypothesis, reference) == sacrebleu.sentence_chrf(hypothesis, [reference]).score
    assert 0 < chrf(hypothesis, reference) < 100
    assert chrf("", reference) == 0.0


def test_compile_rate_counts_everything_but_syntax_errors() -> None:
    assert compile_rate(["passed", "failed", "syntax_error", "timeout"]) == 0.75
    assert compile_rate([]) == 0.0
