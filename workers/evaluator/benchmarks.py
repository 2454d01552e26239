"""Benchmarks in MultiPL-E's JSONL format, and completions to score against them.

A problem line has MultiPL-E's fields `name`, `language`, `prompt`, `tests` and
`stop_tokens` (others, such as `doctests` or `original`, are ignored), so MultiPL-E's
`humaneval-elixir`/`mbpp-elixir` files load as they are. exforge's built-in benchmark adds
`category`, `reference` (a completion that passes) and `broken` (one that must not).
As in MultiPL-E, the program run for a completion is prompt + completion + "\\n" + tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exforge.elixir.sandbox import Program

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).with_name("data") / "builtin.jsonl"
REQUIRED = ("name", "language", "prompt", "tests", "stop_tokens")
UNCATEGORISED = "uncategorised"


class BenchmarkError(ValueError):
    """A benchmark or completions file that cannot be used; the message says where."""


@dataclass(frozen=True)
class Problem:
    name: str
    language: str
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...]
    category: str = UNCATEGORISED
    reference: str | None = None
    broken: str | None = None
    answers: tuple[str, ...] = ()  # exact-answer problems: every accepted answer

    def program(self, completion: str) -> Program:
        """What the sandbox runs: its `text` is prompt + completion + "\\n" + tests."""
        return Program(self.prompt + completion + "\n", self.tests)


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: tuple[Problem, ...]
    scoring: Literal["sandbox", "exact"] = "sandbox"

    def by_name(self) -> dict[str, Problem]:
        return {problem.name: problem for problem in self.problems}


@dataclass(frozen=True)
class Completion:
    name: str
    completion: str


def _json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchmarkError(f"{path}: {exc.strerror}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise BenchmarkError(f"{path}:{number}: not a JSON object")
        records.append((number, record))
    return records


def parse_problem(record: dict[str, Any]) -> Problem:
    missing = [field for field in REQUIRED if field not in record]
    if missing:
        raise BenchmarkError(f"missing field(s) {', '.join(missing)}")
    return Problem(
        name=str(record["name"]),
        language=str(record["language"]),
        prompt=str(record["prompt"]),
        tests=str(record["tests"]),
        stop_tokens=tuple(record["stop_tokens"]),
        category=str(record.get("category") or UNCATEGORISED),
        reference=record.get("reference"),
        broken=record.get("broken"),
    )


def benchmark_name(source: str | Path) -> str:
    return BUILTIN if str(source) == BUILTIN else Path(source).name.removesuffix(".jsonl")


def load_benchmark(source: str | Path) -> Benchmark:
    """`builtin` or the path of a MultiPL-E style JSONL file."""
    path = BUILTIN_PATH if str(source) == BUILTIN else Path(source)
    problems = []
    for number, record in _json_lines(path):
        try:
            problems.append(parse_problem(record))
        except BenchmarkError as exc:
            raise BenchmarkError(f"{path}:{number}: {exc}") from None
    names = [problem.name for problem in problems]
    if len(set(names)) != len(names):
        raise BenchmarkError(f"{path}: problem names are not unique")
    if not problems:
        raise BenchmarkError(f"{path}: no problems")
    return Benchmark(benchmark_name(source), tuple(problems))


def load_completions(path: Path) -> list[Completion]:
    """Lines of {"name": problem, "completion": text}, several per problem for n > 1."""
    completions = []
    for number, record in _json_lines(path):
        if not isinstance(record.get("name"), str) or not isinstance(record.get("completion"), str):
            raise BenchmarkError(f"{path}:{number}: needs string fields name and completion")
        completions.append(Completion(record["name"], record["completion"]))
    return completions
