"""Generation for evaluation with a registered tiny version: stop tokens, batching, and
the per-sample cache that lets an interrupted run resume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from exforge.core.db import engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore, open_store
from tests.support.eval import register_tiny_version
from workers.evaluator.benchmarks import BUILTIN, load_benchmark
from workers.evaluator.generate import (
    GenerationCache,
    InProcessGenerator,
    Request,
    Sampling,
    generate_completions,
    truncate_at_stop,
)


class Counting:
    """The real generator, counting the samples it is asked for."""

    def __init__(self, inner: InProcessGenerator) -> None:
        self.inner = inner
        self.samples = 0

    def complete(self, requests: Sequence[Request], sampling: Sampling) -> list[str]:
        self.samples += len(requests)
        return self.inner.complete(requests, sampling)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, FileStore, Counting]:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("gen") / "data")
    store = open_store(settings)
    row = register_tiny_version(settings, store, engine_for(settings.resolved_database_url), "g")
    return settings, store, Counting(InProcessGenerator.for_version(settings, store, row))


def test_truncate_at_the_first_stop_token_as_multipl_e_does() -> None:
    stops = ("\ndefmodule", "\n# ", "\nend")
    assert truncate_at_stop("x + 1\n# note\nend\ndefmodule", stops) == "x + 1"
    assert truncate_at_stop("x + 1\n  end\n", stops) == "x + 1\n  end\n"
    assert truncate_at_stop("", stops) == ""


def test_stop_tokens_end_each_row_of_a_batch(setup: tuple[Settings, FileStore, Counting]) -> None:
    generator = setup[2].inner
    greedy = Sampling(temperature=0.0, max_tokens=24, batch_size=2)
    prompts = [p.prompt for p in load_benchmark(BUILTIN).problems[:2]]
    free = generator.complete([Request(p, ()) for p in prompts], greedy)
    assert all(free)
    stop = free[0][6:10]  # a piece of what the model writes anyway
    stopped = generator.complete([Request(prompts[0], (stop,)), Request(prompts[1], ())], greedy)
    assert truncate_at_stop(stopped[0], (stop,)) == truncate_at_stop(free[0], (stop,))
    assert len(stopped[0]) < len(free[0])
    assert stopped[1] == free[1]


def test_rerun_generates_nothing_and_interrupted_run_resumes(
    setup: tuple[Settings, FileStore, Counting],
) -> None:
    _, store, generator = setup
    problems = load_benchmark(BUILTIN).problems[:3]
    sampling = Sampling(temperature=0.8, max_tokens=12, top_p=1.0, batch_size=2)
    cache = GenerationCache(store, "g", 1, sampling)
    first = generate_completions(generator, cache, problems, 2, sampling)
    assert (first.generated, first.cached, generator.samples) == (6, 0, 6)
    assert [c.name for c in first.completions] == [p.name for p in problems for _ in range(2)]
    again = generate_completions(generator, cache, problems, 2, sampling)
    assert (again.generated, again.cached, generator.samples) == (0, 6, 6)
    assert again.completions == first.completions

    other = Sampling(
        temperature=0.8, max_tokens=10, top_p=1.0, batch_size=2
    )  # a new cache identity
    cache = GenerationCache(store, "g", 1, other)
    keys = {cache.key(problem, index) for problem in problems for index in range(2)}

    def interrupt(_count: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        generate_completions(generator, cache, problems, 2, other, interrupt)
    assert generator.samples == 8 and len(cache.stored() & keys) == 2
    kept = {key: cache.get(key) for key in cache.stored() & keys}
    resumed = generate_completions(generator, cache, problems, 2, other)
    assert (resumed.generated, resumed.cached, generator.samples) == (4, 2, 12)
    assert all(cache.get(key) == text for key, text in kept.items())
    assert cache.stored() >= keys


def test_cache_keys_separate_versions_and_settings(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    problem = load_benchmark(BUILTIN).problems[0]
    keys = {
        GenerationCache(store, model, version, sampling).key(problem, index)
        for model, version in (("a", 1), ("a", 2), ("b", 1))
        for sampling in (Sampling(), Sampling(temperature=0.8))
        for index in (0, 1)
    }
    assert len(keys) == 12
    # The batch size changes how samples are grouped, not what a sample is.
    same = {GenerationCache(store, "a", 1, Sampling(batch_size=b)).key(problem, 0) for b in (1, 8)}
    assert len(same) == 1
