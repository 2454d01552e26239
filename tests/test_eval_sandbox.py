"""The sandbox: statuses, limits, and hostile candidates contained without disturbing the
candidates around them; containment proven by attempts that reach for the host's network,
files and processes. Real Elixir VMs throughout."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from exforge.elixir.sandbox import (
    UNPRIVILEGED_ID,
    Outcome,
    Program,
    SandboxConfig,
    SandboxError,
    SandboxPool,
    _Affinity,
    classify_death,
    isolation,
    parse_reply,
    server_modules,
)

REPO = Path(__file__).resolve().parent.parent

TESTS = """
ExUnit.start()
defmodule DoubleTest do
  use ExUnit.Case, async: true
  test "double" do
    assert Double.double(2) == 4
  end
end
"""


def program(body: str, before: str = "") -> str:
    """A candidate module Double whose double/1 runs `body`, with its ExUnit test."""
    return f"{before}defmodule Double do\n  def double(x) do\n    {body}\n  end\nend\n{TESTS}"


GOOD = program("x * 2")
# One 4 GB binary: past the VM's 1 GiB address space at once, however busy the machine.
MEMORY_HOG = "byte_size(<<x::size(4_000_000_000)-unit(8)>>)"
HOSTILE: dict[str, tuple[str, str]] = {
    "assertion": (program("x + 1"), "failed"),
    "syntax": (program("x *"), "syntax_error"),
    "undefined_function": (program("nope(x)"), "syntax_error"),
    "raise": (program('raise "boom"'), "runtime_error"),
    "halt_in_test": (program("System.halt(0)"), "runtime_error"),
    "halt_at_load": (program("x * 2", before="System.halt(0)\n"), "runtime_error"),
    "init_stop": (program("x * 2", before=":init.stop()\n"), "runtime_error"),
    "infinite_spawn": (
        program(
            "Stream.repeatedly(fn -> spawn(fn -> Process.sleep(:infinity) end) end) |> Stream.run()"
        ),
        "runtime_error",
    ),
    "kill_every_process": (
        program("for p <- Process.list(), p != self(), do: Process.exit(p, :kill)"),
        "runtime_error",
    ),
    "infinite_loop": (program("Stream.cycle([1]) |> Stream.run()"), "timeout"),
    "loop_at_load": ("defmodule Loop do\n  def go, do: go()\nend\nLoop.go()\n", "timeout"),
    "memory_hog": (program(MEMORY_HOG), "memory"),
    "exclude_every_test": (
        program("x * 2", before="ExUnit.configure(exclude: :test)\n"),
        "failed",
    ),
    "no_tests": ("IO.puts(:hello)\n", "failed"),
}


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    with SandboxPool(SandboxConfig(workers=2, timeout_s=2.0, max_output=2048)) as pool:
        yield pool


def test_hostile_candidates_are_contained_and_others_unaffected(pool: SandboxPool) -> None:
    names = list(HOSTILE)
    programs = [GOOD]
    for name in names:
        programs += [HOSTILE[name][0], GOOD]
    outcomes = pool.map(programs)
    goods = outcomes[0::2]
    assert [o.status for o in goods] == ["passed"] * len(goods), [o.output for o in goods]
    got = {name: outcome for name, outcome in zip(names, outcomes[1::2], strict=True)}
    assert {name: o.status for name, o in got.items()} == {
        name: expected for name, (_, expected) in HOSTILE.items()
    }
    for name in ["halt_in_test", "halt_at_load", "init_stop", "infinite_spawn", "infinite_loop"]:
        assert got[name].worker_replaced, name
    for name in ["kill_every_process", "loop_at_load", "memory_hog", "exclude_every_test"]:
        assert got[name].worker_replaced, name
    assert not got["assertion"].worker_replaced and not got["syntax"].worker_replaced
    assert "Cannot allocate" in got["memory_hog"].output
    assert "SystemLimitError" in got["infinite_spawn"].output
    assert got["infinite_loop"].seconds == 2.0
    assert got["assertion"].tests == 1 and got["assertion"].failures == 1
    assert "Assertion with == failed" in got["assertion"].output
    assert pool.replaced >= 9


def test_a_program_may_have_a_wall_clock_limit_of_its_own(pool: SandboxPool) -> None:
    """A program that runs past the pool's `timeout_s` (2 s) but within its own limit
    runs to its end; the same program under the pool's limit times out."""
    slow = 'Process.sleep(3_000)\nIO.puts("slept")\n'
    own, pools = pool.map([Program(slow, timeout_s=30.0), Program(slow)])
    assert own.status != "timeout" and "slept" in own.output and not own.worker_replaced
    assert pools.status == "timeout" and pools.seconds == 2.0 and pools.worker_replaced


def test_output_is_truncated_and_warnings_counted(pool: SandboxPool) -> None:
    spam = program('Enum.each(1..10_000, fn _ -> IO.puts("spam") end)\n    _unused = 1\n    x * 2')
    outcome = pool.run(spam.replace("def double(x) do", "def double(x) do\n    y = 1"))
    assert outcome.status == "passed"
    assert len(outcome.output.encode()) == 2048
    assert outcome.warnings == 1  # variable "y" is unused


def _verdict(outcome: Outcome) -> tuple[object, ...]:
    """All of an outcome but what ExUnit prints of its run's timing and seed."""
    output = re.sub(r"(Finished in|Randomized with seed) .*\n", "", outcome.output)
    return outcome.status, outcome.tests, outcome.failures, outcome.warnings, output


