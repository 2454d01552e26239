"""Elixir's own parser as the judge: what `Code.string_to_quoted/2` makes of files.

`elixir_views` runs `elixir_ast.exs` once for a whole batch of files (one VM, so a
thousand files take seconds) and returns, per file, whether Elixir accepts it (and why
not), its modules, the distinct definitions (`{module, kind, name, arity}` with the
first clause's line and doc) and its types, found where Elixir defines them (see the
script's header). `analysis_view` puts the analysis's result in the same shape.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from exforge.elixir.analysis import FileAnalysis

SCRIPT = Path(__file__).with_name("elixir_ast.exs")

Key = tuple[str, str, str, int]  # module, kind, name, arity


@dataclass
class ElixirView:
    """What Elixir's parser (or the analysis, in the same shape) says about one file."""

    error: str | None = None  # "line N: message" when Elixir refuses the file
    modules: list[tuple[str, int, int | None, str | None]] = field(default_factory=list)
    functions: dict[Key, tuple[int, str | None]] = field(default_factory=dict)
    types: set[tuple[str, str, str, int, int]] = field(default_factory=set)
    unknown_docs: set[Key | str] = field(default_factory=set)  # docs that are not literals

    @property
    def module_names(self) -> list[tuple[str, int]]:
        return sorted((name, line) for name, line, _, _ in self.modules)

    @property
    def definitions(self) -> set[Key]:
        return set(self.functions)


def _doc(field_: str) -> str | None:
    """A doc as the script encodes it; heredoc docs get `\\n` line ends, as in the
    analysis (even in CRLF files)."""
    if field_ in ("-", "?"):
        return None
    return bytes.fromhex(field_[1:]).decode().replace("\r\n", "\n")


def elixir_views(paths: list[Path], timeout_s: float = 600) -> list[ElixirView]:
    """Run Elixir's parser over `paths` in one VM."""
    elixir = shutil.which("elixir")
    assert elixir is not None, "the `elixir` executable is required (`make elixir`)"
    proc = subprocess.run(
        [elixir, str(SCRIPT)],
        input="".join(f"{path}\n" for path in paths),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    views = [ElixirView() for _ in paths]
    done = 0
    for line in proc.stdout.splitlines():
        fields = line.split("\t")
        view = views[int(fields[1])]
        record = fields[0]
        if record == "D":
            done += 1
        elif record == "E":
            view.error = f"line {fields[2]}: {fields[3]}"
        elif record == "M":
            name, start, end, doc = fields[2], int(fields[3]), fields[4], fields[5]
            if doc == "?":
                view.unknown_docs.add(name)
            view.modules.append((name, start, None if end == "?" else int(end), _doc(doc)))
        elif record == "F":
            module, kind, fname, arity, first, fdoc = fields[2:8]
            key = (module, kind, fname, int(arity))
            if key in view.functions and view.functions[key][0] <= int(first):
                continue
            if fdoc == "?":
                view.unknown_docs.add(key)
            view.functions[key] = (int(first), _doc(fdoc))
        elif record == "T":
            module, kind, tname, arity, first = fields[2:7]
            view.types.add((module, kind, tname, int(arity), int(first)))
    assert done == len(paths), f"elixir judged {done} of {len(paths)} files: {proc.stderr}"
    return views


def analysis_view(result: FileAnalysis, unknown: set[Key | str]) -> ElixirView:
    """The analysis's result as an `ElixirView` (docs Elixir cannot give are left out)."""
    view = ElixirView()
    for m in result.modules:
        doc = None if m.name in unknown else m.moduledoc
        view.modules.append((m.name, m.start_line, m.end_line, doc))
    for f in result.functions:
        key = (f.module, f.kind, f.name, f.arity)
        if key in view.functions and view.functions[key][0] <= f.start_line:
            continue
        view.functions[key] = (f.start_line, None if key in unknown else f.doc)
    view.types = {(t.module, t.kind, t.name, t.arity, t.line) for t in result.details.types}
    return view


def changed_definitions(before: ElixirView, after: ElixirView) -> str | None:
    """How two versions of a file differ in modules (by name) and distinct definitions;
    None when they define the same."""
    names = ({m[0] for m in before.modules}, {m[0] for m in after.modules})
    if names[0] == names[1] and before.definitions == after.definitions:
        return None
    lost = sorted(before.definitions - after.definitions)[:5]
    gained = sorted(after.definitions - before.definitions)[:5]
    return f"modules {sorted(names[0] ^ names[1])}, definitions lost {lost} gained {gained}"


def disagreement(expected: ElixirView, got: ElixirView) -> str | None:
    """How the analysis differs from Elixir on modules and distinct definitions; None
    when they agree."""
    problems = []
    if got.module_names != expected.module_names:
        missing = sorted(set(expected.module_names) - set(got.module_names))
        extra = sorted(set(got.module_names) - set(expected.module_names))
        problems.append(f"modules missing {missing} extra {extra}")
    if got.definitions != expected.definitions:
        missing_defs = sorted(expected.definitions - got.definitions)
        extra_defs = sorted(got.definitions - expected.definitions)
        problems.append(f"definitions missing {missing_defs[:5]} extra {extra_defs[:5]}")
    return "; ".join(problems) or None
