"""Elixir checks the code of every candidate's `gpt` turns before it is kept.

The checks of one candidate are `Code.string_to_quoted!` (`parse`),
`ExforgeCheck.compiles` (`compile`; `CHECK_PRELUDE`) or `Code.compile_string` (`test`:
code with ExUnit tests that must pass) calls; the code travels base64-encoded, so no
quoting can break out. A `compile` check of one module stops Elixir's compiler where it
hands the module to the Erlang backend: every error Elixir reports for code is raised by
then, and the backend's code generation, most of a small module's compile time, cannot
fail on what Elixir accepted. Whether this Elixir reports that stop as expected is
probed by the first program of a process that compiles, and remembered (`STOPS_KEY`);
the front end skips Elixir's "redefining module" check (`ignore_module_conflict`: a
warning, paid for with a code path search per module). The instruct stage runs them on
the evaluator's pool of warm, sandboxed BEAM VMs (`exforge.elixir.sandbox`), which
compile `ExforgeCheck` once as their prelude, at most `batch` candidates per program, in
rounds of one program per VM, shared evenly (`even_batches`). A program runs each
distinct check once (`unit`), its code held once in the program, compressed
(`term_literal`), however many candidates hold it, and remembers its result, which it
also reports, so that later programs of the same process take it from `UnitResults`
instead of running the unit again; each candidate's verdict line, tagged with a
per-program nonce, says whether all of its checks passed, in order, stopping at the
first that fails (so a refactor pair whose original side does not compile is not
compiled a second time). A `compile` check `like` another (a pipes pair's rewritten
side) passes without compiling when that one passed and Elixir expands both to the same
code (`ExforgeCheck.same_expansion`); otherwise it is compiled. A parse check of code
cut from a file (`Check.within`: whole clauses or lines, maybe de-indented) passes when
the whole file parses: a complete piece of a file Elixir accepts is accepted alone (the
corpus tests hold every generator to it); the piece is parsed alone only when the file
is not. The program ends with a `done` line; a batch that did not reach it (a candidate
halted or hung its VM) is run again one candidate per program, so one bad candidate
never decides another's fate. A candidate with `test` checks runs alone: its own tests
decide whether the program `passed`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from exforge.elixir.sandbox import Outcome, SandboxPool
from streams.generators.common import Check

FAILED_CHECK = Outcome("syntax_error")
PROGRAM_CANDIDATES = 32  # candidates that share one program
MARKER_TEST = """
defmodule ExforgeChecked do
  use ExUnit.Case, async: true
  test "checked", do: :ok
