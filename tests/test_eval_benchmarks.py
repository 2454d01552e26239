"""Benchmarks: MultiPL-E's files load as published; every built-in reference solution
passes and every deliberately broken variant fails, run in the real sandbox."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from exforge.elixir.sandbox import SandboxConfig, SandboxPool
from workers.evaluator.benchmarks import (
    BUILTIN,
    BenchmarkError,
    Completion,
    load_benchmark,
    load_completions,
)
from workers.evaluator.scoring import score

MULTIPLE = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "multipl-e"
HUMANEVAL = MULTIPLE / "humaneval-elixir-transform.jsonl"
MBPP = MULTIPLE / "mbpp-elixir-reworded.jsonl"
CATEGORIES = {
    "enum_recursion",
    "pattern_matching",
    "structs_protocols",
    "pipes",
    "strings_binaries",
    "otp",
    "error_handling",
}
# Correct completions for a few HumanEval problems, written for this test.
HUMANEVAL_SOLUTIONS = {
    "HumanEval_0_has_close_elements": """
    numbers
    |> Enum.with_index()
    |> Enum.any?(fn {a, i} ->
      numbers |> Enum.with_index() |> Enum.any?(fn {b, j} -> i != j and abs(a - b) < threshold end)
    end)
  end
end
""",
    "HumanEval_100_make_a_pile": "Enum.map(0..(n - 1), &(n + 2 * &1))\n  end\nend\n",
    "HumanEval_102_choose_num": """
    cond do
      x > y -> -1
      rem(y, 2) == 0 -> y
      x == y -> -1
      true -> y - 1
    end
  end
end
""",
    "HumanEval_104_unique_digits": """
    x
    |> Enum.filter(fn n -> n |> Integer.digits() |> Enum.all?(&(rem(&1, 2) == 1)) end)
    |> Enum.sort()
  end
end
""",
}


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(SandboxConfig(workers=2)) as pool:
        yield pool


def test_builtin_benchmark_has_sixty_categorised_problems_with_solutions() -> None:
    benchmark = load_benchmark(BUILTIN)
    assert benchmark.name == "builtin"
    assert len(benchmark.problems) >= 60
    per_category = Counter(problem.category for problem in benchmark.problems)
    assert set(per_category) == CATEGORIES
    assert min(per_category.values()) >= 8
    for problem in benchmark.problems:
        assert problem.language == "elixir"
        assert problem.reference and problem.broken and problem.reference != problem.broken
        assert "ExUnit.start()" in problem.tests and problem.stop_tokens


def test_every_reference_passes_and_every_broken_variant_fails(pool: SandboxPool) -> None:
    benchmark = load_benchmark(BUILTIN)
    completions = [Completion(p.name, p.reference or "") for p in benchmark.problems] + [
        Completion(p.name, p.broken or "") for p in benchmark.problems
    ]
    result = score(benchmark, completions, pool, ks=[1, 2])
    for problem in result["per_problem"]:
        assert problem["statuses"][0] == "passed", (problem["name"], problem["samples"][0])
        assert problem["statuses"][1] != "passed", problem["name"]
    references = score(benchmark, completions[: len(benchmark.problems)], pool, ks=[1])
    assert references["pass_at_k"] == {"1": 1.0}
    assert references["chrf"] == 100.0 and references["warnings"] == 0
    broken = score(benchmark, completions[len(benchmark.problems) :], pool, ks=[1])
    assert broken["pass_at_k"] == {"1": 0.0}
    assert result["pass_at_k"] == {"1": 0.5, "2": 1.0}


def test_multipl_e_files_load_as_published() -> None:
    humaneval = load_benchmark(HUMANEVAL)
    mbpp = load_benchmark(MBPP)
    assert (humaneval.name, len(humaneval.problems)) == ("humaneval-elixir-transform", 161)
    assert (mbpp.name, len(mbpp.problems)) == ("mbpp-elixir-reworded", 397)
    first = json.loads(HUMANEVAL.read_text().splitlines()[0])
    problem = humaneval.problems[0]
    assert (problem.name, problem.prompt, problem.tests) == (
        first["name"],
        first["prompt"],
        first["tests"],
    )
    assert problem.stop_tokens == tuple(first["stop_tokens"])
    assert problem.category == "uncategorised" and problem.reference is None


def test_multipl_e_humaneval_runs_as_multipl_e_does(pool: SandboxPool) -> None:
    benchmark = load_benchmark(HUMANEVAL)
    completions = [Completion(name, text) for name, text in HUMANEVAL_SOLUTIONS.items()]
    completions += [Completion(name, "nil\n  end\nend\n") for name in HUMANEVAL_SOLUTIONS]
    result = score(benchmark, completions, pool, ks=[1, 2])
    assert result["problems"] == len(HUMANEVAL_SOLUTIONS)
    assert result["unattempted"] == 161 - len(HUMANEVAL_SOLUTIONS)
    for problem in result["per_problem"]:
        assert problem["statuses"] == ["passed", "failed"], problem
    assert result["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert result["chrf"] is None  # MultiPL-E has no reference solutions


def test_multipl_e_mbpp_tests_do_not_compile_as_its_readme_says(pool: SandboxPool) -> None:
    # Its tests call apply(HumanEval, fn_name, args) with an unbound variable.
    benchmark = load_benchmark(MBPP)
    problem = benchmark.by_name()["mbpp_100_next_smallest_palindrome"]
    outcome = pool.run(problem.program("\n    n + 1\n  end\nend\n"))
    assert outcome.status == "syntax_error"
    assert "undefined function next_smallest_palindrome/0" in outcome.output


def test_completions_file_and_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "completions.jsonl"
    path.write_text(
        json.dumps({"name": "a", "completion": "x"}) + "\n\n" + json.dumps({"name": "a"}) + "\n"
    )
    with pytest.raises(BenchmarkError, match=r"completions.jsonl:3: needs string fields"):
        load_completions(path)
    path.write_text(json.dumps({"name": "nope", "completion": "x"}) + "\n")
    with pytest.raises(BenchmarkError, match="1 completion name"):
        score(load_benchmark(BUILTIN), load_completions(path), pool=None, ks=[1])  # type: ignore[arg-type]


def test_benchmark_lines_missing_multipl_e_fields_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"name": "x", "language": "elixir", "prompt": ""}) + "\n")
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:1: missing field\(s\) tests, stop_tokens"):
        load_benchmark(path)