def _call_count(outcome: Outcome) -> str | None:
    """The call count a program's `probe: {:call_count, N}` line printed, if any."""
    found = re.search(r"^probe: \{:call_count, (\d+)\}\n", outcome.output, re.MULTILINE)
    return found and found.group(1)


def _probed_verdict(outcome: Outcome) -> tuple[object, ...]:
    """`_verdict` of an outcome, less its probe's lines."""
    return _verdict(replace(outcome, output=re.sub(r"probe: .*\n", "", outcome.output)))


def _unframed_verdict(outcome: Outcome) -> tuple[object, ...]:
    """`_probed_verdict` of an outcome, less the frames of a stacktrace it printed: where
    a module body raised, they show how the server compiled it (whole, or before kept
    tests: so on main too), not what the candidate did."""
    frames = r"(?m)^    (\(\w+ [\d.]+\) )?\S+:\d+: .*\n"
    return _probed_verdict(replace(outcome, output=re.sub(frames, "", outcome.output)))


def _in_turn_and_whole(
    runs: list[Program], programs: list[Program], prelude: str
) -> tuple[list[Outcome], list[Outcome]]:
    """The outcomes of `runs`, one at a time and in order on one VM (which keeps what it
    may of earlier ones), and of each of `programs` whole on a fresh VM."""
    with SandboxPool(SandboxConfig(workers=1, timeout_s=5.0, prelude=prelude)) as pool:
        outcomes = [pool.run(p) for p in runs]
    config = SandboxConfig(workers=2, timeout_s=5.0, prelude=prelude, max_uses=1)
    with SandboxPool(config) as pool:
        wholes = pool.map([p.text for p in programs])
    return outcomes, wholes


def _each_thrice_and_whole(
    codes: list[str], tests: str, probe: str
) -> tuple[list[Outcome], list[Outcome]]:
    """`_in_turn_and_whole` of each code with `tests`, three times in a row, with a
    prelude that counts calls of `probe` (the `probe:` line `_call_count` reads)."""
    prelude = f":erlang.trace_pattern({probe}, true, [:call_count])\n"
    programs = [Program(code, tests) for code in codes]
    return _in_turn_and_whole([p for p in programs for _ in range(3)], programs, prelude)


def test_tests_compiled_once_give_the_verdicts_of_the_whole_program(pool: SandboxPool) -> None:
    double = "defmodule Double do\n  def double(x) do\n    {}\n  end\nend\n"
    protocol = (
        "defprotocol Double do\n  def double(x)\nend\n"
        "defimpl Double, for: Integer do\n  def double(x), do: {}\nend\n"
    )
    codes = {
        "passing": double.format("x * 2"),
        "failing": double.format("x + 1"),
        # the undefined-function check of the tests depends on the candidate
        "missing_function": "defmodule Double do\n  def triple(x), do: x * 3\nend\n",
        "missing_module": "defmodule Treble do\n  def double(x), do: x * 2\nend\n",
        "unused_variable": double.format("y = 1\n    x * 2"),
        # a remote call to a macro compiles differently: the tests must see the candidate's
        "macro": "defmodule Double do\n  defmacro double(x), do: quote(do: unquote(x) * 2)\nend\n",
        "top_level_code": "IO.puts(:hello)\n" + double.format("x * 2"),
        "redefines_the_tests": double.format("x * 2")
        + "defmodule DoubleTest do\n  def x, do: 1\nend\n",
        "compiler_option": "Code.put_compiler_option(:ignore_module_conflict, true)\n"
        + double.format("x * 2"),
        "syntax_error": double.format("x *"),
        "unclosed_heredoc": 'defmodule Double do\n  @doc """\n',
        # the same tests from another line: failures report their own line numbers
        "failing_lower_down": "\n\n\n" + double.format("x - 1"),
        # protocols and implementations define modules too
        "protocol": protocol.format("x * 2"),
        "protocol_failing": protocol.format("x + 1"),
    }
    unused = TESTS.replace(
        "assert Double.double(2) == 4", "y = 2\n    assert Double.double(2) == 4"
    )
    programs = [Program(code, tests) for code in codes.values() for tests in (TESTS, unused)]
    # three of each: the VM that runs a problem sees its tests again and builds them then
    outcomes = pool.map(programs * 3)
    wholes = pool.map([p.text for p in programs])
    assert [_verdict(o) for o in outcomes] == [_verdict(o) for o in wholes] * 3
    got = {name: outcomes[2 * i] for i, name in enumerate(codes)}
    assert {name: (o.status, o.warnings) for name, o in got.items()} == {
        "passing": ("passed", 0),
        "failing": ("failed", 0),
        "missing_function": ("runtime_error", 1),
        "missing_module": ("runtime_error", 1),
        "unused_variable": ("passed", 1),
        "macro": ("runtime_error", 1),
        "top_level_code": ("passed", 0),
        "redefines_the_tests": ("passed", 1),
        "compiler_option": ("passed", 0),
        "syntax_error": ("syntax_error", 0),
        "unclosed_heredoc": ("syntax_error", 0),
        "failing_lower_down": ("failed", 0),
        "protocol": ("passed", 0),
        "protocol_failing": ("failed", 0),
    }
    assert outcomes[1].warnings == 1  # the tests' own unused variable, compiled once
    assert "candidate.exs:10" in got["failing"].output
    assert "candidate.exs:13" in got["failing_lower_down"].output
    assert "Be sure to require Double" in got["macro"].output


