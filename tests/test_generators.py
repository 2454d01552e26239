"""Generators on the sample corpus and a generated book, checked by real Elixir: the
warm BEAM pool in the instruct step, `elixirc`/`elixir` again in these tests."""

from __future__ import annotations

import base64
import random
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO
from prometheus_client import REGISTRY
from test_sources_books import make_pdf
from tree_sitter import Tree

from exforge.core.store import sha256_hex
from exforge.elixir import tree
from exforge.elixir.analysis import analyse, definitions
from exforge.elixir.features import grading, grading_of, nesting
from exforge.elixir.sandbox import SandboxConfig, SandboxPool
from exforge.elixir.tree import parse, parsed
from exforge.llm.chat import SHIPPED_TEKKEN
from schemas.records import InstructionSample, ParsedFile, RawPackage
from streams.files import analysed_file
from streams.generators import KINDS, STAGES, Candidate, Check, generate
from streams.generators.check import (
    CHECK_PRELUDE,
    STOPS_KEY,
    UnitResults,
    batch_program,
    check_all,
    check_lines,
    check_program,
    even_batches,
    pool_program,
    term_literal,
)
from streams.generators.code import WHOLE_FILE_LINES, fim_split
from streams.generators.common import code_blocks, code_bytes, module_source, specs
from streams.generators.grade import difficulty
from streams.generators.refactor import _rewrite, as_case, module_siblings
from streams.generators.tokens import token_counter
from streams.instruct import Verdicts, instruct
from streams.sources.books import book_files
from tests.support.corpus import unpack
from tests.support.records import raw_package

CORPUS = REPO / "examples" / "corpus"
IN_PLACE = {"completion", "fim", "doc_to_code", "spec_to_code", "otp_pattern", "book_qa"}
REFACTORS = {"refactor_pipes", "refactor_pattern_match"}


def package(source_id: str = "dir:corpus@1", kind: str = "dir") -> RawPackage:
    return raw_package(source_id, kind=kind, license="MIT", archive_key="k")


def corpus_files() -> list[ParsedFile]:
    files = []
    for path in sorted(CORPUS.rglob("*.ex*")):
        file = analysed_file(package(), str(path.relative_to(CORPUS)), path.read_text())
        assert file is not None, path
        files.append(file)
    return files


def book_segments(tmp_path: Path) -> list[ParsedFile]:
    pdf = make_pdf()
    book = package(f"book:{sha256_hex(pdf)}", "book")
    return book_files(book, pdf)


@pytest.fixture(scope="module")
def pool() -> SandboxPool:
    with SandboxPool(SandboxConfig(workers=2, timeout_s=20, prelude=CHECK_PRELUDE)) as warm:
        yield warm


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[ParsedFile]:
    return corpus_files() + book_segments(tmp_path_factory.mktemp("book"))


@pytest.fixture(scope="module")
def candidates(files: list[ParsedFile]) -> list[Candidate]:
    return [c for f in files for c in generate(f, f.content or "")]


@pytest.fixture(scope="module")
def verdicts(candidates: list[Candidate], pool: SandboxPool) -> Verdicts:
    return instruct(candidates, pool, token_counter(), 16_384)


def test_every_kind_produces_checked_samples(verdicts: Verdicts) -> None:
    kept = Counter(s.meta.kind for s in verdicts.kept)
    assert set(kept) == set(KINDS), kept
    for sample in verdicts.kept:
        assert sample.meta.stage == STAGES[sample.meta.kind]
        assert 1 <= sample.meta.difficulty <= 5
        assert sample.sample_id == InstructionSample.content_id(
            sample.conversations, sample.meta.kind
        )
        assert sample.meta.source_refs and sample.meta.license == "MIT"
    # what needs the rest of its project fails alone: refactor pairs using its structs
    # don't compile, doctests of a module that delegates to others don't pass
    reasons = {(s.meta.kind, r) for s, r in verdicts.dropped}
    assert reasons == {
        ("refactor_pipes", "compile_failed"),
        ("refactor_pattern_match", "compile_failed"),
        ("doctest_to_test", "tests_failed"),
    }


def test_generation_is_deterministic(files: list[ParsedFile], candidates: list[Candidate]) -> None:
    again = [c.sample for f in files for c in generate(f, f.content or "")]
    assert again == [c.sample for c in candidates]


def elixir_units(sample: InstructionSample, candidates: dict[str, Candidate]) -> list[Check]:
    return list(candidates[sample.sample_id].checks)