end
"""


# `ExforgeCheck.compiles(source, file, stops)`: raises unless Elixir compiles `source`.
# Code that is one module whose body leaves nothing to run after its code is generated
# (no `use`, `@after_compile`, `@after_verify`, `@on_load`, `@compile`, `Module` calls) is
# compiled with the Erlang compiler told to stop at Core Erlang (ERL_COMPILER_OPTIONS,
# which Elixir reads for a module's final compile only): Elixir then reports that
# module's missing .beam, which means it accepted the module. Anything else, or an
# Elixir that does not report the stop so (`stops`: `FRONT_END_PROBE`, or its result once
# known), gets the full compile. That front end runs with `ignore_module_conflict`, which
# only skips Elixir's "redefining module" warning and the code path search behind it
# (`code:ensure_loaded` of the module, a miss for a module no file defines): a module
# never loaded by the front end is neither redefined nor looked up again, and any module
# its body uses is loaded on demand all the same. A module name is expanded as at the top
# level of a file (no module, no aliases).
# `ExforgeCheck.same_expansion(a, b)`: whether two modules are the same code once Elixir
# expands their pipes as `Kernel.|>` does (`Macro.pipe`), metadata aside; never when one
# imports (a local `|>` could replace Kernel's) or cannot be expanded.
# The check pool's VMs compile this module once, as their prelude (`SandboxConfig`); a
# program on another VM (or an `elixir` script) compiles it first: compiling it took a
# program ~6 ms, more than a small module's check.
CHECK_PRELUDE = """
defmodule ExforgeCheck do
  @moduledoc false
  @stopped "We expected the compiler to return a .beam binary"
  @late [:after_compile, :after_verify, :on_load, :compile]

  def compiles(source, file, stops) do
    quoted = Code.string_to_quoted!(source, file: file)
    module = if stops, do: lone_module(quoted)

    if module == nil or front_end(quoted, module, file) != :accepted do
      Code.compile_quoted(quoted, file)
    end

    :ok
  end

  def stops? do
    probe = Code.string_to_quoted!("defmodule ExforgeFrontEndProbe do\\n  def f(x), do: x\\nend")
    front_end(probe, ExforgeFrontEndProbe, "probe.ex") == :accepted
  rescue
    _ -> false
  end

  def same_expansion(a, b) do
    expanded(a) == expanded(b)
  rescue
    _ -> false
  catch
    _, _ -> false
  end

  defp expanded(code) do
    code
    |> Code.string_to_quoted!()
    |> Macro.prewalk(fn
      {:import, _, _} -> throw(:imports)
      {:|>, _, [left, right]} -> Macro.pipe(left, right, 0)
      other -> other
    end)
    |> Macro.prewalk(fn
      {form, _meta, args} -> {form, [], args}
      other -> other
    end)
  end

  defp runs_late?(body) do
    {_, found} =
      Macro.prewalk(body, false, fn
        {:use, _, _} = node, _ -> {node, true}
        {:@, _, [{name, _, _}]} = node, acc -> {node, acc or name in @late}
        {:., _, [{:__aliases__, _, [:Module]}, _]} = node, _ -> {node, true}
        node, acc -> {node, acc}
      end)

    found
  end

  defp lone_module({:defmodule, _, [name, [do: body]]}) do
    if runs_late?(body), do: nil, else: Macro.expand(name, %{__ENV__ | module: nil, function: nil})
  end

  defp lone_module(_), do: nil

  defp front_end(quoted, module, file) do
    System.put_env("ERL_COMPILER_OPTIONS", "[to_core]")
    conflicts = Code.get_compiler_option(:ignore_module_conflict)
    Code.put_compiler_option(:ignore_module_conflict, true)

    try do
      Code.compile_quoted(quoted, file)
      :accepted
    rescue
      error in CompileError ->
        message = Exception.message(error)

        cond do
          message =~ "could not compile module #{inspect(module)}. #{@stopped}" -> :accepted
          message =~ @stopped -> :elsewhere
          true -> reraise error, __STACKTRACE__
        end
    after
      System.delete_env("ERL_COMPILER_OPTIONS")
      Code.put_compiler_option(:ignore_module_conflict, conflicts)
    end
  end
end
"""


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def term_literal(texts: Sequence[str]) -> str:
    """Elixir for the tuple of `texts`, from one base64 literal of them as Erlang's
    compressed external term format (a list of binaries), which `binary_to_term`
    inflates natively. Why not a literal per text: a program is compiled by the Erlang
    compiler, which handles a binary literal byte by byte through every pass (~16 ms of
    the ~24 ms a 32-candidate program took to compile, most of them its files' text);
    compressed, a file and the pieces cut from it take little more than the file."""
    items = [t.encode() for t in texts]
    term = b"l" + len(items).to_bytes(4, "big") if items else b""
    term += b"".join(b"m" + len(i).to_bytes(4, "big") + i for i in items) + b"j"
    blob = b"\x83P" + len(term).to_bytes(4, "big") + zlib.compress(term)
    return f'List.to_tuple(:erlang.binary_to_term(Base.decode64!("{encoded(blob)}")))'


def check_line(index: int, check: Check, source: str) -> str:
    """The Elixir call that checks `check`, whose code is the expression `source`."""
    file = f'"check-{index}.ex"'
    if check.level == "compile":
        return f"ExforgeCheck.compiles({source}, {file}, stops)"
    if check.level == "test":
        return f"Code.compile_string({source}, {file})"
    return f"Code.string_to_quoted!({source}, file: {file})"


def tested(checks: Sequence[Check]) -> bool:
    return any(c.level == "test" for c in checks)


# Whether this Elixir reports a lone module stopped at Core Erlang as `compiles` reads it.
FRONT_END_PROBE = "ExforgeCheck.stops?()"
LOAD_PRELUDE = (
    "unless :erlang.module_loaded(ExforgeCheck),\n"
    f'  do: Code.compile_string(elem({term_literal([CHECK_PRELUDE])}, 0), "exforge_check.ex")\n'
)


def preamble(needed: bool, stops: str = FRONT_END_PROBE) -> str:
    """What a program's check lines need first, if `needed` (they compile, or compare
    expansions): `ExforgeCheck`, and `stops`, its front-end stop."""
    return LOAD_PRELUDE + f"stops = {stops}\n" if needed else ""


def check_lines(checks: Sequence[Check]) -> str:
    texts = f"texts = {term_literal([c.code for c in checks])}\n"
    lines = "\n".join(check_line(i, c, f"elem(texts, {i})") for i, c in enumerate(checks))
    return preamble(any(c.level == "compile" for c in checks)) + texts + lines + "\n"


def check_program(checks: Sequence[Check]) -> str:
    """An Elixir script that exits non-zero unless every check passes (for `elixir`)."""
    return ("ExUnit.start()\n" if tested(checks) else "") + check_lines(checks)


def pool_program(checks: Sequence[Check]) -> str:
    """The same checks for the sandbox pool: `passed` when all succeed."""
    return check_lines(checks) + ("" if tested(checks) else MARKER_TEST)


def failure_reason(checks: Sequence[Check], outcome: Outcome) -> str | None:
    """Why a candidate is dropped (None: it passed): the strictest level it was held to."""
    if outcome.status == "passed":
        return None
    if outcome.status in ("timeout", "memory"):
        return f"check_{outcome.status}"
    if tested(checks) and outcome.status != "syntax_error":
        return "tests_failed"
    strict = any(c.level != "parse" for c in checks)
    return "compile_failed" if strict else "parse_failed"


class UnitResults:
    """Results of the check units programs have run in this process, by the sha256 of
    their level and code (the `size` most recently used): a unit's result depends on its
    code alone, so a later program does not run it again. Only programs that ran to
    their end contribute."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._results: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(code: str, level: str) -> str:
        return hashlib.sha256(f"{level}\0{code}".encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> bool | None:
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
            return self._results.get(key)

    def put(self, key: str, passed: bool) -> None:
        with self._lock:
            self._results[key] = passed
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)