def test_tests_compiled_once_are_reused() -> None:
    """A probe counts the compiles of test modules (ExUnit.Case.__after_compile__/2) from
    the candidate's compile to its test: one for a problem's first program, none once
    the VM that runs it keeps its tests."""
    counted = "{ExUnit.Case, :__after_compile__, 2}"
    probe = f"defmodule Probe do\n  :erlang.trace_pattern({counted}, true, [:call_count])\nend\n"
    shown = (
        f'IO.inspect(:erlang.trace_info({counted}, :call_count), label: "probe")\n'
        f"    :erlang.trace_pattern({counted}, false, [:call_count])\n    x * 2"
    )
    double = f"defmodule Double do\n  def double(x) do\n    {shown}\n  end\nend\n"
    candidate = Program(double + probe, TESTS)
    with SandboxPool(SandboxConfig(workers=1, timeout_s=2.0, max_output=2048)) as pool:
        outcomes = pool.map([candidate] * 3)
    assert [o.status for o in outcomes] == ["passed"] * 3
    assert [re.findall(r"probe: (.*)", o.output) for o in outcomes] == [
        ["{:call_count, 1}"],
        ["{:call_count, 0}"],
        ["{:call_count, 0}"],
    ]


POINT_TESTS = """
ExUnit.start()
defmodule PointTest do
  use ExUnit.Case, async: true
  test "shift" do
    assert %Point{x: 2, y: 0} = Point.shift(%Point{x: 1})
  end
end
"""


def test_tests_expanding_a_candidates_struct_give_the_verdicts_of_the_whole_program() -> None:
    """Tests that expand the candidate's struct are kept after a candidate that defines
    it, and reused only where the later candidate's `__struct__` is the same code. A
    probe counts the calls of `Point.__struct__/1`: the tests' compile expands
    `%Point{x: 1}` with one, the kept tests make none."""
    probe = (
        "defmodule Probe do\n"
        "  :erlang.trace_pattern({Point, :__struct__, 1}, true, [:call_count])\nend\n"
    )
    point = (
        "defmodule Point do\n  {}\n  def shift(p) do\n"
        "    {{Point, :__struct__, 1}} |> :erlang.trace_info(:call_count) |> "
        'IO.inspect(label: "probe")\n'
        "    %{{p | x: p.x + 1}}\n  end\nend\n"
    )
    hand_written = (
        "def __struct__, do: %{__struct__: __MODULE__, x: 0, y: 0}\n"
        "  def __struct__(kv), do: Enum.reduce(kv, __struct__(), fn {k, v}, m -> "
        "Map.put(m, k, v) end)"
    )
    codes = {
        "same": point.format("defstruct x: 0, y: 0"),
        "failing": point.format("defstruct x: 0, y: 0").replace("+ 1", "+ 2"),
        # the same struct from another line and spelled otherwise
        "same_moved": point.format("")
        .replace("do\n  \n", "do\n")
        .replace("  end\nend", "  end\n  defstruct [x: 0,  y: 0]\nend"),
        # the tests' %Point{x: 1} takes the default of y: 1 and no longer matches
        "other_default": point.format("defstruct x: 0, y: 1"),
        # the tests' pattern names a key the struct lacks: a compile error
        "missing_key": point.format("defstruct x: 0, z: 0"),
        "extra_key": point.format("defstruct x: 0, y: 0, z: 0"),
        # %Point{x: 1} without y: an ArgumentError as the tests compile
        "enforced": point.format("@enforce_keys [:y]\n  defstruct x: 0, y: 0"),
        "hand_written": point.format(hand_written),
        "no_struct": "defmodule Point do\n  def shift(p), do: p\nend\n",
    }
    programs = [Program(code + probe, POINT_TESTS) for code in codes.values()]
    with SandboxPool(SandboxConfig(workers=1, timeout_s=2.0, max_output=2048)) as pool:
        # the second sees the tests again and keeps them, compiled after its Point
        outcomes = pool.map(programs[:1] * 2 + programs)[2:]
        wholes = pool.map([p.text for p in programs])

    assert [_probed_verdict(o) for o in outcomes] == [_probed_verdict(o) for o in wholes]
    assert [_call_count(o) for o in wholes] == ["1", "1", "1", "1", None, "1", None, "1", None]
    got = {name: outcome for name, outcome in zip(codes, outcomes, strict=True)}
    assert {name: (o.status, _call_count(o)) for name, o in got.items()} == {
        "same": ("passed", "0"),
        "failing": ("failed", "0"),
        "same_moved": ("passed", "0"),
        "other_default": ("failed", "1"),
        "missing_key": ("syntax_error", None),
        "extra_key": ("passed", "1"),
        "enforced": ("runtime_error", None),
        "hand_written": ("passed", "1"),
        "no_struct": ("syntax_error", None),
    }
    assert "unknown key :y for struct Point" in got["missing_key"].output


SHAPE_TESTS = """
ExUnit.start()
defmodule ShapeTest do
  use ExUnit.Case, async: true
  test "area" do
    assert Shape.area(3) == 9
    assert Shape.area([2]) == 4
  end
end
"""
# the protocol's module_info, its source relative (the candidate's directory varies) and
# its exports sorted (their order follows the VM's atom table: a reused VM's differs)
SHAPE_INFO = (
    "info = Keyword.update!(Shape.module_info(), :compile, fn compile ->\n"
    "  Keyword.update!(compile, :source, &Path.relative_to_cwd(List.to_string(&1)))\nend)\n"
    "info = Keyword.update!(info, :exports, &Enum.sort/1)\n"
    'IO.inspect(info, label: "info", limit: :infinity)\n'
)
PROTOCOL_PROBE = "{Protocol, :__before_compile__, 1}"