def elixirc(sources: list[Path], out: Path) -> None:
    out.mkdir()
    done = subprocess.run(
        ["elixirc", "--ignore-module-conflict", "-o", str(out), *map(str, sources)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert list(out.glob("*.beam"))


def in_its_project(sample: InstructionSample, where: Path) -> list[Path]:
    """The sample's source file with its referenced lines replaced by the gpt code, and
    the rest of its project's `lib/` (a book's code block stands alone)."""
    ref = sample.meta.source_refs[0]
    (code, *_) = code_blocks(sample.conversations[-1].value)
    where.mkdir()
    if ref.source_id.startswith("book:"):
        (where / "block.ex").write_text(code)
        return [where / "block.ex"]
    lines = (CORPUS / ref.path).read_text().splitlines()
    start, end = ref.start_line or 1, ref.end_line or len(lines)
    (where / "substituted.ex").write_text("\n".join([*lines[: start - 1], code, *lines[end:]]))
    project = CORPUS / ref.path.split("/")[0]
    rest = [p for p in sorted((project / "lib").rglob("*.ex")) if p != CORPUS / ref.path]
    return [where / "substituted.ex", *rest]


def test_a_random_sample_of_gpt_code_compiles_again_with_elixirc(
    verdicts: Verdicts, candidates: list[Candidate], tmp_path: Path
) -> None:
    """With `elixirc`: refactor pairs on both sides, as checked; code that stands for lines
    of a `lib/` file, compiled in its place within its project; a book's Elixir blocks
    alone. The other gpt code (docs, doctest and test modules, `mix.exs`, iex sessions)
    through the parser."""
    by_id = {c.sample.sample_id: c for c in candidates}
    rng = random.Random(5)
    refactors = [s for s in verdicts.kept if s.meta.kind.startswith("refactor")]
    for index, sample in enumerate(rng.sample(refactors, 4)):
        for side, check in enumerate(elixir_units(sample, by_id)):
            assert check.level == "compile"
            source = tmp_path / f"unit_{index}_{side}.ex"
            source.write_text(check.code)
            elixirc([source], tmp_path / f"beam-{index}-{side}")
    in_place = [
        s
        for s in verdicts.kept
        if s.meta.kind in IN_PLACE
        and (s.meta.kind != "book_qa" or "```elixir" in s.conversations[-1].value)
        and (s.meta.kind == "book_qa" or "/lib/" in s.meta.source_refs[0].path)
    ]
    chosen = rng.sample(in_place, 8)
    assert {s.meta.kind for s in chosen} >= {"completion", "doc_to_code"}
    for index, sample in enumerate(chosen):
        sources = in_its_project(sample, tmp_path / f"project-{index}")
        elixirc(sources, tmp_path / f"project-beam-{index}")
    others = [s for s in verdicts.kept if s.meta.kind not in IN_PLACE | REFACTORS]
    codes = [c.code for s in rng.sample(others, 20) for c in elixir_units(s, by_id)]
    listing = tmp_path / "codes.txt"
    listing.write_text("\n".join(base64.b64encode(c.encode()).decode() for c in codes))
    script = (
        f'File.read!("{listing}") |> String.split("\\n") '
        "|> Enum.each(&Code.string_to_quoted!(Base.decode64!(&1)))"
    )
    done = subprocess.run(["elixir", "-e", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_code_and_overlong_samples_are_dropped_with_a_reason(
    candidates: list[Candidate], pool: SandboxPool
) -> None:
    good = next(c for c in candidates if c.sample.meta.kind == "doc_to_code")
    broken = Candidate(good.sample, (Check("def broken(x) do\n  x +\n"),))
    uncompilable = Candidate(
        good.sample, (Check("defmodule A do\n  def f, do: g()\nend", "compile"),)
    )
    verdicts = instruct([broken, uncompilable, good], pool, token_counter(), 16_384)
    assert [s.sample_id for s in verdicts.kept] == [good.sample.sample_id]
    assert [r for _, r in verdicts.dropped] == ["parse_failed", "compile_failed"]
    tiny = instruct([good], pool, token_counter(), 8)
    assert tiny.kept == [] and [r for _, r in tiny.dropped] == ["too_many_tokens"]


def test_unit_results_carry_over_to_later_programs_and_bad_code_stays_rejected(
    candidates: list[Candidate], pool: SandboxPool
) -> None:
    """Units a program ran are not run again by a later one: their results, bad code's
    failures included, come from `UnitResults`, and the verdicts are the same."""
    within = [c for c in candidates if any(ch.within for ch in c.checks)][:3]
    bad_generated = [
        Candidate(c.sample, (Check(c.checks[0].code + "\n  )", "compile"),))
        for c in candidates
        if c.sample.meta.kind == "refactor_pipes"
    ][:2]
    batch = [*within, *bad_generated, within[0]]
    known = UnitResults()
    first = check_all(pool, [c.checks for c in batch], known=known)
    assert first == [None] * len(within) + ["compile_failed"] * 2 + [None]
    program = batch_program([c.checks for c in batch], known)
    assert program.units == [], "every unit's result is known"
    assert check_all(pool, [c.checks for c in batch], known=known) == first
    assert check_all(pool, [c.checks for c in batch]) == first, "the same without the cache"
    small = UnitResults(size=1)
    check_all(pool, [c.checks for c in bad_generated], known=small)
    assert len(batch_program([c.checks for c in bad_generated], small).units) == 1


def test_a_program_holds_each_code_once_compressed_and_checks_it_as_written(
    pool: SandboxPool,
) -> None:
    """The pieces cut from a file, the file and a pipes pair's sides travel once in a
    program, compressed (its literals are compiled byte by byte): the program is smaller
    than the file alone. Their verdicts are those of the code as written, non-ASCII
    text and a broken piece included."""
    functions = "\n\n".join(
        f'  @doc "Größe {n}: ünïcode ✓"\n  def f{n}(x), do: x |> Enum.map(&(&1 + {n}))'
        for n in range(120)
    )
    file = f"defmodule Big do\n{functions}\nend\n"
    pieces = [f"def f{n}(x), do: x |> Enum.map(&(&1 + {n}))" for n in range(0, 120, 10)]
    module = "defmodule ExforgeRefactorCheck do\n  def f(x), do: x |> Enum.map(&(&1 + 1))\nend\n"
    unpiped = module.replace("x |> Enum.map(", "Enum.map(x, ")
    checks = [
        *([Check(piece, within=file)] for piece in pieces),
        [Check(module, "compile"), Check(unpiped, "compile", like=module)],
        [Check("def f(x), do: ü(", within=file + "\n)")],
    ]
    program = batch_program(checks)
    assert len(program.source.encode()) < len(file.encode()), "the file travels compressed"
    tests = (
        'defmodule BigTest do\n  use ExUnit.Case\n  test "f", do: assert Big.f3([1]) == [4]\nend\n'
    )
    alone = [Check(f"{file}\n{tests}", "test")]
    assert len(pool_program(alone).encode()) < len(file.encode()), "so does a tested one's"
    checks.append(alone)
    assert check_all(pool, checks) == [None] * (len(pieces) + 1) + ["parse_failed", None]


def test_a_batch_program_is_the_same_code_whatever_it_checks(
    candidates: list[Candidate], pool: SandboxPool
) -> None:
    """A batch program's own code (what the VM compiles before any check runs) is the
    same for any batch: its checks, candidates and their verdict expressions are data.
    Its verdicts are those of each candidate checked alone."""
    batches = [[c.checks for c in candidates[:32]], [c.checks for c in candidates[-3:]]]
    code = {re.sub(r'"[A-Za-z0-9+/=]*"', '""', batch_program(b).source) for b in batches}
    assert len(code) == 1
    for batch in batches:
        assert check_all(pool, batch) == [check_all(pool, [c], batch=1)[0] for c in batch]


def test_a_check_vm_makes_a_file_of_one_call_of_literals_at_once(pool: SandboxPool) -> None:
    """For the check pool's VMs (`CHECK_PRELUDE`) a batch program is one call of
    `ExforgeCheck.batch` alone, which their Elixir makes at once: no throwaway module
    (the `(file)` frame of a stack) runs a file of one call of literals there, as one
    does a file of more, or that call on a VM without the prelude."""
    program = batch_program([[Check(":ok", "parse")]], preluded=True)
    assert program.source.count("\n") == 1 and program.source.startswith("ExforgeCheck.batch(")
    assert f"{program.nonce} done" in pool.run(program.source).output
    one_call = ':erlang.error("boom")\n'
    assert "(file)" not in pool.run(one_call).output
    assert "(file)" in pool.run('reason = "boom"\n:erlang.error(reason)\n').output
    with SandboxPool(SandboxConfig(workers=1)) as plain:
        assert "(file)" in plain.run(one_call).output


def test_pipes_rewrites_elixir_expands_like_their_function_are_not_compiled_again(
    pool: SandboxPool, tmp_path: Path
) -> None:
    """On real libraries, a pipes pair's rewritten side is checked `like` the function's
    own side: the verdicts are those of compiling both sides, and a rewritten side that
    Elixir expands to its function's code is never compiled (no result of its own). A
    rewritten side that expands otherwise is compiled, and fails when broken."""
    pipes = [
        candidate
        for library in unpack(tmp_path, ["jason", "decimal", "nimble_parsec"])
        for path in library.files
        if (file := analysed_file(package(), str(path), path.read_text())) is not None
        for candidate in generate(file, file.content or "", ["refactor_pipes"])
    ]
    checks = [list(c.checks) for c in pipes]
    assert len(checks) > 50 and all(own.code == rewritten.like for own, rewritten in checks)
    known = UnitResults()
    reasons = check_all(pool, checks, known=known)
    assert reasons == check_all(pool, [[replace(c, like=None) for c in pair] for pair in checks])
    passed = [pair for pair, reason in zip(checks, reasons, strict=True) if reason is None]
    never_compiled = [
        pair for pair in passed if known.get(UnitResults.key(pair[1].code, "compile")) is None
    ]
    assert never_compiled == passed

    own, rewritten = passed[0]
    broken = replace(rewritten, code=rewritten.code.replace("\nend", "\n  def g, do: h()\nend"))
    imports = replace(rewritten, code=rewritten.code.replace("\nend", "\n  import Enum\nend"))
    reasons = check_all(pool, [[own, broken], [own, imports]], known=known)
    assert reasons == ["compile_failed", None]
    assert known.get(UnitResults.key(imports.code, "compile")) is True, "compiled: it imports"


# Module bodies of the kinds refactor checks compile, each with what Elixir says of it.
COMPILE_CASES = {
    "plain": ("def f(x), do: x |> Enum.map(&(&1 + 1)) |> Enum.sum()", True),
    "sibling call": ("def f(x), do: g(x) + 1\n  defp g(x), do: x * 2", True),
    "macro from a required module": ("require Logger\n  def f(x), do: Logger.debug(x)", True),
    "undefined remote call only warns": ("def f(x), do: NoSuchModule.g(x)", True),
    "unused attribute and variable only warn": ("@unused 1\n  def f(x), do: 1", True),
    "behaviour callbacks missing only warn": ("@behaviour GenServer\n  def f(x), do: x", True),
    "after_compile of itself": (
        "@after_compile __MODULE__\n  def __after_compile__(_env, _bytecode), do: :ok",
        True,
    ),
    "undefined variable": ("def f(x), do: x + y", False),
    "undefined local function": ("def f(x), do: g(x)", False),
    "wrong arity local call": ("def f(x), do: g(x, 1)\n  defp g(x), do: x", False),
    "bad macro use": ("def f(x), do: unquote(x)", False),
    "import of no module": ("import NoSuchModule\n  def f(x), do: x", False),
    "module body raises": ('@x raise "boom"\n  def f(x), do: x', False),
    "syntax error": ("def f(x), do: (x +", False),
    "clauses of one function apart": (
        "def f(0), do: 0\n  def g, do: 1\n  def f(x), do: x",
        True,
    ),
    "defining a def twice with defaults": (
        "def f(x \\\\ 1), do: x\n  def f(x \\\\ 2), do: x",
        False,
    ),
    "after_compile that raises": (
        '@after_compile __MODULE__\n  def __after_compile__(_env, _bytecode), do: raise("no")',
        False,
    ),
    "a module nested in it": (
        "defmodule Inner, do: def(g(x), do: x)\n  def f(x), do: Inner.g(x)",
        True,
    ),
    "a struct no module defines": ("def f(x), do: %NoSuchStruct{a: x}", False),
    "a spec of an undefined type": ("@spec f(nope()) :: term()\n  def f(x), do: x", False),
    # What the body runs, and the environment it runs in (a lone module's body is
    # evaluated, not compiled: `Exforge.Sandbox.Bodies.evaluate`).
    "an alias its functions use": ("alias Enum, as: E\n  def f(x), do: E.count(x)", True),
    "an import its functions use": (
        "import Enum, only: [count: 1]\n  def f(x), do: count(x)",
        True,
    ),
    "a macro of a required module in its body": (
        "require Integer\n  @odd Integer.is_odd(3)\n  def f, do: @odd",
        True,
    ),
    "its own struct in its body": (
        "defstruct [:a]\n  @x %__MODULE__{a: 1}\n  def f, do: @x",
        False,
    ),
    "its own function called in its body": (
        "def g, do: 1\n  @x __MODULE__.g()\n  def f, do: @x",
        False,
    ),
    "functions from unquote fragments": (
        "for n <- [:a, :b], do: def(unquote(n)(), do: unquote(n))",
        True,
    ),
    "functions from unquote fragments in a closure": (
        "Enum.each([:a, :b], fn n -> def unquote(n)(), do: unquote(n) end)",
        True,
    ),
    "an unquote fragment that raises": ('def f, do: unquote(raise "no")', False),
    "a body that rescues what it raises": (
        'try do\n    raise "x"\n  rescue\n    _ -> :ok\n  end',
        True,
    ),
    "a closure kept in an attribute": ("@f &(&1 + 1)\n  def f(x), do: @f.(x)", False),
    "a capture kept in an attribute": ("@f &String.upcase/1\n  def f(x), do: @f.(x)", True),
    # A function that quotes what it unquotes (as nimble_parsec's compiler does): only
    # the unquotes outside its quotes run with the body (`ExforgeCheck.unquoted`).
    "a closure that quotes and unquotes its own variables": (
        "def f(x), do: Enum.map(x, fn y -> quote(do: g(unquote(y))) end)",
        True,
    ),
    "a quoted unquote of a variable the function lacks": (
        "def f(x), do: Enum.map(x, fn _ -> quote(do: g(unquote(y))) end)",
        False,
    ),
    "an unquote fragment beside a quoted unquote": (
        "@n 2\n  def f(x), do: Enum.map(x, fn y -> {unquote(@n), quote(do: unquote(y))} end)",
        True,
    ),
    "an unquote fragment that raises beside a quoted unquote": (
        'def f(x), do: Enum.map(x, fn y -> {unquote(raise "no"), quote(do: unquote(y))} end)',
        False,
    ),
    "an unquote fragment with a closure beside a quoted unquote": (
        "def f(x), do: {unquote(Enum.map([1], fn n -> n end)), quote(do: unquote(x))}",
        True,
    ),
    "an unquote in a nested quote's options": (
        "def f(x), do: Enum.map(x, fn y -> quote([line: unquote(y)], do: 1) end)",
        False,
    ),
    # Failures told before compiling (`ExforgeCheck.certain_failure`: a struct of no
    # module, a call of no function, where Elixir expands it for sure), and shapes like
    # them where Elixir expands nothing, or finds the module or function after all.
    "a struct no module defines, in a pattern": ("def f(%NoSuchStruct{} = x), do: x", False),
    "a struct no module defines, in a guard": (
        "def f(x) when x == %NoSuchStruct{}, do: x",
        False,
    ),
    "a struct no module defines, in a default argument": (
        "def f(x \\\\ %NoSuchStruct{}), do: x",
        False,
    ),
    "a struct no module defines, in a branch never taken": (
        "def f(x), do: if(false, do: %NoSuchStruct{}, else: x)",
        False,
    ),
    "a struct no module defines, in a closure's clause": (
        "def f(x), do: Enum.map(x, fn y -> case y do %NoSuchStruct{} -> 1; _ -> 2 end end)",
        False,
    ),
    "a struct no module defines, in an unused private function": (
        "def f, do: 1\n  defp g, do: %NoSuchStruct{}",
        False,
    ),
    "a struct no module defines, given to a macro not required": (
        "def f, do: Logger.debug(%NoSuchStruct{})",
        False,
    ),
    "a struct of a module with no struct": ("def f, do: %Enum{}", False),
    "a struct of its own module, which defines none": ("def f, do: %__MODULE__{}", False),
    "a struct of a module nested in its own, which it lacks": (
        "def f, do: %__MODULE__.Inner{}",
        False,
    ),
    "a struct no module defines, quoted": ("def f, do: quote(do: %NoSuchStruct{})", True),
    "a struct no module defines, unquoted in a quote": (
        "def f, do: quote(do: unquote(%NoSuchStruct{}))",
        False,
    ),
    "a struct no module defines, in a sigil": ('def f, do: ~S"%NoSuchStruct{}"', True),
    "a struct no module defines, given to a macro that drops it": (
        "defmacrop m(_), do: :ok\n  def f, do: m(%NoSuchStruct{})",
        True,
    ),
    "a struct of a module found on the code path": ("def f(x), do: %URI{host: x}", True),
    "a struct of a module nested in it, defined before": (
        "defmodule S, do: defstruct([:a])\n  def f, do: %S{a: 1}",
        True,
    ),
    "a struct of an alias": ("alias URI, as: U\n  def f, do: %U{}", True),
    "a struct of its own module, which defines one": (
        "defstruct [:a]\n  def f, do: %__MODULE__{a: 1}",
        True,
    ),
    "an undefined function in an unused private function": (
        "def f, do: 1\n  defp g, do: h()",
        False,
    ),
    "an undefined function in a capture": ("def f, do: Enum.map([1], &h(&1))", False),
    "a Kernel function of another arity": ("def f(x), do: length(x, 1)", False),
    "a piped call of a function of one argument less": (
        "def f(x), do: x |> g(1)\n  defp g(x), do: x",
        False,
    ),
    "a piped call of its own function": (
        "def f(x), do: x |> g(1)\n  defp g(x, y), do: x + y",
        True,
    ),
    "a call of a function with a default argument": (
        "def f(x), do: g(x)\n  defp g(x, y \\\\ 1), do: x + y",
        True,
    ),
    "Kernel's functions and macros": ("def f(x), do: is_nil(x) and to_string(x)", True),
    "an undefined function, quoted": ("def f, do: quote(do: h())", True),
    "an undefined function given to a macro that drops it": (
        "defmacrop m(_), do: :ok\n  def f, do: m(h())",
        True,
    ),
    "an unquote fragment of a variable no fragment binds": ("def unquote(name)(), do: 1", False),
    "an unquote fragment of a variable a fragment before binds": (
        "def unquote(n = :a)(), do: 1\n  def g, do: unquote(n)",
        True,
    ),
    "an unquote fragment of a Kernel function": ("def f, do: unquote(node)", True),
    "an unquote fragment of a variable no fragment binds, beside a macro": (
        "defmacrop m(x), do: quote(do: unquote(x) + 1)\n  def unquote(name)(), do: m(1)",
        False,
    ),
    "an unquote fragment named as a macro of the unit": (
        "defmacrop name, do: :f\n  def unquote(name)(), do: 1",
        False,
    ),
    "an unquote fragment beside a quoted unquote of its variable": (
        "def unquote(:f)(x), do: quote(do: unquote(x))",
        True,
    ),
}


def test_compile_checks_reject_what_elixir_rejects(pool: SandboxPool) -> None:
    """The `compile` check passes exactly the
    modules that Elixir's own `Code.compile_string` compiles, in a fresh `elixir`."""
    codes = {
        name: f"defmodule ExforgeRefactorCheck do\n  {body}\nend\n"
        for name, (body, _) in COMPILE_CASES.items()
    }
    expected = {name: ok for name, (_, ok) in COMPILE_CASES.items()}
    reasons = check_all(pool, [[Check(code, "compile")] for code in codes.values()])
    assert dict(zip(codes, (r is None for r in reasons), strict=True)) == expected
    script = (
        "System.argv() |> Enum.each(fn code -> "
        "IO.puts(try do Code.compile_string(Base.decode64!(code)) && :ok "
        "rescue _ -> :failed end); "
        ":code.purge(ExforgeRefactorCheck); :code.delete(ExforgeRefactorCheck) end)"
    )
    encoded = [base64.b64encode(c.encode()).decode() for c in codes.values()]
    done = subprocess.run(["elixir", "-e", script, *encoded], capture_output=True, text=True)
    judged = [line == "ok" for line in done.stdout.split()]
    assert dict(zip(codes, judged, strict=True)) == expected, done.stderr


def test_units_failed_before_compiling_fail_to_compile_in_a_fresh_elixir(
    pool: SandboxPool, tmp_path: Path
) -> None:
    """Of every compile unit of the real corpus's refactor pairs, those the check fails
    without compiling (`ExforgeCheck.certain_failure`: most of the units that fail, a
    struct or function their file's aliases, imports or other modules gave them) fail
    to compile in a fresh `elixir` too, each one."""
    units = sorted(
        {
            check.code
            for library in unpack(tmp_path)
            for path in library.files
            if (file := analysed_file(package(), str(path), path.read_text())) is not None
            for candidate in generate(file, file.content or "", sorted(REFACTORS))
            for check in candidate.checks
        }
    )
    program = (
        check_lines([Check(":ok", "parse")])
        + "units = {units}\n"
        + "units |> Tuple.to_list() |> Enum.with_index() |> Enum.each(fn {code, i} ->\n"
        + "  with {:ok, quoted} <- Code.string_to_quoted(code),\n"
        + "       reason when reason != nil <- ExforgeCheck.certain_failure(quoted),\n"
        + '       do: IO.puts("failed #{i}")\nend)\n'
    )
    groups = [units[i : i + 400] for i in range(0, len(units), 400)]
    outcomes = pool.map(program.replace("{units}", term_literal(group)) for group in groups)
    failed = [
        group[int(i)]
        for group, outcome in zip(groups, outcomes, strict=True)
        for i in re.findall(r"^failed (\d+)$", outcome.output, re.MULTILINE)
    ]
    assert len(units) > 4_000 and len(failed) > 1_000, (len(units), len(failed))
    (tmp_path / "failed.term").write_text(term_literal(failed))
    script = (
        f'{{:ok, literal}} = Code.string_to_quoted(File.read!("{tmp_path / "failed.term"}"))\n'
        "{failed, _} = Code.eval_quoted(literal)\n"
        "failed |> Tuple.to_list() |> Enum.each(fn code ->\n"
        "  IO.puts(try do Code.compile_string(code) && :compiled rescue _ -> :failed end)\n"
        "  :code.purge(ExforgeRefactorCheck)\n  :code.delete(ExforgeRefactorCheck)\nend)\n"
    )
    done = subprocess.run(["elixir", "-e", script], capture_output=True, text=True)
    judged = dict(zip(failed, done.stdout.split(), strict=True))
    assert [code for code, verdict in judged.items() if verdict != "failed"] == []


def test_a_lone_module_is_compiled_up_to_code_generation_only(pool: SandboxPool) -> None:
    """A passing `compile` check of one module leaves it unloaded: the Erlang backend
    never ran (an Elixir that does not report the stop would compile and load it). The
    compiler options are as before."""
    module = "defmodule ExforgeRefactorCheck do\n  def f(x), do: x\nend\n"
    program = (
        "options = Code.compiler_options()\n"
        + check_lines([Check(module, "compile")])
        + 'IO.puts("unloaded: #{:code.is_loaded(ExforgeRefactorCheck) == false}")\n'
        + 'IO.puts("options kept: #{Code.compiler_options() == options}")\n'
    )
    output = pool.run(program).output.splitlines()
    assert "unloaded: true" in output and "options kept: true" in output


# A module that makes the module whose body calls `register` have a `@before_compile`
# callback that defines `g/1` with a call that only the body's imports resolve.
REGISTERS_BEFORE_COMPILE = """
defmodule ExforgeRegistersBeforeCompile do
  defmacro register, do: quote(do: @before_compile(ExforgeRegistersBeforeCompile))
  defmacro __before_compile__(_env), do: quote(do: def(g(x), do: count(x)))
end
"""


@pytest.mark.parametrize(
    ("body", "compiles"),
    [
        ("import Enum, only: [count: 1]\n  ExforgeRegistersBeforeCompile.register()", True),
        ("ExforgeRegistersBeforeCompile.register()", False),
        ("import Enum, only: [count: 1]\n  @before_compile ExforgeRegistersBeforeCompile", True),
    ],
)
def test_a_before_compile_callback_sees_the_environment_the_body_ends_in(
    pool: SandboxPool, body: str, compiles: bool
) -> None:
    """A `@before_compile` callback expands in the environment the module's body ended
    in, its imports included, whether the body names it or a macro registers it as the
    body runs (an evaluated body leaves another environment: it is compiled after all),
    as in a fresh `elixir`."""
    requires = "require ExforgeRegistersBeforeCompile"
    code = f"defmodule ExforgeRefactorCheck do\n  {requires}\n  {body}\nend\n"
    program = (
        REGISTERS_BEFORE_COMPILE
        + check_lines([Check(":ok", "parse")])
        + "stops = ExforgeCheck.stops?()\n"
        + f"code = {term_literal([code])} |> elem(0)\n"
        + 'IO.puts("compiles: #{try do ExforgeCheck.compiles(code, "c.ex", stops) == :ok '
        + 'rescue _ -> false end} stops: #{stops}")\n'
    )
    assert f"compiles: {str(compiles).lower()} stops: true" in pool.run(program).output
    fresh = REGISTERS_BEFORE_COMPILE + f"Code.compile_string({term_literal([code])} |> elem(0))"
    done = subprocess.run(["elixir", "-e", fresh], capture_output=True, text=True)
    assert (done.returncode == 0) == compiles, done.stderr


def test_a_lone_module_body_is_evaluated_unless_it_makes_a_closure(pool: SandboxPool) -> None:
    """The front end evaluates a lone module's body (`erl_eval`, in the module's own
    environment) instead of compiling it into a throwaway module, not even the call that
    evaluates it (no `elixir_compiler_N` module runs it), but for a body that makes a
    closure, a loop, a `try` or a `receive` outside its functions, which is compiled as
    Elixir compiles it."""
    frames = "elem(Process.info(self(), :current_stacktrace), 1)"
    # (no closure: the body would be compiled)
    throwaway = f'String.contains?(inspect({frames}), ":elixir_compiler_")'
    route = (
        "Process.put(:exforge_evaluated, "
        f"{{List.keymember?({frames}, :erl_eval, 0), not {throwaway}}})"
    )
    closure = "\n  @f fn x -> x end"
    # a function's own closures that quote and unquote (only the unquotes outside its
    # quotes run with the body), then one of them outside a quote
    quoting = "\n  def g(x), do: Enum.map(x, fn y -> quote(do: h(unquote(y))) end)"
    unquoting = "\n  def g(x), do: {unquote(Enum.map([1], fn n -> n end)), quote(do: unquote(x))}"
    codes = [
        f"defmodule ExforgeRefactorCheck do\n  {route}{extra}\n  def f(x), do: x\nend\n"
        for extra in ("", closure, quoting, unquoting)
    ]
    program = "".join(
        check_lines([Check(code, "compile")])
        + 'IO.puts("evaluated: #{inspect(Process.delete(:exforge_evaluated))}")\n'
        for code in codes
    )
    output = pool.run(program).output.splitlines()
    assert [line for line in output if line.startswith("evaluated:")] == [
        "evaluated: {true, true}",
        "evaluated: {false, false}",
        "evaluated: {true, true}",
        "evaluated: {false, false}",
    ]


def test_a_plain_elixir_script_checks_lone_modules_without_the_sandbox_server() -> None:
    """In a plain `elixir` script (`check_program`), where the sandbox server's
    `Exforge.Sandbox.Bodies` that evaluates module bodies is absent, the front end still
    stops (its bodies compiled) and gives Elixir's verdicts, and compiling `ExforgeCheck`
    there warns of no missing module."""
    codes = {
        "defmodule ExforgeRefactorCheck do\n  @x 1\n  def f(y), do: y + @x\nend\n": True,
        "defmodule ExforgeRefactorCheck do\n  def f(y), do: y + z\nend\n": False,
    }
    for code, passes in codes.items():
        script = check_program([Check(code, "compile")]) + 'IO.puts("stops: #{stops}")\n'
        done = subprocess.run(["elixir", "-e", script], capture_output=True, text=True)
        assert (done.returncode == 0) == passes, done.stderr
        assert "Exforge.Sandbox" not in done.stderr
        assert ("stops: true" in done.stdout) == passes


def test_the_front_end_stop_is_probed_once_per_process(pool: SandboxPool) -> None:
    """The first program that compiles probes whether Elixir reports the stop at Core
    Erlang; later programs with the same `UnitResults` take the result from it."""
    checks = [
        [Check(f"defmodule ExforgeRefactorCheck do\n  def f(x), do: {n}\nend\n", "compile")]
        for n in range(2)
    ]
    known = UnitResults()
    assert batch_program(checks[:1], known).stops is None
    assert check_all(pool, checks[:1], known=known) == [None]
    assert known.get(STOPS_KEY) is True
    assert batch_program(checks[1:], known).stops is True
    assert check_all(pool, checks[1:], known=known) == [None]


def check_pool_events() -> dict[str, float]:
    return {
        event: REGISTRY.get_sample_value("exforge_check_pool_events_total", {"event": event}) or 0.0
        for event in ("batch_rerun", "timeout", "vm_replaced")
    }


def test_a_timed_out_check_batch_is_counted_as_a_rerun_timeouts_and_replaced_vms() -> None:
    """A module whose body loops hangs its batch program: the program times out, its VM
    is replaced and its candidates run again one per program, where the loop times out
    (and takes its VM) once more while the other candidate passes; each of it counts."""
    looping = "defmodule ExforgeLoops do\n  Stream.repeatedly(fn -> :ok end) |> Stream.run()\nend\n"
    fine = "defmodule ExforgeFine do\n  def f(x), do: x\nend\n"
    before = check_pool_events()
    config = SandboxConfig(workers=1, timeout_s=3, prelude=CHECK_PRELUDE)
    with SandboxPool(config) as pool:
        reasons = check_all(pool, [[Check(fine, "compile")], [Check(looping, "compile")]])
    assert reasons == [None, "check_timeout"]
    after = check_pool_events()
    counted = {event: after[event] - before[event] for event in after}
    assert counted == {"batch_rerun": 1, "timeout": 2, "vm_replaced": 2}


def test_a_check_batch_has_the_time_each_of_its_candidates_would_have_alone() -> None:
    """Three candidates whose module bodies take 1.2 s each share one batch program,
    3.6 s in all, past the pool's `timeout_s` of 2 s for one candidate but within the 6 s
    the three would have had alone: the batch runs to its end, with no timeout, rerun or
    replaced VM."""
    slow = [
        f"defmodule ExforgeSlow{n} do\n  Process.sleep(1_200)\n  def f(x), do: x\nend\n"
        for n in range(3)
    ]
    before = check_pool_events()
    config = SandboxConfig(workers=1, timeout_s=2, prelude=CHECK_PRELUDE)
    with SandboxPool(config) as pool:
        reasons = check_all(pool, [[Check(code, "compile")] for code in slow])
    assert reasons == [None, None, None]
    after = check_pool_events()
    assert {event: after[event] - before[event] for event in after} == {
        "batch_rerun": 0,
        "timeout": 0,
        "vm_replaced": 0,
    }


def test_a_check_unit_holds_the_definitions_it_calls_whatever_their_names_end_in(
    pool: SandboxPool,
) -> None:
    source = (
        "defmodule M do\n"
        "  def f(x), do: if(valid?(x), do: fetch!(x), else: x != 1)\n"
        "  defp valid?(x), do: is_integer(x)\n"
        "  defp fetch!(x), do: x\n"
        "  defp valid(x), do: x\n"
        "end\n"
    )
    file = analyse(source)
    siblings = module_siblings(file)["M"]
    unit = siblings.check_unit(file.functions[0].source, 0)
    assert "defp valid?(x)" in unit and "defp fetch!(x)" in unit
    assert "defp valid(x)" not in unit, "`valid?` is not a call of `valid`"
    assert check_all(pool, [[Check(unit, "compile")]]) == [None]


# --------------------------------------------------------------------- transformations


@pytest.mark.parametrize(
    ("items", "most", "workers"),
    [(70, 16, 2), (33, 16, 2), (5, 16, 3), (1, 16, 2), (64, 32, 2), (0, 16, 2)],
)
def test_programs_share_the_candidates_evenly_among_the_vms(
    items: int, most: int, workers: int
) -> None:
    batches = even_batches(list(range(items)), most, workers)
    assert [i for batch in batches for i in batch] == list(range(items))
    sizes = [len(batch) for batch in batches]
    assert all(0 < size <= most for size in sizes)
    assert max(sizes, default=0) - min(sizes, default=0) <= 1
    # as few programs as `most` allows, a round of them for each VM
    assert len(batches) == min(items, -(-items // (most * workers)) * workers)


def test_pipes_both_ways() -> None:
    nested = 'def f(x), do: Enum.join(Enum.map(String.split(x, ","), &String.trim/1), "-")'
    piped = _rewrite(nested, "pipe")
    assert piped == (
        'def f(x), do: x |> String.split(",") |> Enum.map(&String.trim/1) |> Enum.join("-")'
    )
    assert _rewrite(piped, "unpipe") == nested
    assert _rewrite("def g(x), do: f(x)", "pipe") is None, "one call is no chain"
    spliced = "def g(a), do: quote(do: f(unquote_splicing(h(a))))"
    assert _rewrite(spliced, "pipe") is None, "Elixir pipes into no unquote_splicing"


def test_pipes_rewrite_the_outermost_chains_only() -> None:
    # a call that is no chain may hold one; a pipe inside a stage stays as it is
    assert _rewrite("def f(x), do: g(x, h(k(x)))", "pipe") == "def f(x), do: g(x, x |> k() |> h())"
    assert _rewrite("def f(x), do: x |> g(y |> h())", "unpipe") == "def f(x), do: g(x, y |> h())"
    nested = "def f(x) do\n  a(b(x))\n  c(d(e(x)))\nend"
    chains = "def f(x) do\n  x |> b() |> a()\n  x |> e() |> d() |> c()\nend"
    assert _rewrite(nested, "pipe") == chains


def test_code_blocks_are_what_the_fence_regex_finds() -> None:
    fence = re.compile(r"```(?:elixir|iex)?\n(.*?)\n```", re.DOTALL)
    pieces = ["`", "```", "```elixir\n", "```iex", "\n```", "\n", "elixir", "x", " "]
    rng = random.Random(7)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert code_blocks(text) == fence.findall(text), text


def test_specs_are_attributes_not_text_in_docs_strings_or_comments() -> None:
    text = (
        'defmodule M do\n  @doc """\n  @spec f(a) :: doc\n  """\n  # @spec f(b) :: comment\n'
        '  @spec f(integer()) :: integer()\n  def f(x), do: "@spec f(c) :: string"\nend\n'
    )
    assert specs(text) == {(6, "f", 1): "@spec f(integer()) :: integer()"}


def test_a_comment_between_arguments_is_no_argument() -> None:
    nested = 'def f(x), do: Enum.join(Enum.map(x, & &1), # sep\n  "-")'
    assert _rewrite(nested, "pipe") == 'def f(x), do: x |> Enum.map(& &1) |> Enum.join("-")'


def test_multi_clause_as_case() -> None:
    source = (
        "def area({:square, s}), do: s * s\n\ndef area({:rect, w, h}) when w > 0 do\n  w * h\nend"
    )
    file = analyse(f"defmodule Shapes do\n{source}\nend\n")
    (function,) = file.functions
    assert as_case(function) == (
        "def area(arg1) do\n  case arg1 do\n"
        "    {:square, s} ->\n      s * s\n\n"
        "    {:rect, w, h} when w > 0 ->\n      w * h\n  end\nend"
    )


def test_fim_split_is_whole_lines_that_join_back() -> None:
    (file,) = [f for f in corpus_files() if f.path.endswith("slug.ex")]
    text = file.content or ""
    for function in file.functions:
        prefix, suffix, middle = fim_split(text, function)
        assert prefix + middle + suffix == text
        assert middle.lstrip().startswith(("def", "defp", "defmacro"))


def test_book_qa_follows_the_chapter_dependency_graph(tmp_path: Path) -> None:
    segments = book_segments(tmp_path)
    samples = [c.sample for f in segments for c in generate(f, f.content or "")]
    assert samples and {s.meta.stage for s in samples} == {3}
    by_position = sorted(samples, key=lambda s: s.meta.position or 0)
    chapters = [int(s.meta.source_refs[0].path[8:10]) for s in by_position]
    assert chapters == sorted(chapters)
    segment_of = {f.sha256: f.book for f in segments}
    for sample in by_position:
        book = segment_of[sample.meta.source_refs[0].sha256]
        assert book is not None
        earlier = {
            int(s.meta.source_refs[0].path[8:10]) for s in by_position[: by_position.index(sample)]
        }
        assert set(book.depends_on) <= earlier | {book.chapter}


# --------------------------------------------------------------------------- difficulty


def test_difficulty_is_deterministic_and_grows_with_features() -> None:
    simple = "def add(a, b), do: a + b"
    branching = (
        "def classify(x) do\n  case x do\n    0 -> :zero\n    n when n > 0 and n < 10 -> :small\n"
        "    n when n >= 10 or n < -10 -> :big\n    _ -> :negative\n  end\nend"
    )
    server = (
        "defmodule Counter do\n  use GenServer\n  def init(n), do: {:ok, n}\n"
        "  def handle_call(:get, _from, n), do: {:reply, n, n}\nend"
    )
    macro = (
        "defmodule M do\n  defmacro twice(x) do\n    quote do\n      unquote(x) * 2\n"
        "    end\n  end\nend"
    )
    levels = [difficulty(code, 0) for code in (simple, branching, server, macro)]
    assert levels == [difficulty(code, 0) for code in (simple, branching, server, macro)]
    assert levels[0] == 1
    assert levels[0] < levels[1] and levels[0] < levels[2] < levels[3]
    assert difficulty(simple, 4) == 2, "concepts count"
    assert difficulty(simple, 0, floor=3) == 3, "a book's own level is a floor"


def test_a_grade_reads_what_the_whole_analysis_would_give(tmp_path: Path) -> None:
    """`difficulty` grades code from the few features a score reads (`grading`), not a
    whole analysis: on every file of the real corpus, every definition and module of it
    and every sample's code, they are those of the whole analysis (`grading_of`)."""
    codes: set[str] = set()
    for library in unpack(tmp_path):
        for path in library.files:
            file = analysed_file(package(), str(path), path.read_text())
            if file is None:
                continue
            text = file.content or ""
            codes.add(text)
            codes.update(f.source for f in file.functions)
            codes.update(module_source(text, m.start_line, m.end_line) for m in file.modules)
            for c in generate(file, text):
                codes.update(
                    block
                    for turn in c.sample.conversations
                    if turn.from_ == "gpt"
                    for block in code_blocks(turn.value)
                )
    assert len(codes) > 5_000
    seen: Counter[str] = Counter()
    for code in sorted(codes):
        data = code.encode()
        root = parse(data)
        whole = analyse(code, data, root).details
        assert whole.metrics.nesting is not None
        expected = grading_of(whole, whole.metrics.nesting)
        assert grading(code, data, root, definitions(data, root)) == expected, code
        seen.update(name for name in ("otp", "macros") if getattr(expected, name))
        seen.update(["complex"] if expected.complexity > 1 else [])
        seen.update(["long"] if expected.loc > 40 else [])
    assert min(seen[name] for name in ("otp", "macros", "complex", "long")) > 100, seen


def test_a_whole_file_sample_grades_as_its_code_analysed_afresh(
    files: list[ParsedFile], candidates: list[Candidate]
) -> None:
    """A sample whose code is the whole file keeps the parse stage's analysis of it; its
    difficulty is the one a fresh analysis of its code gives."""
    by_sha = {f.sha256: f for f in files}
    whole = [
        c.sample
        for c in candidates
        if c.sample.meta.kind == "completion"
        and code_blocks(c.sample.conversations[-1].value)[0] + "\n"
        == by_sha[c.sample.meta.source_refs[0].sha256].content
    ]
    assert len(whole) >= 5
    for sample in whole:
        (code,) = code_blocks(sample.conversations[-1].value)
        assert sample.meta.difficulty == difficulty(code, len(sample.meta.concepts))


def test_parsed_shares_one_tree_per_text() -> None:
    code = b"defmodule M do\n  def f(x), do: x |> g()\nend\n"
    first = parsed(code)
    assert str(first) == str(parse(code))
    assert parsed(bytes(code)) is first
    assert str(parsed(code + b"# more\n")) != str(first)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Counter[bytes]:
    """How many times each text is parsed from now on (no tree remembered before)."""
    seen: Counter[bytes] = Counter()
    parser = tree._parser()

    class Counting:
        def parse(self, data: bytes) -> Tree:
            seen[data] += 1
            return parser.parse(data)

    monkeypatch.setattr(tree, "_parser", Counting)
    parsed.cache_clear()
    specs.cache_clear()
    difficulty.cache_clear()
    return seen


def test_generation_parses_a_file_and_each_function_once(
    files: list[ParsedFile], parses: Counter[bytes]
) -> None:
    """A file's text is parsed once for its `@spec`s, however many generators read them,
    and not at all without them (its whole-file grade takes the nesting the parse stage
    measured); each function's source is parsed once, for its grade and its refactorings
    alike (as `code_bytes` spells it, never without its final newline)."""
    code_files = [f for f in files if f.kind == "elixir_file" and f.functions]
    for file in code_files:
        generate(file, file.content or "")
    texts = [(f.content or "").encode() for f in code_files]
    assert [parses[t] for t in texts] == [int(b"@spec" in t) for t in texts]
    assert 0 in [parses[t] for t in texts]
    functions = [f for file in code_files for f in file.functions]
    sources = {code_bytes(f.source)[1] for f in functions}
    assert sum(parses[s] for s in sources) > len(code_files)
    assert max(parses[s] for s in sources) == 1
    assert not [f.source for f in functions if parses[f.source.encode()]]


def test_a_long_file_without_specs_is_not_parsed_again(parses: Counter[bytes]) -> None:
    """Its completion samples are its modules (no whole-file grade) and it has no `@spec`
    to read: the parse stage's analysis is all generation needs of the whole text."""
    text = "".join(
        f"defmodule {name} do\n"
        + "".join(f"  def {name.lower()}{i}(x) do\n    x + {i}\n  end\n" for i in range(60))
        + "end\n"
        for name in ("A", "B")
    )
    file = analysed_file(package(), "lib/long.ex", text)
    assert file is not None and file.lines > WHOLE_FILE_LINES
    parses.clear()  # the parse stage's own
    assert "completion" in {c.sample.meta.kind for c in generate(file, text)}
    assert parses[text.encode()] == 0
    assert parses[b"def a0(x) do\n  x + 0\nend\n"] == 1, "its functions are parsed"


def test_nesting_counts_nested_do_blocks_and_anonymous_functions() -> None:
    def depth(code: str) -> int:
        return nesting(parse(code.encode()))

    assert depth("x = 1") == 0
    assert depth("def f(x), do: x") == 0
    assert depth("def f(x) do\n  x\nend") == 1
    assert (
        depth("def f(xs) do\n  Enum.map(xs, fn x ->\n    if x do\n      x\n    end\n  end)\nend")
        == 3
    )
    # siblings do not nest: two blocks one after the other are one level each
    assert depth("if a do\n  1\nend\nif b do\n  2\nend") == 1
    assert (
        depth("defmodule M do\n  def a do\n    fn -> fn -> 1 end end\n  end\n  def b, do: 2\nend")
        == 4
    )


def test_a_record_without_nesting_grades_as_one_with_it(files: list[ParsedFile]) -> None:
    """The parse stage records each file's nesting; a record without it (another
    producer's, or one from before) is graded from its parsed text, alike."""
    code_files = [f for f in files if f.kind == "elixir_file"]
    assert all(f.analysis.metrics.nesting is not None for f in code_files)
    difficulty.cache_clear()
    for file in code_files:
        metrics = file.analysis.metrics.model_copy(update={"nesting": None})
        unmeasured = file.model_copy(
            update={"analysis": file.analysis.model_copy(update={"metrics": metrics})}
        )
        text = file.content or ""
        assert [c.sample for c in generate(unmeasured, text)] == [
            c.sample for c in generate(file, text)
        ]


def test_token_counts_read_a_model_directorys_tekken(tmp_path: Path) -> None:
    (tmp_path / "tekken.json").symlink_to(SHIPPED_TEKKEN)
    turns = [{"from": "human", "value": "Sum a list."}, {"from": "gpt", "value": "Enum.sum(xs)"}]
    assert token_counter(tmp_path)(turns) == token_counter()(turns) > 5