# The probe's result depends on the Elixir installation alone: a batch program reports
# it (`<nonce> stops true|false`) and later programs of the process take it from
# `UnitResults`.
STOPS_KEY = UnitResults.key(FRONT_END_PROBE, "stops")


def reported_stops(nonce: str, known: UnitResults | None) -> str:
    """The `stops` expression of a batch program: the known result, or the probe, reported."""
    stops = known.get(STOPS_KEY) if known is not None else None
    if stops is not None:
        return "true" if stops else "false"
    return f'(fn stops -> IO.puts("{nonce} stops #{{stops}}"); stops end).({FRONT_END_PROBE})'


class Units:
    """The distinct checks of one program, numbered in order of first use; a check
    whose result `known` holds is not run again. The code they need is held once, in
    `texts` (numbered in order of first use)."""

    def __init__(self, known: UnitResults | None = None) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.texts: dict[str, int] = {}
        self.known = known

    def text(self, code: str) -> str:
        """Elixir for `code`, from `texts`."""
        return f"elem(texts, {self.texts.setdefault(code, len(self.texts))})"

    def of(self, check: Check) -> str:
        """Elixir that is true when the unit of `check` passes."""
        if self.known is not None:
            passed = self.known.get(UnitResults.key(check.code, check.level))
            if passed is not None:
                return "true" if passed else "false"
        index = self.index.setdefault((check.code, check.level), len(self.index))
        return f"run.({index}) == :ok"

    def expression(self, check: Check) -> str:
        """Elixir that is true when `check` passes (running each unit at most once)."""
        if check.like is not None:
            like = self.of(Check(check.like, check.level))
            same = f"ExforgeCheck.same_expansion({self.text(check.like)}, {self.text(check.code)})"
            return f"(({like} and {same}) or {self.of(check)})"
        if check.level != "parse" or check.within is None:
            return self.of(check)
        whole = self.of(Check(check.within))
        return whole if whole == "true" else f"({whole} or {self.of(check)})"

    def definitions(self) -> str:
        """`texts` and `units` (once every expression is made)."""
        lines = [
            f"  {i} => fn -> {check_line(i, Check(code, level), self.text(code))} end"  # type: ignore[arg-type]
            for (code, level), i in self.index.items()
        ]
        texts = f"texts = {term_literal(list(self.texts))}\n"
        return texts + "units = %{\n" + ",\n".join(lines) + "\n}\n"

    def keys(self) -> list[str]:
        """The cache key of each unit, by index."""
        return [UnitResults.key(code, level) for (code, level) in self.index]