def test_a_kept_protocol_gives_the_verdicts_of_the_whole_program() -> None:
    """A program that begins with a protocol a VM has kept loads it instead of compiling
    it: the same module (module_info, the source's directory aside, which is the
    candidate's own) and the same verdicts, warnings and output as each program compiled
    whole in a fresh VM. A probe (set by the prelude) counts the protocols compiled,
    `Protocol.__before_compile__/1` once each: the VM compiles the kept one once more, to
    keep it, and its candidates then compile none."""
    protocol = "defprotocol Shape do\n  def area(shape)\nend\n"
    square = "defimpl Shape, for: Integer do\n  def area(n), do: n * n\nend\n"
    first = "defimpl Shape, for: List do\n  def area([n]), do: n * n\nend\n"
    probe = f'IO.inspect(:erlang.trace_info({PROTOCOL_PROBE}, :call_count), label: "probe")\n'
    same = protocol + square + first
    codes = {
        "same": same,
        "failing": same.replace("do: n * n\nend\n", "do: n + n\nend\n", 1),
        # implementations for types the kept protocol's candidates did not implement
        "other_types": protocol
        + square
        + "defimpl Shape, for: Tuple do\n  def area({n}), do: n * n\nend\n"
        + "defimpl Shape, for: Float do\n  def area(x), do: x * x\nend\n",
        # other protocols of the same module: compiled, the kept one left alone
        "other_function": same.replace("def area(shape)", "def size(shape)"),
        "other_arity": same.replace("def area(shape)", "def area(shape, unit)"),
        "fallback_to_any": same.replace(
            "do\n  def area(shape)", "do\n  @fallback_to_any true\n  def area(shape)"
        )
        + "defimpl Shape, for: Any do\n  def area(_), do: 0\nend\n",
        # the kept protocol, then another of the same name: redefined, as compiled
        "redefined": same + "defprotocol Shape do\n  def area(shape, unit)\nend\n",
        # the same text on other lines is another form
        "moved": "\n" + same,
        "syntax_error_later": same.replace("n * n\nend\n", "n *\nend\n", 1),
        "compile_error_later": same.replace("n * n\nend\n", "nope(n)\nend\n", 1),
        # the file's top-level code expands before the protocol compiles
        "top_level_error": same + "nope()\n",
        "defined_before": "defmodule Shape.Before do\nend\n" + same,
    }
    prelude = (
        "Code.ensure_loaded!(Protocol)\n"
        f":erlang.trace_pattern({PROTOCOL_PROBE}, true, [:call_count])\n"
    )
    programs = [Program(code + SHAPE_INFO + probe, SHAPE_TESTS) for code in codes.values()]
    # the second run sees the protocol again and keeps it
    outcomes, wholes = _in_turn_and_whole(programs[:1] * 2 + programs, programs, prelude)

    assert [_probed_verdict(o) for o in outcomes[2:]] == [_probed_verdict(o) for o in wholes]
    assert [_call_count(o) for o in wholes] == ["1"] * 6 + ["2", "1", None, None, None, "1"]
    got = dict(zip(codes, outcomes[2:], strict=True))
    assert [_call_count(o) for o in outcomes[:2]] == ["1", "2"]
    assert {name: (o.status, _call_count(o)) for name, o in got.items()} == {
        "same": ("passed", "2"),
        "failing": ("failed", "2"),
        "other_types": ("runtime_error", "2"),
        "other_function": ("runtime_error", "3"),
        "other_arity": ("runtime_error", "4"),
        "fallback_to_any": ("passed", "5"),
        "redefined": ("runtime_error", "6"),
        "moved": ("passed", "7"),
        "syntax_error_later": ("syntax_error", None),
        "compile_error_later": ("syntax_error", None),
        "top_level_error": ("syntax_error", None),
        "defined_before": ("passed", "8"),
    }
    assert got["redefined"].warnings >= 1  # redefining module Shape
    assert re.search(r'source: "candidate.exs"', got["same"].output), got["same"].output
    assert not any(o.worker_replaced for o in outcomes)


BODY_PROBE = "{Exforge.Sandbox.Bodies, :evaluate, 1}"
BODY_TESTS = f"""
ExUnit.start()
defmodule DoubleTest do
  use ExUnit.Case, async: true
  test "double" do
    info = Keyword.update!(Double.module_info(), :compile, fn compile ->
      Keyword.update!(compile, :source, &Path.relative_to_cwd(List.to_string(&1)))
    end)
    IO.inspect(Keyword.update!(info, :exports, &Enum.sort/1), label: "info", limit: :infinity)
    IO.inspect(:erlang.trace_info({BODY_PROBE}, :call_count), label: "probe")
    assert Double.double(2) == 4
  end
end
"""


