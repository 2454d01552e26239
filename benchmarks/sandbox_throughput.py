"""Candidates per second: the pooled sandbox against MultiPL-E's one process per candidate.

    python benchmarks/sandbox_throughput.py [--candidates 200] [--samples-per-problem 1]
        [--workers N] [--json]

The same candidates, in the same run: the built-in benchmark's reference and broken
solutions, then MultiPL-E HumanEval problems completed with `nil` (a failing answer),
each `--samples-per-problem` times in a row as a pass@k run scores n samples of a
problem (here n copies of one program, which every method runs n times: none caches
results, though a pooled VM compiles a problem's tests once), up to `--candidates` in
all. Three ways, each with `--workers` candidates in flight:

* multipl-e: `elixir candidate.exs` per candidate in its own temporary directory under
  a 5 s timeout, passed when it exits 0, as MultiPL-E's Elixir executor does;
* pooled: exforge's sandbox, warm VMs reused while clean (the default);
* pooled, strict: exforge's sandbox with one fresh VM per candidate (`max_uses=1`),
  booted ahead in parallel.

Wall-clock time of each includes starting its VMs. Also checks that the three agree on
which candidates pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.elixir.sandbox import Program, SandboxConfig, SandboxPool
from workers.evaluator.benchmarks import BUILTIN, load_benchmark

HUMANEVAL = (
    Path(__file__).resolve().parent / "data" / "multipl-e" / "humaneval-elixir-transform.jsonl"
)
TIMEOUT_S = 5.0


def candidates(count: int, samples_per_problem: int = 1) -> list[Program]:
    builtin = load_benchmark(BUILTIN).problems
    programs = [p.program(p.reference or "") for p in builtin]
    programs += [p.program(p.broken or "") for p in builtin]
    programs += [p.program("nil\n  end\nend\n") for p in load_benchmark(HUMANEVAL).problems]
    return [program for program in programs for _ in range(samples_per_problem)][:count]


def one_process(program: Program) -> bool:
    """MultiPL-E's method: write the program, run `elixir file.exs`, passed iff exit 0."""
    with tempfile.TemporaryDirectory(prefix="multipl-e-") as directory:
        path = Path(directory) / "candidate.exs"
        path.write_text(program.text)
        try:
            run = subprocess.run(
                ["elixir", str(path)], cwd=directory, capture_output=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return False
        return run.returncode == 0


def per_process(programs: list[Program], workers: int) -> list[bool]:
    with ThreadPoolExecutor(workers) as executor:
        return list(executor.map(one_process, programs))


def pooled(programs: list[Program], workers: int, max_uses: int) -> list[bool]:
    config = SandboxConfig(workers=workers, timeout_s=TIMEOUT_S, max_uses=max_uses)
    with SandboxPool(config) as pool:
        return [outcome.status == "passed" for outcome in pool.map(programs)]


def timed(run: Callable[[], list[bool]]) -> tuple[float, list[bool]]:
    started = time.perf_counter()
    passed = run()
    return time.perf_counter() - started, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument(
        "--samples-per-problem",
        type=int,
        default=1,
        help="Each program this many times in a row, as pass@k's n samples of a problem.",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    programs = candidates(args.candidates, args.samples_per_problem)
    runs = {
        "multipl-e (elixir file.exs per candidate)": lambda: per_process(programs, args.workers),
        "pooled (warm VMs, reused while clean)": lambda: pooled(programs, args.workers, 0),
        "pooled, strict (fresh VM per candidate)": lambda: pooled(programs, args.workers, 1),
    }
    results = {name: timed(run) for name, run in runs.items()}
    baseline_s, baseline_passed = results["multipl-e (elixir file.exs per candidate)"]
    report = {
        "candidates": len(programs),
        "samples_per_problem": args.samples_per_problem,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "methods": {
            name: {
                "seconds": round(seconds, 3),
                "candidates_per_s": round(len(programs) / seconds, 2),
                "speedup": round(baseline_s / seconds, 2),
                "passed": sum(passed),
                "agrees_with_multipl_e": passed == baseline_passed,
            }
            for name, (seconds, passed) in results.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['candidates']} candidates ({args.samples_per_problem} a problem), "
        f"{args.workers} in flight, {report['cpus']} CPUs"
    )
    for name, row in report["methods"].items():
        print(
            f"{name:44} {row['seconds']:7.2f} s {row['candidates_per_s']:7.1f} cand/s "
            f"x{row['speedup']:5.2f}  passed {row['passed']}  agrees {row['agrees_with_multipl_e']}"
        )


if __name__ == "__main__":
    main()
