"""The parse stage on real code, judged by Elixir's own parser.

    python benchmarks/corpus_quality.py [--work DIR] [--json]

Unpacks the ten corpus libraries (`shared/corpus/*.tar.gz`, found beside or above the
repository, or `EXFORGE_CORPUS_DIR`) under `--work` (a temporary directory by default,
removed afterwards), runs every `.ex`/`.exs` file through the stage's per-file steps and
holds each against `Code.string_to_quoted/2` (one Elixir VM for all files):

* redactions per 1,000 files, by kind, and the redacted files Elixir no longer parses
  or whose modules and definitions changed;
* false drops: `syntax_error` for a file Elixir parses, and every `auto_generated` (the
  libraries hold no generated code);
* analysis agreement: the share of the files Elixir parses whose modules and distinct
  `{module, kind, name, arity}` definitions the analysis finds exactly.

Each figure lists the files behind it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.corpus import Judgement, judge, unpack  # noqa: E402


def figures(judgements: list[Judgement]) -> dict[str, Any]:
    files = len(judgements)
    parsed = [j for j in judgements if j.elixir_error is None]
    kinds: Counter[str] = Counter()
    for j in judgements:
        kinds.update(j.redactions)
    disagreeing = [j for j in parsed if j.analysis_disagreement]
    return {
        "files": files,
        "elixir_parses": len(parsed),
        "elixir_rejects": {j.where: j.elixir_error for j in judgements if j.elixir_error},
        "outcomes": dict(Counter(j.outcome for j in judgements).most_common()),
        "redactions_per_1000_files": {
            kind: round(1000 * count / files, 2) for kind, count in sorted(kinds.items())
        },
        "redacted_files": sum(1 for j in judgements if j.redacted is not None),
        "redacted": {j.where: dict(j.redactions) for j in judgements if j.redacted is not None},
        "redaction_breaks_parse": {
            j.where: j.redacted_error for j in judgements if j.redacted_error
        },
        "redaction_changes_definitions": {
            j.where: j.redaction_changed_definitions
            for j in judgements
            if j.redaction_changed_definitions
        },
        "false_syntax_error": sorted(j.where for j in parsed if j.outcome == "syntax_error"),
        "auto_generated": sorted(j.where for j in judgements if j.outcome == "auto_generated"),
        "analysis_agreement": round(1 - len(disagreeing) / max(len(parsed), 1), 4),
        "analysis_disagreements": {j.where: j.analysis_disagreement for j in disagreeing},
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"files: {result['files']} (Elixir parses {result['elixir_parses']})",
        f"outcomes: {result['outcomes']}",
        f"redactions per 1,000 files: {result['redactions_per_1000_files']}"
        f" ({result['redacted_files']} files changed)",
        f"redaction breaks Elixir's parse: {len(result['redaction_breaks_parse'])}",
        f"redaction changes definitions: {len(result['redaction_changes_definitions'])}",
        f"false syntax_error: {len(result['false_syntax_error'])}",
        f"auto_generated (all false on this corpus): {len(result['auto_generated'])}",
        f"analysis agreement: {result['analysis_agreement']:.2%}"
        f" ({len(result['analysis_disagreements'])} files differ)",
    ]
    for title, key in (
        ("Elixir rejects", "elixir_rejects"),
        ("redacted", "redacted"),
        ("redaction breaks the parse", "redaction_breaks_parse"),
        ("redaction changes definitions", "redaction_changes_definitions"),
        ("analysis disagrees", "analysis_disagreements"),
    ):
        for where, detail in result[key].items():
            lines.append(f"  {title}: {where}: {detail}")
    for key in ("false_syntax_error", "auto_generated"):
        lines.extend(f"  {key}: {where}" for where in result[key])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="unpack here (kept); default: a temp dir")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="corpus-quality-"))
    try:
        result = figures(judge(unpack(work / "corpus"), work))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