def test_module_bodies_evaluated_give_the_verdicts_of_the_whole_program() -> None:
    """A candidate of nothing but modules whose bodies only store definitions (`def`,
    `defp`, literal `@doc`, `@moduledoc`, `@impl`, a `defstruct` of distinct literal
    fields) has them evaluated instead of compiled into throwaway modules, and a
    `defimpl` of a loaded protocol made the module it defines: the same modules
    (module_info, the source's directory aside; the VM's boot probe compares whole
    binaries), verdicts, warnings and output as each program compiled whole in a fresh
    VM. A probe (set by the prelude) counts the bodies
    evaluated: one a module of such candidates once their tests are kept, none for other
    bodies or whole programs."""
    double = "defmodule Double do\n{}end\n"
    codes = {
        "plain": double.format("  def double(x), do: x * 2\n"),
        "failing": double.format("  def double(x), do: x + 1\n"),
        "documented": double.format(
            '  @moduledoc "Doubles."\n  @doc """\n  Twice `x`.\n  """\n'
            "  def double(x, times \\\\ 2)\n  def double(x, times) when is_integer(x), "
            "do: twice(x, times)\n  def double(x, _), do: x\n  @doc false\n"
            "  def unused(y), do: 1\n  defp twice(x, times), do: x * times\n"
        ),
        "impl_without_behaviour": double.format("  @impl true\n  def double(x), do: x * 2\n"),
        "two_modules": "defmodule Helper do\n  def twice(x), do: x * 2\nend\n"
        + double.format("  def double(x), do: Helper.twice(x)\n"),
        "clauses_apart": double.format(
            "  def double(1), do: 2\n  defp other, do: 1\n  def double(x), do: x * 2\n"
        ),
        "redefined": double.format("  def double(x), do: x\n")
        + double.format("  def double(x), do: x * 2\n"),
        "struct": double.format("  defstruct [:a]\n  def double(x), do: x * 2\n"),
        "struct_defaults": double.format(
            "  defstruct [:a, b: [1], c: %{d: :e}]\n  def double(x), do: x * 2\n"
        ),
        # bodies that run code: compiled as before
        "attribute_computed": double.format("  @times 1 + 1\n  def double(x), do: x * @times\n"),
        # defstruct that raises or warns (the stacktrace shows where the body ran)
        "struct_twice": double.format(
            "  defstruct [:a]\n  defstruct [:b]\n  def double(x), do: x * 2\n"
        ),
        "struct_key_twice": double.format("  defstruct [:a, a: 1]\n  def double(x), do: x * 2\n"),
        "struct_field_not_atom": double.format('  defstruct ["a"]\n  def double(x), do: x * 2\n'),
        # an implementation of a protocol of Elixir's, made a module (its body evaluated)
        "impl": double.format(
            "  defstruct [:a]\n  def double(x), do: String.length(to_string(%Double{a: x})) * x\n"
        )
        + 'defimpl String.Chars, for: Double do\n  def to_string(%Double{}), do: "ab"\nend\n',
        # last: their tests do not run, so they show no count
        "undefined_function": double.format("  def double(x), do: nope(x)\n"),
        "undefined_in_guard": double.format("  def double(x) when nope(x), do: x\n"),
        # not a protocol: compiled, and its check raises as in a fresh VM
        "impl_not_a_protocol": double.format("  def double(x), do: x * 2\n")
        + "defimpl Enum, for: Double do\n  def count(_), do: {:ok, 0}\nend\n",
    }
    compiled = ("attribute_computed", "struct_twice", "struct_key_twice", "struct_field_not_atom")
    evaluated = {name: name not in compiled for name in codes}
    modules = {name: len(re.findall(r"defmodule|defimpl String", c)) for name, c in codes.items()}
    # the first of each three compiles whole, the others keep its tests
    outcomes, wholes = _each_thrice_and_whole(list(codes.values()), BODY_TESTS, BODY_PROBE)

    assert [_unframed_verdict(o) for o in outcomes] == [
        _unframed_verdict(o) for o in wholes for _ in range(3)
    ]
    # a fresh VM's count is its boot probe's, a module and an implementation (none shown
    # where the tests did not run)
    assert {_call_count(o) for o in wholes} == {"2", None}
    counts, last = [], 2
    for outcome in outcomes:
        counts.append(int(_call_count(outcome) or last))
        last = counts[-1]
    steps = [after - before for before, after in zip([2, *counts[:-1]], counts, strict=True)]
    ran = {name: outcomes[3 * i] for i, name in enumerate(codes)}
    assert {name: (o.status, o.warnings) for name, o in ran.items()} == {
        "plain": ("passed", 0),
        "failing": ("failed", 0),
        "documented": ("passed", 1),  # variable "y" is unused
        "impl_without_behaviour": ("passed", 1),
        "two_modules": ("passed", 0),
        "undefined_function": ("syntax_error", 0),
        "undefined_in_guard": ("syntax_error", 0),
        "clauses_apart": ("passed", 2),  # double/1 clauses apart, other/0 unused
        "redefined": ("passed", 1),  # redefining module Double
        "attribute_computed": ("passed", 0),
        "struct": ("passed", 0),
        "struct_defaults": ("passed", 0),
        "struct_twice": ("runtime_error", 0),
        "struct_key_twice": ("passed", 1),  # duplicate key :a found in struct
        "struct_field_not_atom": ("runtime_error", 0),
        "impl": ("passed", 0),
        "impl_not_a_protocol": ("runtime_error", 0),
    }
    # a VM keeps the tests (for code of as many lines) on their second sight
    sightings: Counter[int] = Counter()
    expected = []
    for name, code in codes.items():
        for _ in range(3):
            kept = sightings[code.count("\n")] > 0
            expected.append(modules[name] if evaluated[name] and kept else 0)
            sightings[code.count("\n")] += 1
    shown = [i for i, o in enumerate(outcomes) if _call_count(o) is not None]
    assert [steps[i] for i in shown] == [expected[i] for i in shown]
    assert sum(expected[i] for i in shown) >= 20
    assert not any(o.worker_replaced for o in outcomes)


CHECK_PROBE = "{:code, :get_object_code, 1}"
CHECK_TESTS = f"""
ExUnit.start()
defmodule DoubleTest do
  use ExUnit.Case, async: true
  test "double" do
    IO.inspect(:erlang.trace_info({CHECK_PROBE}, :call_count), label: "probe")
    assert Double.double(2) == 4
  end
end
"""


