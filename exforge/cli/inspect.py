"""`exforge inspect PATH`: what the parse stage makes of Elixir files, without a broker.

It runs the stage's own per-file steps (`streams.files.Candidate` through
`streams.files.first_drop`, the record for a kept file), so it answers "why was this
file dropped?" exactly as the stage decides it (near-duplicate removal, which compares
files across packages, is the stage's next step and not shown).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from exforge.cli.console import JsonFlag, console, emit_json, fail, settings, table

if TYPE_CHECKING:
    from streams.files import Candidate

SUFFIXES = (".ex", ".exs")


def elixir_files(path: Path) -> list[tuple[str, Path]]:
    """(path as an archive member, file): the file itself, or every `.ex`/`.exs` under a
    directory, relative to it, in order."""
    if path.is_file():
        return [(path.name, path)]
    return [
        (found.relative_to(path).as_posix(), found)
        for found in sorted(path.rglob("*"))
        if found.suffix in SUFFIXES and found.is_file() and not found.is_symlink()
    ]


def inspection(candidate: Candidate, outcome: str | None, with_text: bool) -> dict[str, Any]:
    """One file's report: its outcome and what the stage computed on the way to it."""
    from exforge.elixir.quality import quality

    report: dict[str, Any] = {
        "path": candidate.path,
        "outcome": outcome or "kept",
        "redactions": [],
        "modules": [],
        "functions": [],
        "quality": None,
    }
    if with_text:
        report["text"] = None
    if outcome in ("vendored", "not_utf8"):
        return report  # dropped before the stage cleans or analyses anything
    source, analysis = candidate.source, candidate.analysis
    report["redactions"] = [{"kind": k, "line": line} for k, line in source.redaction.lines]
    report["modules"] = [m.name for m in analysis.modules]
    report["functions"] = [
        {"module": f.module, "kind": f.kind, "name": f.name, "arity": f.arity}
        for f in analysis.functions
    ]
    record = candidate.record if outcome is None else None
    score = record.quality if record else quality(candidate.metrics, candidate.package.metadata)
    report["quality"] = score.score if score else None
    if with_text:
        report["text"] = source.text
    return report


def inspect_command(
    path: Annotated[Path, typer.Argument(help="An .ex/.exs file or a directory.")],
    text: Annotated[
        bool, typer.Option("--text", help="Also give each file's text as the stage keeps it.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """What the parse stage makes of a file, or of every .ex/.exs under a directory:
    kept or the drop reason, the secrets redacted (kind, line), modules, functions and
    quality. Exit 2 when PATH holds no Elixir file."""
    from schemas.records import RawPackage
    from streams.files import Candidate, FileSteps, first_drop

    if not path.exists():
        raise fail(f"{path} does not exist", 2)
    if path.is_file() and path.suffix not in SUFFIXES:
        raise fail(f"{path} is not an .ex or .exs file", 2)
    files = elixir_files(path)
    if not files:
        raise fail(f"{path} holds no .ex or .exs file", 2)
    steps = FileSteps.from_settings(settings())
    package = RawPackage(
        source_id=f"dir:{path.resolve().name}@inspect",
        kind="dir",
        name=path.resolve().name,
        version="inspect",
        archive_key="unused",
        sha256="0" * 64,
        size_bytes=0,
    )
    reports = []
    for member, file in files:
        candidate = Candidate(package, member, file.read_bytes(), steps)
        reports.append(inspection(candidate, first_drop(candidate), text))
    if as_json:
        emit_json({"files": reports})
        return
    rows = [
        [
            r["path"],
            r["outcome"],
            ", ".join(f"{x['kind']}@{x['line']}" for x in r["redactions"]),
            len(r["modules"]),
            len(r["functions"]),
            r["quality"],
        ]
        for r in reports
    ]
    table("parse stage", ["path", "outcome", "redactions", "modules", "functions", "quality"], rows)
    for report in reports if text else []:
        console.rule(report["path"])
        console.print(report["text"] or "", markup=False, highlight=False)
