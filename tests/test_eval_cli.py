"""`exforge eval score` and `exforge eval report`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.evaluator.benchmarks import BUILTIN, load_benchmark

EXFORGE = str(Path(sys.executable).parent / "exforge")
REPO = Path(__file__).resolve().parent.parent


def exforge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXFORGE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    clean.update(
        EXFORGE_DATA_DIR=str(tmp_path / "data"),
        EXFORGE_CONFIG=str(tmp_path / "absent.toml"),
        EXFORGE_EVAL_WORKERS="2",
    )
    return clean


def write_completions(path: Path, per_problem: list[str]) -> None:
    """For each of the first three built-in problems, one completion per entry of
    `per_problem`: its "reference" or its "broken" solution."""
    problems = load_benchmark(BUILTIN).problems[:3]
    lines = [
        json.dumps({"name": p.name, "completion": getattr(p, kind)})
        for p in problems
        for kind in per_problem
    ]
    path.write_text("\n".join(lines) + "\n")


def test_score_saves_results_and_report_renders_them(env: dict[str, str], tmp_path: Path) -> None:
    mixed, perfect = tmp_path / "mixed.jsonl", tmp_path / "perfect.jsonl"
    write_completions(mixed, ["reference", "broken", "broken"])
    write_completions(perfect, ["reference"])

    run = exforge(
        env,
        "eval",
        "score",
        "--completions",
        str(mixed),
        "--k",
        "1,2,10",
        "--json",
        "--save",
        "tiny:1",
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["pass_at_k"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3)}
    assert result["k_skipped"] == [10]
    assert result["status_counts"]["passed"] == 3 and result["samples"] == 9
    assert [p["statuses"] for p in result["per_problem"]] == [["passed", "failed", "failed"]] * 3
    assert "saved evals/tiny/1/builtin.json" in run.stderr

    table = exforge(env, "eval", "score", "--completions", str(perfect), "--save", "tiny:2")
    assert table.returncode == 0, table.stderr
    assert "pass@1" in table.stdout and "1.0000" in table.stdout
    assert "exforge_001_sum_even_squares" in table.stdout

    out = tmp_path / "report"
    report = exforge(env, "eval", "report", "--out", str(out), "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert [(r["version"], r["pass@1"]) for r in summary["results"]] == [
        ("1", pytest.approx(1 / 3)),
        ("2", 1.0),
    ]
    page = Path(summary["html"]).read_text()
    assert "tiny:1 on builtin" in page and "<table>" in page and 'src="eval-report.png"' in page
    assert Path(summary["png"]).read_bytes().startswith(b"\x89PNG")


def test_score_refuses_unknown_problems_and_bad_k(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"name": "HumanEval_0", "completion": "x"}) + "\n")
    run = exforge(env, "eval", "score", "--completions", str(path))
    assert run.returncode == 2
    assert "1 completion name(s) not in builtin: HumanEval_0" in run.stderr
    bad_k = exforge(env, "eval", "score", "--completions", str(path), "--k", "0")
    assert bad_k.returncode == 2 and "positive integer" in bad_k.stderr


def test_report_without_results_says_how_to_get_some(env: dict[str, str], tmp_path: Path) -> None:
    run = exforge(env, "eval", "report", "--out", str(tmp_path / "r"))
    assert run.returncode == 1
    assert "no stored evaluations" in run.stderr