def test_the_checks_kept_cache_gives_the_verdicts_of_a_fresh_vm() -> None:
    """The undefined-function check starts with what the VM learnt of the modules earlier
    candidates called (Exforge.Sandbox.Checker): the same warnings and verdicts as each
    program compiled whole in a fresh VM, for calls to functions a module has, lacks or
    deprecates, and for a program whose own module shadows one the cache holds (its own
    exports, not the kept ones). A probe (set by the prelude) counts the object files the
    checks read: none once a VM has learnt the modules a candidate calls."""
    double = "defmodule Double do\n  def double(x), do: {}\nend\n"
    codes = {
        "calls": double.format("Integer.floor_div(x * 2, 1)"),
        "lacks": double.format("Integer.nope(x)"),
        "deprecates": double.format("x * 2 + length(Integer.to_char_list(0)) - 1"),
        "shadows": "defmodule Integer do\n  def only, do: 1\nend\n"
        + double.format("Integer.floor_div(x * 2, 1)"),
        "calls_again": double.format("Integer.floor_div(x * 2, 1)"),
    }
    outcomes, wholes = _each_thrice_and_whole(list(codes.values()), CHECK_TESTS, CHECK_PROBE)

    assert [_probed_verdict(o) for o in outcomes] == [
        _probed_verdict(o) for o in wholes for _ in range(3)
    ]
    ran = {name: outcomes[3 * i] for i, name in enumerate(codes)}
    assert {name: (o.status, o.warnings) for name, o in ran.items()} == {
        "calls": ("passed", 0),
        "lacks": ("runtime_error", 1),  # Integer.nope/1 is undefined or private
        "deprecates": ("passed", 1),  # Integer.to_char_list/1 is deprecated
        "shadows": ("runtime_error", 2),  # redefining Integer; floor_div/2 undefined
        "calls_again": ("passed", 0),
    }
    reads = [int(_call_count(o) or 0) for o in outcomes]
    fresh = [int(_call_count(o) or 0) for o in wholes]
    # a fresh VM's checks read object files; the kept cache's third sight of a program
    # reads none (its second may: the VM learns after the first)
    assert fresh[0] > 0
    assert reads[2] == reads[1]
    assert reads[1] < reads[0] + fresh[0]


def _vm(outcome: Outcome) -> str:
    """Which VM ran a candidate of `_vm_candidate`'s: its time offset, fixed at boot."""
    found = re.search(r"^VM (-?\d+)$", outcome.output, re.MULTILINE)
    assert found, outcome.output
    return found.group(1)


def _vm_candidate(name: str) -> str:
    """A passing Double that names its VM as it compiles, in a module `name`."""
    shown = 'IO.puts("VM #{:erlang.time_offset()}")'
    return f"defmodule {name} do\n  {shown}\nend\n" + double_code()


def double_code() -> str:
    return "defmodule Double do\n  def double(x), do: x * 2\nend\n"


def test_a_problems_programs_go_to_the_worker_that_claimed_its_tests() -> None:
    """The schedule `map` follows, step by step (which worker asks when is up to the
    machine's load, so the order is scripted here): a worker runs the programs whose tests
    it claimed, an idle one claims the next unclaimed tests, then takes the last of
    another's queue; a dead owner's tests go to whoever asks."""
    first, second, gone = object(), object(), object()
    schedule = _Affinity(["a", "a", "a", "a", "b", "b", None, "c", "c"])

    def alive(worker: object) -> bool:
        return worker is not gone

    taken = [
        (first, schedule.take(first, alive)),  # claims a
        (second, schedule.take(second, alive)),  # claims b
        (second, schedule.take(second, alive)),
        (gone, schedule.take(gone, alive)),  # the whole program 6 (nothing to keep)
        (gone, schedule.take(gone, alive)),  # claims c, then dies
        (second, schedule.take(second, alive)),  # b done: c's owner is dead, claims c
        (first, schedule.take(first, alive)),
        (second, schedule.take(second, alive)),  # nothing unclaimed: the last of a's
        (first, schedule.take(first, alive)),
        (first, schedule.take(first, alive)),  # a done, nothing left
    ]
    assert taken == [
        (first, 0),
        (second, 4),
        (second, 5),
        (gone, 6),
        (gone, 7),
        (second, 8),
        (first, 1),
        (second, 3),
        (first, 2),
        (first, None),
    ]


def test_one_problems_programs_still_use_both_vms() -> None:
    with SandboxPool(SandboxConfig(workers=2)) as pool:
        pool.map([GOOD, GOOD])  # both VMs booted
        alone = pool.map([Program(_vm_candidate("Only"), TESTS) for _ in range(6)])
    assert [o.status for o in alone] == ["passed"] * 6
    assert len({_vm(o) for o in alone}) == 2


