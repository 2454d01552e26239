"""`exforge eval run`: generate completions with a registered version, score them, store
the result in the registry and the store; and the short evaluation the demo ends with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.elixir.sandbox import SandboxPool, checked_isolation
from exforge.llm.registry import record_results
from workers.evaluator.benchmarks import (
    BUILTIN,
    Benchmark,
    BenchmarkError,
    Completion,
    load_benchmark,
)
from workers.evaluator.generate import (
    GenerationCache,
    Generator,
    InProcessGenerator,
    Request,
    Sampling,
    generate_completions,
)
from workers.evaluator.qa import CONCEPTS_PREFIX, IDIOMS, load_concepts, load_idioms
from workers.evaluator.report import load_results, save_result, write_report
from workers.evaluator.scoring import sandbox_config, score, score_exact

DEMO_SAMPLING = Sampling(temperature=0.0, max_tokens=32, batch_size=16)


class EvalError(RuntimeError):
    """An evaluation that cannot run (unknown version, unusable benchmark)."""


@dataclass(frozen=True)
class EvalRequest:
    model: str
    version: int | None  # None: the newest registered version
    benchmark: str = BUILTIN
    n: int = 1
    ks: tuple[int, ...] = (1,)
    sampling: Sampling = field(default_factory=Sampling)
    limit: int | None = None
    allow_unisolated: bool = False  # score where the kernel refuses the sandbox's namespaces


class PhaseProgress:
    """Callbacks for the two phases; the CLI draws them as progress bars."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, count: int = 1) -> None: ...


class _Lazy:
    """A generator made on first use: a fully cached run never loads the model."""

    def __init__(self, make: Callable[[], Generator]) -> None:
        self.make = make
        self.generator: Generator | None = None

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]:
        self.generator = self.generator or self.make()
        return self.generator.complete(requests, sampling)


def resolve_benchmark(source: str, limit: int | None = None) -> Benchmark:
    """`builtin`, `idioms`, `concepts:SEGMENTS.jsonl` or a MultiPL-E style JSONL path."""
    if source == IDIOMS:
        benchmark = load_idioms()
    elif source.startswith(CONCEPTS_PREFIX):
        benchmark = load_concepts(source)
    else:
        benchmark = load_benchmark(source)
    if limit is None:
        return benchmark
    return Benchmark(benchmark.name, benchmark.problems[:limit], benchmark.scoring)


def resolve_version(engine: Engine, model: str, version: int | None) -> dict[str, Any]:
    from exforge.llm.registry import get_version

    row = get_version(engine, model, version)
    if row is None:
        wanted = f"{model}:{version}" if version is not None else f"any version of {model}"
        raise EvalError(f"the registry has no {wanted}")
    return row


def _score(
    settings: Settings,
    benchmark: Benchmark,
    completions: list[Completion],
    request: EvalRequest,
    progress: PhaseProgress,
) -> dict[str, Any]:
    progress.start("scoring", len(completions))
    if benchmark.scoring == "exact":
        result = score_exact(benchmark, completions, request.ks)
        progress.advance("scoring", len(completions))
        return result
    with SandboxPool(sandbox_config(settings, request.allow_unisolated)) as pool:
        return score(
            benchmark, completions, pool, request.ks, lambda *_: progress.advance("scoring")
        )


def run_evaluation(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    request: EvalRequest,
    generator: Generator | None = None,
    progress: PhaseProgress | None = None,
) -> dict[str, Any]:
    """Generate (resuming from the cache), score, store; returns the result document."""
    progress = progress or PhaseProgress()
    try:
        benchmark = resolve_benchmark(request.benchmark, request.limit)
    except BenchmarkError as exc:
        raise EvalError(str(exc)) from None
    if benchmark.scoring == "sandbox":
        checked_isolation(request.allow_unisolated)  # before generating, not after
    row = resolve_version(engine, request.model, request.version)
    generator = generator or _Lazy(lambda: InProcessGenerator.for_version(settings, store, row))
    cache = GenerationCache(store, row["name"], row["version"], request.sampling)
    progress.start("generating", len(benchmark.problems) * request.n)
    generated = generate_completions(
        generator,
        cache,
        benchmark.problems,
        request.n,
        request.sampling,
        lambda count: progress.advance("generating", count),
    )
    progress.advance("generating", generated.cached)
    result = _score(settings, benchmark, generated.completions, request, progress)
    result["model"] = {"name": row["name"], "version": row["version"]}
    result["generation"] = {
        "n": request.n,
        "temperature": request.sampling.temperature,
        "max_tokens": request.sampling.max_tokens,
        "top_p": request.sampling.top_p,
        "generated": generated.generated,
        "cached": generated.cached,
    }
    save_result(store, row["name"], str(row["version"]), result)
    record_results(engine, row["name"], row["version"], result)
    return result


def evaluate_for_demo(
    settings: Settings,
    model_name: str,
    version: int | None = None,
    limit: int | None = None,
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """The built-in benchmark, n=1, greedy, 32 new tokens (about 30 s for the tiny model
    on two cores); stores the result and writes the HTML report. The tiny model's
    completions run unisolated where the kernel refuses namespaces (the result's
    isolation says so). Returns pass@1, the status counts, the isolation and the report's
    paths."""
    from exforge.core.db import open_database
    from exforge.core.store import open_store

    store = open_store(settings)
    request = EvalRequest(
        model_name, version, BUILTIN, sampling=DEMO_SAMPLING, limit=limit, allow_unisolated=True
    )
    result = run_evaluation(settings, store, open_database(settings), request)
    page, png = write_report(load_results(store), report_dir or settings.root / "eval-report")
    return {
        "model": result["model"],
        "benchmark": result["benchmark"],
        "problems": result["problems"],
        "pass@1": result["pass_at_k"].get("1"),
        "status_counts": result["status_counts"],
        "isolation": result["isolation"],
        "generation": result["generation"],
        "html": str(page),
        "png": str(png),
    }
