"""The real-code corpus: ten permissively licensed Elixir libraries as tarballs
(`shared/corpus/*.tar.gz`, with `MANIFEST.tsv`), found beside the repository or above it
(`EXFORGE_CORPUS_DIR` overrides), unpacked into a directory the caller owns. Never copied
into the repository."""

from __future__ import annotations

import csv
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from exforge.elixir.analysis import analyse
from streams.files import Dropped, FileSteps, clean_source, file_outcome
from tests.support.elixir_ast import (
    ElixirView,
    analysis_view,
    changed_definitions,
    disagreement,
    elixir_views,
)
from tests.support.records import raw_package

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = (".ex", ".exs")
# A test records each corpus file it leaves out of a comparison, with the reason, as a
# user property of this name (`record_property`); the run prints them all at its end
# (`conftest.pytest_terminal_summary`, from every xdist worker), so no exclusion is silent.
EXCLUSION = "corpus exclusion"


def corpus_dir() -> Path:
    """Where the corpus tarballs are; an error naming the places looked at otherwise."""
    override = os.environ.get("EXFORGE_CORPUS_DIR")
    candidates = [Path(override)] if override else [p / "shared" / "corpus" for p in REPO.parents]
    for candidate in candidates:
        if (candidate / "MANIFEST.tsv").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no corpus (MANIFEST.tsv) in {looked}; set EXFORGE_CORPUS_DIR")


@dataclass(frozen=True)
class Library:
    name: str
    root: Path  # the unpacked tree
    files: list[Path]  # its .ex/.exs files, sorted


def manifest() -> list[dict[str, str]]:
    with (corpus_dir() / "MANIFEST.tsv").open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def unpack(target: Path, names: list[str] | None = None) -> list[Library]:
    """Unpack the corpus libraries (all, or `names`) under `target`."""
    source = corpus_dir()
    libraries = []
    for entry in manifest():
        name = entry["name"]
        if names is not None and name not in names:
            continue
        root = target / name
        if not root.exists():
            with tarfile.open(source / f"{name}.tar.gz") as tar:
                tar.extractall(target, filter="data")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        libraries.append(Library(name, root, files))
    return libraries


# ------------------------------------------------------------- judging the stage


@dataclass
class Judgement:
    """What the parse stage and Elixir make of one corpus file."""

    library: str
    path: str  # inside the library, as the stage sees an archive member
    elixir_error: str | None  # Elixir's parser refuses the original
    outcome: str  # "kept" or the stage's drop reason
    redactions: Counter[str]
    redacted: str | None  # the redacted text, when redaction changed anything
    redacted_error: str | None = None  # Elixir refuses the redacted text
    redaction_changed_definitions: str | None = None
    analysis_disagreement: str | None = None  # the analysis against Elixir's AST

    @property
    def where(self) -> str:
        return f"{self.library}/{self.path}"


def judge(libraries: list[Library], work: Path) -> list[Judgement]:
    """Every corpus file through the stage's own per-file steps (`file_outcome`, and its
    `clean_source` for the redaction), the analysis held against Elixir's parser."""
    store = FileStore(work / "store")
    steps = FileSteps.from_settings(load_settings(data_dir=work / "data"))
    paths = [path for library in libraries for path in library.files]
    views = elixir_views(paths)
    judgements = []
    for library in libraries:
        package = raw_package(f"dir:{library.name}@corpus", license="Apache-2.0")
        for path in library.files:
            data = path.read_bytes()
            member = path.relative_to(library.root).as_posix()
            outcome = file_outcome(package, member, data, store, steps)
            redaction = clean_source(data.decode("utf-8", errors="replace")).redaction
            judgements.append(
                Judgement(
                    library=library.name,
                    path=member,
                    elixir_error=views[len(judgements)].error,
                    outcome=outcome.reason if isinstance(outcome, Dropped) else "kept",
                    redactions=redaction.counts,
                    redacted=redaction.text if redaction.counts else None,
                )
            )
    for judgement, view, path in zip(judgements, views, paths, strict=True):
        if view.error is None:
            got = analysis_view(analyse(path.read_bytes().decode("utf-8", "replace")), set())
            judgement.analysis_disagreement = disagreement(view, got)
    _judge_redactions(judgements, views, work / "redacted")
    return judgements


def _judge_redactions(judgements: list[Judgement], views: list[ElixirView], work: Path) -> None:
    """Redacted texts through Elixir's parser: they must parse and define the same."""
    work.mkdir(parents=True, exist_ok=True)
    changed = [(j, v) for j, v in zip(judgements, views, strict=True) if j.redacted is not None]
    paths = []
    for index, (judgement, _) in enumerate(changed):
        path = work / f"{index}{Path(judgement.path).suffix}"
        path.write_text(judgement.redacted or "", encoding="utf-8")
        paths.append(path)
    for (judgement, original), redacted in zip(changed, elixir_views(paths), strict=True):
        if original.error is not None:
            continue
        judgement.redacted_error = redacted.error
        if redacted.error is None:
            judgement.redaction_changed_definitions = changed_definitions(original, redacted)