def test_candidates_do_not_see_each_other_or_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFORGE_S3_SECRET_KEY", "host-secret")
    writer = program(
        "x * 2",
        before='File.write!("left-behind.txt", "x")\n'
        "defmodule Leaky do\n  def hello, do: :hi\nend\n"
        ":persistent_term.put(:leak, 1)\n",
    )
    os_env_writer = program("x * 2", before='System.put_env("EXFORGE_LEAK", "1")\n')
    ets_writer = program("x * 2", before=":ets.insert(:inet_db, {:exforge_leak, 1})\n")
    reader = program(
        "x * 2",
        before='false = File.exists?("left-behind.txt")\n'
        "false = Code.ensure_loaded?(Leaky)\n"
        ":undefined = :persistent_term.get(:leak, :undefined)\n"
        'nil = System.get_env("EXFORGE_S3_SECRET_KEY")\n'
        "true = String.starts_with?(File.cwd!(), System.tmp_dir!())\n"
        'nil = System.get_env("EXFORGE_LEAK")\n'
        "[] = :ets.lookup(:inet_db, :exforge_leak)\n",
    )
    home_writer = program("x * 2", before='File.write!("../left-in-home.txt", "x")\n')
    home_reader = program("x * 2", before='false = File.exists?("../left-in-home.txt")\n')
    stray = program(
        "x * 2", before='System.cmd("sh", ["-c", "nohup sleep 600 >/dev/null 2>&1 &"])\n'
    )
    # each candidate and whether it leaves its VM dirty: persistent_term changed, a file
    # left in the VM's home, an OS process left running, an OS environment variable set,
    # a public ETS table written
    expected = [
        (writer, True),
        (reader, False),
        (home_writer, True),
        (home_reader, False),
        (stray, True),
        (GOOD, False),
        (os_env_writer, True),
        (reader, False),
        (ets_writer, True),
        (reader, False),
    ]
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        outcomes = pool.map(candidate for candidate, _ in expected)
    assert [o.status for o in outcomes] == ["passed"] * len(expected), [o.output for o in outcomes]
    assert [o.worker_replaced for o in outcomes] == [replaced for _, replaced in expected]


def test_a_prelude_stays_loaded_and_a_candidate_that_redefines_it_is_discarded() -> None:
    """Every VM compiles the pool's prelude once, before its baseline: each candidate
    finds it loaded; one that redefines a module of it leaves the VM dirty, and the next
    candidate gets the prelude as it was."""
    prelude = "defmodule Prelude do\n  def double(x), do: x * 2\nend\n"
    uses = program("Prelude.double(x)")
    redefines = program(
        "Prelude.double(x)",
        before="defmodule Prelude do\n  def double(x), do: x * 3\nend\n",
    )
    with SandboxPool(SandboxConfig(workers=1, prelude=prelude)) as pool:
        outcomes = pool.map([uses, uses, redefines, uses])
    assert [o.status for o in outcomes] == ["passed", "passed", "failed", "passed"]
    assert [o.worker_replaced for o in outcomes] == [False, False, True, False]


def test_a_module_loaded_from_a_file_the_candidate_wrote_is_discarded() -> None:
    """A module loaded from an object file of the candidate's own, the file then deleted,
    leaves its VM dirty: only Erlang's and Elixir's modules load from files unnoticed."""
    plant = program(
        "x * 2",
        before="{:module, _, binary, _} = defmodule Planted do\n  def hi, do: :hi\nend\n"
        'File.write!("Elixir.Planted.beam", binary)\n'
        ":code.purge(Planted)\n:code.delete(Planted)\n:code.purge(Planted)\n"
        '{:module, Planted} = :code.load_abs(String.to_charlist(Path.expand("Elixir.Planted")))\n'
        'File.rm!("Elixir.Planted.beam")\n',
    )
    look = program("x * 2", before="false = Code.ensure_loaded?(Planted)\n")
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        outcomes = pool.map([look, plant, look])
    assert [o.status for o in outcomes] == ["passed"] * 3, [o.output for o in outcomes]
    assert [o.worker_replaced for o in outcomes] == [False, True, False]


def test_a_worker_that_cannot_be_replaced_fails_the_pool_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A VM that ends its candidate's run is replaced; where its replacement cannot start
    (here: no `prlimit` on the PATH any more), that run fails with the reason, and so does
    every later one, rather than waiting for a worker that will never come."""
    with SandboxPool(SandboxConfig(workers=1, timeout_s=5.0)) as pool:
        assert pool.run(GOOD).status == "passed"
        monkeypatch.setenv("PATH", "/nonexistent")
        with pytest.raises(SandboxError, match="prlimit"):
            pool.run("System.halt(0)\n")
        for later in (lambda: pool.run(GOOD), lambda: pool.map([GOOD, GOOD])):
            with pytest.raises(SandboxError, match=r"could not be replaced: .*prlimit"):
                later()


def test_strict_mode_gives_every_candidate_a_fresh_vm() -> None:
    with SandboxPool(SandboxConfig(workers=2, max_uses=1)) as pool:
        outcomes = pool.map([GOOD, HOSTILE["assertion"][0], GOOD])
        assert [o.status for o in outcomes] == ["passed", "failed", "passed"]
        assert all(o.worker_replaced for o in outcomes)
        assert pool.replaced == 3


def test_vms_load_the_server_compiled_once_into_the_users_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is compiled once into the cache, and every VM boots from what it holds:
    the same file serves fresh VMs, and the VMs no longer boot once it is garbled."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    server_modules.cache_clear()
    try:
        with SandboxPool(SandboxConfig(workers=1, max_uses=1)) as pool:
            assert [o.status for o in pool.map([GOOD, GOOD])] == ["passed"] * 2
        assert list((tmp_path / "exforge").iterdir()) == [server_modules()]
        server_modules().write_bytes(b"garbled")
        with (
            SandboxPool(SandboxConfig(workers=1)) as pool,
            pytest.raises(SandboxError, match="did not boot"),
        ):
            pool.run(GOOD)
    finally:
        server_modules.cache_clear()


def test_reply_parsing_and_death_classification() -> None:
    outcome, clean = parse_reply(b"failed 2 1 3 0\nsome output")
    assert outcome == Outcome("failed", tests=2, failures=1, warnings=3, output="some output")
    assert clean
    with pytest.raises(ValueError):
        parse_reply(b"pwned 1 0 0 0\n")
    assert (
        classify_death('eheap_alloc: Cannot allocate 8 bytes of memory (of type "heap").', 1)
        == "memory"
    )
    assert classify_death("", -11) == "memory"
    assert classify_death("", 128 + 11) == "memory"  # bubblewrap's report of a SIGSEGV
    assert classify_death("", 0) == "runtime_error"


# ------------------------------------------------------------ containment, by attempts


def attempt(name: str, expression: str) -> str:
    """A candidate that evaluates `expression` once as it loads and prints the result as
    `ATTEMPT name: <inspect(result)>`, then passes its own test."""
    shown = f'IO.puts("ATTEMPT {name}: " <> inspect(({expression}), limit: :infinity))\n'
    return program("x * 2", before=shown)


def attempted(outcome: Outcome, name: str) -> str:
    found = re.search(rf"^ATTEMPT {name}: (.*)$", outcome.output, re.MULTILINE)
    assert found, f"{name} printed no result: {outcome.status} {outcome.output}"
    return found.group(1)


@pytest.fixture
def exposed_dir() -> Iterator[Path]:
    """A directory on the host that anyone may read and write: only the sandbox's own
    view of the file system can keep a candidate out of it."""
    path = Path(tempfile.mkdtemp(prefix="exforge-exposed-"))
    path.chmod(0o777)
    (path / "secret.txt").write_text("host secret")
    (path / "secret.txt").chmod(0o644)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def canary() -> Iterator[socket.socket]:
    """A listening TCP socket on the host's loopback: any connection stays in its queue."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        yield sock


