"""The real-code corpus for the pipeline benchmarks: unpacked, and derived into more
packages whose files are distinct.

A derived package is a corpus library with its own identifiers renamed (the names its
modules and definitions introduce get a per-package suffix, everywhere they occur), so
its files are new to exact and near-duplicate detection. A share of the files can
instead be planted as near-duplicates: the file of an earlier package with only some
of its names renamed. Identifiers from outside the package (Elixir's, its
dependencies') and all syntax are left alone, so every derived file parses as its
original does.
"""

from __future__ import annotations

import random
import re
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `../shared/corpus` beside the main checkout; a worktree sits one level deeper.
CORPUS = next(
    (p / "shared" / "corpus" for p in REPO.parents if (p / "shared" / "corpus").is_dir()),
    REPO.parent / "shared" / "corpus",
)
ELIXIR_SUFFIXES = (".ex", ".exs")

DEFINITION = re.compile(
    r"\b(?:def|defp|defmacro|defmacrop|defguard|defguardp|defdelegate)\s+([a-z_][\w]*[?!]?)"
)
MODULE = re.compile(r"\b(?:defmodule|defprotocol)\s+([A-Z][\w.]*)")
WORD = re.compile(r"(?<![\w@:~])([A-Za-z_]\w+)([?!]?)(?![\w:])")
QUALIFIER = re.compile(r"([A-Za-z_]\w*)\.$")
# Names a package may define that Elixir reserves, imports everywhere (Kernel, its
# special forms) or calls back by name: never renamed.
KEYWORDS = "do end fn after else catch rescue when and or not in true false nil"
KERNEL = (
    "abs alias apply binary_part binary_slice binding bit_size byte_size case ceil cond dbg "
    "def defdelegate defexception defguard defguardp defimpl defmacro defmacrop defmodule "
    "defoverridable defp defprotocol defstruct destructure div elem exit floor fn for "
    "get_and_update_in get_in hd if import in inspect is_atom is_binary is_bitstring "
    "is_boolean is_exception is_float is_function is_integer is_list is_map is_map_key "
    "is_nil is_number is_pid is_port is_reference is_struct is_tuple length make_ref "
    "map_size max min node pop_in put_elem put_in quote raise receive rem require "
    "reraise round self send spawn spawn_link spawn_monitor struct super tap then throw "
    "tl to_charlist to_string trunc try tuple_size unless unquote unquote_splicing "
    "update_in use with"
)
CALLBACKS = (
    "init start_link child_spec handle_call handle_cast handle_info handle_continue "
    "terminate code_change format_status message exception blame call fetch "
    "get_and_update pop count member reduce slice into encode decode main run project "
    "application start stop config_change prep_stop"
)
RESERVED = frozenset(f"{KEYWORDS} {KERNEL} {CALLBACKS}".split())


def unpack(corpus: Path, dest: Path) -> list[Path]:
    """Each `*.tar.gz` of the corpus unpacked under `dest`; the project roots (a
    directory with `mix.exs`), sorted."""
    dest.mkdir(parents=True, exist_ok=True)
    for archive in sorted(corpus.glob("*.tar.gz")):
        target = dest / archive.name.removesuffix(".tar.gz")
        if not target.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
    projects = sorted(path.parent for path in dest.glob("*/mix.exs"))
    if not projects:
        raise FileNotFoundError(f"no Mix projects in {corpus}/*.tar.gz (--corpus)")
    return projects


def source_files(project: Path) -> list[Path]:
    return sorted(
        path
        for path in project.rglob("*")
        if path.is_file() and path.suffix in ELIXIR_SUFFIXES and "deps" not in path.parts
    )


def own_names(texts: Iterable[str]) -> tuple[set[str], set[str]]:
    """(definition names, module-name segments) a package introduces."""
    functions: set[str] = set()
    segments: set[str] = set()
    for text in texts:
        functions.update(m.rstrip("?!") for m in DEFINITION.findall(text) if not m.startswith("__"))
        for name in MODULE.findall(text):
            segments.update(part for part in name.split(".") if part)
    return functions - RESERVED, segments


@dataclass(frozen=True)
class Renaming:
    """Every occurrence of a package's own names, suffixed."""

    functions: frozenset[str]
    segments: frozenset[str]
    suffix: str

    def apply(self, text: str) -> str:
        def rename(match: re.Match[str]) -> str:
            word, bang = match.group(1), match.group(2)
            qualifier = QUALIFIER.search(text, max(0, match.start() - 80), match.start())
            remote = qualifier is not None or text[max(0, match.start() - 1) : match.start()] == "."
            if (
                remote
                and word[0].islower()
                and (qualifier is None or qualifier[1] not in self.segments)
            ):
                return match.group(0)  # a function of a module the package does not define
            if word in self.functions:
                return f"{word}_{self.suffix}{bang}"
            if word in self.segments:
                return f"{word}{self.suffix.capitalize()}{bang}"
            return match.group(0)

        return WORD.sub(rename, text)

    def partial(self, rng: random.Random, share: float) -> Renaming:
        """The same renaming applied to only `share` of the names."""
        return Renaming(
            frozenset(n for n in sorted(self.functions) if rng.random() < share),
            frozenset(n for n in sorted(self.segments) if rng.random() < share),
            self.suffix,
        )


def renaming(project: Path, suffix: str) -> Renaming:
    texts = [path.read_text(errors="replace") for path in source_files(project)]
    functions, segments = own_names(texts)
    return Renaming(frozenset(functions), frozenset(segments), suffix)


def write_package(root: Path, name: str, files: dict[str, str], version: str = "1.0.0") -> Path:
    """A Mix project of `files` (relative path → text) under `root/name`."""
    project = root / name
    if project.exists():
        shutil.rmtree(project)
    (project / "lib").mkdir(parents=True)
    (project / "mix.exs").write_text(
        f"defmodule {name.title().replace('_', '')}.MixProject do\n  use Mix.Project\n\n"
        f'  def project, do: [app: :{name}, version: "{version}"]\nend\n'
    )
    for relative, text in files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return project


def derived_copies(projects: list[Path], copies: int, dest: Path) -> list[Path]:
    """`copies` renamed copies of every project (copy 0: the projects themselves)."""
    out = list(projects)
    for copy in range(1, copies):
        for project in projects:
            rename = renaming(project, f"c{copy}")
            # the copy's own mix.exs names it (the original's would give it the same
            # source id as the original, as the app name is an atom, never renamed)
            files = {
                str(path.relative_to(project)): rename.apply(path.read_text(errors="replace"))
                for path in source_files(project)
                if path != project / "mix.exs"
            }
            out.append(write_package(dest, f"{project.name}_c{copy}", files))
    return out
