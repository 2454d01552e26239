"""The instruct stage's checks of the whole real corpus on the warm check pool: BEAM CPU
and a digest of every verdict, to compare checkouts.

    python benchmarks/check_corpus.py [--checkout DIR] [--workers 2] [--limit N] [--json]

The candidates: every generator's, of every `.ex`/`.exs` file of `../shared/corpus/`
(`benchmarks/corpus.py`), checked as the instruct stage checks them (`check_all` in
groups that fill a program per VM, one `UnitResults` for the run), with `--checkout`'s
`streams.generators.check` and sandbox (this file's imports come from there). Printed:
candidates, units run by level (compile, parse), the verdicts' sha256 (reasons in
candidate order: two checkouts that judge alike print the same), BEAM CPU seconds of the
pool's VMs from their first check on (boot and prelude excluded) and wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def beam_cpu() -> float:
    """CPU seconds of this process's BEAM descendants now."""
    from benchmarks.pipeline_throughput import proc_status, proc_tree

    total = 0.0
    for pid in proc_tree(os.getpid()):
        status = proc_status(pid)
        if status is not None and status[0].startswith("beam"):
            total += status[2]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="exforge to check with.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="First N candidates (0: all).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(args.checkout.resolve()))

    from benchmarks.corpus import CORPUS, source_files, unpack
    from exforge.elixir.sandbox import SandboxConfig, SandboxPool
    from streams.files import analysed_file
    from streams.generators import generate
    from streams.generators.check import (
        CHECK_PRELUDE,
        PROGRAM_CANDIDATES,
        UnitResults,
        check_all,
    )
    from streams.generators.common import Check
    from tests.support.records import raw_package

    candidates = []
    with tempfile.TemporaryDirectory() as tmp:
        for project in unpack(CORPUS, Path(tmp)):
            package = raw_package(f"dir:{project.name}@1", archive_key="k")
            for path in source_files(project):
                text = path.read_text(errors="replace")
                file = analysed_file(package, str(path.relative_to(project)), text)
                if file is not None:
                    candidates += [c.checks for c in generate(file, file.content or "")]
    if args.limit:
        candidates = candidates[: args.limit]
    config = SandboxConfig(
        workers=args.workers, timeout_s=30, allow_unisolated=True, prelude=CHECK_PRELUDE
    )
    known = UnitResults(size=1 << 20)
    group = PROGRAM_CANDIDATES * args.workers
    with SandboxPool(config) as pool:
        check_all(pool, [[Check(":warm", "parse")] for _ in range(args.workers)])
        cpu0, wall0 = beam_cpu(), time.perf_counter()
        reasons: list[str | None] = []
        for start in range(0, len(candidates), group):
            reasons += check_all(pool, candidates[start : start + group], known=known)
        cpu, wall = beam_cpu() - cpu0, time.perf_counter() - wall0
        replaced = pool.replaced
    units: dict[str, int] = {}
    for check in {(c.code, c.level) for checks in candidates for c in checks}:
        units[check[1]] = units.get(check[1], 0) + 1
    report = {
        "checkout": str(args.checkout.resolve()),
        "candidates": len(candidates),
        "distinct_checks": units,
        "passed": reasons.count(None),
        "reasons": {r: reasons.count(r) for r in sorted(set(reasons) - {None})},
        "digest": hashlib.sha256(json.dumps(reasons).encode()).hexdigest()[:16],
        "beam_cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "vms_replaced": replaced,
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