@pytest.fixture
def host_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the host's, in a session of its own, for candidates to try to kill;
    as the sandbox's own user, so that only its PID namespace can keep them apart."""
    as_sandbox_user = (
        ["setpriv", f"--reuid={UNPRIVILEGED_ID}", f"--regid={UNPRIVILEGED_ID}", "--clear-groups"]
        if os.geteuid() == 0
        else []
    )
    process = subprocess.Popen([*as_sandbox_user, "sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def test_sandbox_is_isolated_here() -> None:
    """The containment below is the isolated sandbox's: this machine grants it."""
    found = isolation()
    assert found.isolated, found.description


def test_candidates_cannot_reach_the_hosts_network_files_or_processes(
    exposed_dir: Path, canary: socket.socket, host_process: subprocess.Popen[bytes]
) -> None:
    port = canary.getsockname()[1]
    secret, escaped = exposed_dir / "secret.txt", exposed_dir / "escaped.txt"
    attempts = {
        "connect": f":gen_tcp.connect({{127, 0, 0, 1}}, {port}, [], 5000)",
        "read_host_file": f'File.read("{secret}")',
        "read_repository": f'File.read("{REPO / "pyproject.toml"}")',
        "write_host_dir": f'File.write("{escaped}", "escaped")',
        "write_root": 'File.write("/escaped.txt", "escaped")',
        "write_elixir": 'File.write(Path.join(:code.root_dir(), "escaped.txt"), "escaped")',
        "signal": f'System.cmd("kill", ["-KILL", "{host_process.pid}"], stderr_to_stdout: true)',
        "fork_flood": (
            'System.cmd("sh", ["-c", "n=0; while [ $n -lt 2000 ]; do '
            'sleep 60 >/dev/null 2>&1 & n=$((n+1)); done; echo started $n"], '
            "stderr_to_stdout: true)"
        ),
        "spawn_after_flood": 'System.cmd("echo", ["spawned"])',
    }
    programs = [attempt(name, expression) for name, expression in attempts.items()]
    with SandboxPool(SandboxConfig(workers=1, timeout_s=30)) as pool:
        outcomes = dict(zip(attempts, pool.map(programs), strict=True))
        memory = pool.run(program(MEMORY_HOG))

    assert {name: o.status for name, o in outcomes.items()} == dict.fromkeys(attempts, "passed")
    results = {name: attempted(outcome, name) for name, outcome in outcomes.items()}
    # The network: nothing listens on the sandbox's own loopback, and the host's saw nothing.
    assert results["connect"] == "{:error, :econnrefused}"
    with pytest.raises(BlockingIOError):
        canary.accept()
    # Files: the host's are not there to read or write; the system's are read-only.
    assert results["read_host_file"] == results["read_repository"] == "{:error, :enoent}"
    assert results["write_host_dir"] == "{:error, :enoent}" and not escaped.exists()
    assert results["write_root"] == results["write_elixir"] == "{:error, :erofs}"
    # Processes: the host's are not there to signal.
    no_such_process = rf'\{{"\S*kill: \({host_process.pid}\): No such process\\n", 1\}}'
    assert re.fullmatch(no_such_process, results["signal"]), results["signal"]
    assert host_process.poll() is None
    # OS processes: the flood stops at the process limit; its strays cost the VM, and the
    # next candidate (in a fresh one) spawns again.
    assert "Cannot fork" in results["fork_flood"] and "started 2000" not in results["fork_flood"]
    assert outcomes["fork_flood"].worker_replaced
    assert results["spawn_after_flood"] == '{"spawned\\n", 0}'
    # Memory: the VM runs out of address space, is replaced, and says why.
    assert memory.status == "memory" and memory.worker_replaced
    assert "Cannot allocate" in memory.output
