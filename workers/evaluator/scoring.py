"""Score given completions against a benchmark: run them in the sandbox, then pass@k,
chrF, compile rate and warnings, overall, per category and per problem."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from exforge.core.settings import Settings
from exforge.elixir.sandbox import STATUSES, Outcome, SandboxConfig, SandboxPool
from workers.evaluator.benchmarks import Benchmark, BenchmarkError, Completion, Problem
from workers.evaluator.metrics import chrf, compile_rate, mean_pass_at_k, pass_at_k

RESULT_VERSION = 1


def sandbox_config(settings: Settings, allow_unisolated: bool = False) -> SandboxConfig:
    return SandboxConfig(
        timeout_s=settings.eval_timeout_s,
        memory_mb=settings.eval_memory_mb,
        workers=settings.eval_workers or os.cpu_count() or 1,
        max_uses=settings.eval_max_uses,
        allow_unisolated=allow_unisolated,
    )


def check_completions(benchmark: Benchmark, completions: Sequence[Completion]) -> None:
    unknown = sorted({c.name for c in completions} - set(benchmark.by_name()))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise BenchmarkError(f"{len(unknown)} completion name(s) not in {benchmark.name}: {shown}")
    if not completions:
        raise BenchmarkError("no completions to score")


def usable_ks(requested: Sequence[int], counts: Sequence[tuple[int, int]]) -> list[int]:
    """The requested k that every scored problem has enough samples for (k <= min n)."""
    smallest = min(n for n, _ in counts)
    return sorted(k for k in set(requested) if 1 <= k <= smallest)


def _sample(outcome: Outcome, problem: Problem, completion: str) -> dict[str, Any]:
    sample = asdict(outcome)
    sample["chrf"] = chrf(completion, problem.reference) if problem.reference else None
    return sample


def _problem_summary(problem: Problem, samples: list[dict[str, Any]], ks: list[int]) -> dict:
    n = len(samples)
    c = sum(sample["status"] == "passed" for sample in samples)
    scores = [s["chrf"] for s in samples if s["chrf"] is not None]
    return {
        "name": problem.name,
        "category": problem.category,
        "n": n,
        "c": c,
        "pass_at_k": {str(k): pass_at_k(n, c, k) for k in ks},
        "statuses": [sample["status"] for sample in samples],
        "chrf": sum(scores) / len(scores) if scores else None,
        "samples": samples,
    }


def _aggregate(problems: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    counts = [(p["n"], p["c"]) for p in problems]
    statuses = [status for p in problems for status in p["statuses"]]
    scores = [p["chrf"] for p in problems if p["chrf"] is not None]
    tally = Counter(statuses)
    return {
        "problems": len(problems),
        "samples": len(statuses),
        "pass_at_k": {str(k): mean_pass_at_k(counts, k) for k in ks},
        "status_counts": {status: tally[status] for status in STATUSES},
        "compile_rate": compile_rate(statuses),
        "warnings": sum(s["warnings"] for p in problems for s in p["samples"]),
        "chrf": sum(scores) / len(scores) if scores else None,
    }


def score(
    benchmark: Benchmark,
    completions: Sequence[Completion],
    pool: SandboxPool,
    ks: Sequence[int] = (1,),
    on_done: Callable[[int, Outcome], None] | None = None,
) -> dict[str, Any]:
    """Run every completion and summarise; `on_done(index, outcome)` as each finishes."""
    check_completions(benchmark, completions)
    problems = benchmark.by_name()
    programs = [problems[c.name].program(c.completion) for c in completions]
    outcomes = pool.map(programs, on_done)
    samples = [
        _sample(outcome, problems[c.name], c.completion)
        for c, outcome in zip(completions, outcomes, strict=True)
    ]
    return summarise(
        benchmark,
        completions,
        samples,
        ks,
        isolation=pool.isolation.description,
        workers_replaced=pool.replaced,
    )


def normalise_answer(text: str) -> str:
    """An answer as compared: first line, lower case, no quotes, backticks or end dot."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(first.strip().strip("`'\".").lower().split())


def exact_sample(problem: Problem, completion: str) -> dict[str, Any]:
    accepted = {normalise_answer(answer) for answer in problem.answers}
    passed = normalise_answer(completion) in accepted
    return {
        "status": "passed" if passed else "failed",
        "warnings": 0,
        "chrf": None,
        "answer": completion,
    }


def score_exact(
    benchmark: Benchmark, completions: Sequence[Completion], ks: Sequence[int] = (1,)
) -> dict[str, Any]:
    """Exact-match scoring of answers (idiom recognition, concept questions): no sandbox,
    compile rate not applicable."""
    check_completions(benchmark, completions)
    problems = benchmark.by_name()
    samples = [exact_sample(problems[c.name], c.completion) for c in completions]
    result = summarise(benchmark, completions, samples, ks, isolation="none (exact match)")
    result["compile_rate"] = None
    for category in result["by_category"].values():
        category["compile_rate"] = None
    return result


def summarise(
    benchmark: Benchmark,
    completions: Sequence[Completion],
    samples: Sequence[dict[str, Any]],
    ks: Sequence[int],
    isolation: str,
    workers_replaced: int = 0,
) -> dict[str, Any]:
    """The result document: overall, per category and per problem."""
    problems = benchmark.by_name()
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for completion, sample in zip(completions, samples, strict=True):
        grouped[completion.name].append(sample)
    counts = [(len(members), 0) for members in grouped.values()]
    used = usable_ks(ks, counts)
    summaries = [
        _problem_summary(problems[name], grouped[name], used)
        for name in problems
        if name in grouped
    ]
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for summary in summaries:
        by_category[summary["category"]].append(summary)
    return {
        "version": RESULT_VERSION,
        "benchmark": benchmark.name,
        "isolation": isolation,
        "k": used,
        "k_skipped": sorted(set(ks) - set(used)),
        "unattempted": len(benchmark.problems) - len(summaries),
        "workers_replaced": workers_replaced,
        **_aggregate(summaries, used),
        "by_category": {
            category: _aggregate(members, used) for category, members in sorted(by_category.items())
        },
        "per_problem": summaries,
    }
