"""Sample checks per second: the warm BEAM pool against one `elixir` process per sample.

    python benchmarks/compile_pool.py [--samples 120] [--workers 2] [--json]

The same samples, in the same run: the generated candidates of the sample corpus
(`examples/corpus`), refactor pairs first (full compilation of both sides), then the
others (every `gpt` code block parsed; doctest-made tests run against their file), up
to `--samples`. Two ways, each with
`--workers` samples in flight:

* per-process: `elixir check.exs` per sample (the checks as a plain script), passed
  when it exits 0;
* pooled: the instruct stage's way, `streams.generators.check` on the evaluator's warm
  sandbox pool.

Wall-clock time of each includes starting its VMs. Also checks that both agree on which
samples pass.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.elixir.sandbox import SandboxConfig, SandboxPool
from streams.files import analysed_file
from streams.generators import Candidate, generate
from streams.generators.check import CHECK_PRELUDE, check_all, check_program
from tests.support.records import raw_package

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"


def corpus_candidates(limit: int) -> list[Candidate]:
    package = raw_package("dir:corpus@1", archive_key="k")
    found = []
    for path in sorted(CORPUS.rglob("*.ex*")):
        file = analysed_file(package, str(path.relative_to(CORPUS)), path.read_text())
        if file is not None:
            found += generate(file, file.content or "")
    found.sort(key=lambda c: not c.sample.meta.kind.startswith("refactor"))
    return found[:limit]


def per_process(candidates: list[Candidate], workers: int) -> list[bool]:
    def one(index: int) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "check.exs"
            script.write_text(check_program(candidates[index].checks))
            done = subprocess.run(["elixir", str(script)], capture_output=True, cwd=tmp)
            return done.returncode == 0

    with ThreadPoolExecutor(workers) as executor:
        return list(executor.map(one, range(len(candidates))))


def pooled(candidates: list[Candidate], workers: int) -> list[bool]:
    config = SandboxConfig(workers=workers, timeout_s=20, prelude=CHECK_PRELUDE)
    with SandboxPool(config) as pool:
        return [r is None for r in check_all(pool, [c.checks for c in candidates])]


def timed(run: object, *args: object) -> tuple[list[bool], float]:
    started = time.perf_counter()
    result = run(*args)  # type: ignore[operator]
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    candidates = corpus_candidates(args.samples)
    pool_ok, pool_s = timed(pooled, candidates, args.workers)
    process_ok, process_s = timed(per_process, candidates, args.workers)
    n = len(candidates)
    report = {
        "samples": n,
        "compiled_or_tested": sum(any(c.level != "parse" for c in x.checks) for x in candidates),
        "workers": args.workers,
        "per_process_s": round(process_s, 2),
        "pooled_s": round(pool_s, 2),
        "per_process_per_s": round(n / process_s, 1),
        "pooled_per_s": round(n / pool_s, 1),
        "speedup": round(process_s / pool_s, 1),
        "passed": sum(pool_ok),
        "agree": pool_ok == process_ok,
    }
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
