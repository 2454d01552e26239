"""CPU of the instruct stage's Python work on the real corpus, without the BEAM.

    python benchmarks/instruct_generation.py [--baseline DIR] [--repeat 2] [--corpus DIR]

Every corpus file is analysed once by each checkout's parse stage into its own
`ParsedFile` records (printed: the process CPU seconds of unpacking and analysing, as
the records may differ); then, in a fresh process per run, each record is read back and
every candidate generated and graded (`streams.generators.generate`, all kinds) and
validated with its Tekken token count (`streams.instruct.validated`), as the stage's
handler does before the checks. Printed per run: process CPU seconds of generation and
of validation, the candidates, and a sha256 over every candidate (sample JSON, check
units, validation verdict and token count). `--baseline DIR` runs another checkout
(with this venv) alternately with this one: the digests must agree, and the CPU figures
come from runs next to each other in time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 16_384


def measure(records: Path) -> dict[str, object]:
    """One run over the records, in the checkout this process imports."""
    from schemas.records import ParsedFile
    from streams.generators import generate
    from streams.generators.tokens import token_counter
    from streams.instruct import validated

    count = token_counter()
    digest = hashlib.sha256()
    generate_s = validate_s = 0.0
    candidates = 0
    for line in records.read_text().splitlines():
        start = time.process_time()
        file = ParsedFile.model_validate_json(line)
        made = generate(file, file.content or "")
        generated = time.process_time()
        verdicts = [validated(c.sample, count, MAX_TOKENS) for c in made]
        validate_s += time.process_time() - generated
        generate_s += generated - start
        for c, verdict in zip(made, verdicts, strict=True):
            checks = [[k.code, k.level, k.like, k.within == file.content] for k in c.checks]
            row = [c.sample.model_dump(mode="json", by_alias=True), checks, *verdict]
            digest.update(json.dumps(row, sort_keys=True).encode())
        candidates += len(made)
    return {
        "generate_s": round(generate_s, 3),
        "validate_s": round(validate_s, 3),
        "candidates": candidates,
        "digest": digest.hexdigest(),
    }


def write_records(corpus: Path, work: Path) -> Path:
    """The corpus' files as this checkout's parse stage records them (inline content)."""
    from benchmarks.corpus import source_files, unpack
    from streams.files import analysed_file
    from tests.support.records import raw_package

    package = raw_package("dir:corpus@1", license="MIT", archive_key="k")
    out = work / "records.jsonl"
    with out.open("w") as handle:
        for project in unpack(corpus, work / "corpus"):
            for path in source_files(project):
                text = path.read_text(errors="replace")
                file = analysed_file(package, str(path.relative_to(work)), text)
                if file is not None:
                    handle.write(file.model_dump_json() + "\n")
    return out


def run(checkout: Path, *args: str) -> dict[str, object]:
    """This script with `args` in a new process importing `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{checkout}: {done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="Another checkout.")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=None, help="Default: shared/corpus.")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    if args.records is not None:  # into this (empty) directory
        from benchmarks.corpus import CORPUS

        args.records.mkdir(parents=True)
        start = time.process_time()
        records = write_records(args.corpus or CORPUS, args.records)
        analyse_s = round(time.process_time() - start, 3)
        print(json.dumps({"records": str(records), "analyse_s": analyse_s}))
        return
    checkouts = [REPO] if args.baseline is None else [args.baseline.resolve(), REPO]
    with tempfile.TemporaryDirectory(prefix="instruct-generation-") as work:
        records = {}
        for index, checkout in enumerate(checkouts):
            corpus = ["--corpus", str(args.corpus)] if args.corpus else []
            made = run(checkout, "--records", str(Path(work) / str(index)), *corpus)
            records[checkout] = str(made["records"])
            print(f"[{checkout}] records: analyse_s {made['analyse_s']}", flush=True)
        digests = set()
        for repeat in range(args.repeat):
            for checkout in checkouts:
                result = run(checkout, "--measure", records[checkout])
                digests.add(result["digest"])
                print(f"[{checkout}] run {repeat}: {json.dumps(result)}", flush=True)
    print("digests agree" if len(digests) == 1 else f"DIGESTS DIFFER: {sorted(digests)}")


if __name__ == "__main__":
    main()