RUN_UNIT = """
run = fn index ->
  case Process.get({:exforge_unit, index}) do
    nil ->
      result =
        try do
          units[index].()
          :ok
        rescue
          _ -> :failed
        catch
          _, _ -> :failed
        end

      Process.put({:exforge_unit, index}, result)
      IO.puts("NONCE unit #{index} #{result}")
      result

    result ->
      result
  end
end
"""


@dataclass(frozen=True)
class Program:
    """One batch program: its source, its nonce and the cache key of each of its units."""

    source: str
    nonce: str
    units: list[str]


def batch_program(batch: Sequence[Sequence[Check]], known: UnitResults | None = None) -> Program:
    """Every candidate's verdict, `<nonce> <index> ok|failed`, each unit's result as it
    runs, `<nonce> unit <index> ok|failed`, then `<nonce> done`."""
    nonce = secrets.token_hex(8)
    units = Units(known)
    verdicts = []
    for index, checks in enumerate(batch):
        passed = " and ".join(units.expression(c) for c in checks) or "true"
        verdicts.append(f'IO.puts("{nonce} {index} " <> if({passed}, do: "ok", else: "failed"))')
    source = (
        preamble(
            any(level == "compile" for _, level in units.index)
            or any(c.like is not None for cs in batch for c in cs),
            reported_stops(nonce, known),
        )
        + units.definitions()
        + RUN_UNIT.replace("NONCE", nonce)
        + "\n".join(verdicts)
        + f'\nIO.puts("{nonce} done")\n'
    )
    return Program(source, nonce, units.keys())


def batch_verdicts(
    outcome: Outcome, program: Program, size: int, known: UnitResults | None = None
) -> list[bool] | None:
    """Per candidate: passed? None when the program did not run to its end. The results
    of the units it ran go to `known`."""
    nonce = program.nonce
    found = dict(re.findall(rf"^{nonce} (\d+) (ok|failed)$", outcome.output, re.MULTILINE))
    done = re.search(rf"^{nonce} done$", outcome.output, re.MULTILINE) is not None
    if not done or len(found) != size:
        return None
    if known is not None:
        for stops in re.findall(rf"^{nonce} stops (true|false)$", outcome.output, re.MULTILINE):
            known.put(STOPS_KEY, stops == "true")
        ran = re.findall(rf"^{nonce} unit (\d+) (ok|failed)$", outcome.output, re.MULTILINE)
        for index, result in ran:
            known.put(program.units[int(index)], result == "ok")
    return [found[str(i)] == "ok" for i in range(size)]


def even_batches(items: list[int], most: int, workers: int) -> list[list[int]]:
    """`items` in batches of at most `most`, as many as a multiple of `workers` takes and
    as even as can be, so that no VM waits on another's larger share."""
    if not items:
        return []
    count = -(-len(items) // most)
    count = -(-count // workers) * workers
    size, extra = divmod(len(items), count)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [items[a:b] for a, b in pairwise(starts) if a < b]


def check_all(
    pool: SandboxPool,
    candidates: Sequence[Sequence[Check]],
    batch: int = PROGRAM_CANDIDATES,
    known: UnitResults | None = None,
) -> list[str | None]:
    """The failure reason (None: passed) of each candidate's checks, in order; units
    whose results `known` holds are not run again, and those run are added to it."""
    reasons: dict[int, str | None] = {}
    alone = [i for i, checks in enumerate(candidates) if tested(checks)]
    shared = [i for i, checks in enumerate(candidates) if not tested(checks)]
    batches = even_batches(shared, batch, pool.config.workers)
    programs = [batch_program([candidates[i] for i in group], known) for group in batches]
    outcomes = pool.map(p.source for p in programs)
    for group, program, outcome in zip(batches, programs, outcomes, strict=True):
        verdicts = batch_verdicts(outcome, program, len(group), known)
        if verdicts is None:  # run one by one: who failed, and why
            alone += group
            continue
        for index, ok in zip(group, verdicts, strict=True):
            reasons[index] = None if ok else failure_reason(candidates[index], FAILED_CHECK)
    single = pool.map([pool_program(candidates[i]) for i in alone])
    for index, outcome in zip(alone, single, strict=True):
        reasons[index] = failure_reason(candidates[index], outcome)
    return [reasons[i] for i in range(len(candidates))]
