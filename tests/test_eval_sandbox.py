"""The sandbox: statuses, limits, and hostile candidates contained without disturbing the
candidates around them. Real Elixir VMs throughout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from exforge.elixir.sandbox import (
    Outcome,
    SandboxConfig,
    SandboxPool,
    classify_death,
    isolation,
    parse_reply,
)

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
    "memory_hog": (program("Enum.to_list(1..200_000_000) |> length()"), "memory"),
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


def test_output_is_truncated_and_warnings_counted(pool: SandboxPool) -> None:
    spam = program('Enum.each(1..10_000, fn _ -> IO.puts("spam") end)\n    _unused = 1\n    x * 2')
    outcome = pool.run(spam.replace("def double(x) do", "def double(x) do\n    y = 1"))
    assert outcome.status == "passed"
    assert len(outcome.output.encode()) == 2048
    assert outcome.warnings == 1  # variable "y" is unused


def test_network_is_unreachable_where_the_kernel_allows(pool: SandboxPool) -> None:
    connect = program(
        '{:error, reason} = :gen_tcp.connect(~c"1.1.1.1", 80, [], 1000)\n'
        '    IO.puts("connect: #{reason}")\n    x * 2'
    )
    outcome = pool.run(connect)
    if pool.isolation.network_isolated:
        assert outcome.status == "passed", outcome.output
        assert "connect: enetunreach" in outcome.output
    else:
        assert pool.isolation.description.startswith("none")


def test_candidates_do_not_see_each_other_or_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXFORGE_S3_SECRET_KEY", "host-secret")
    writer = program(
        "x * 2",
        before='File.write!("left-behind.txt", "x")\n'
        "defmodule Leaky do\n  def hello, do: :hi\nend\n"
        ":persistent_term.put(:leak, 1)\n",
    )
    reader = program(
        "x * 2",
        before='false = File.exists?("left-behind.txt")\n'
        "false = Code.ensure_loaded?(Leaky)\n"
        ":undefined = :persistent_term.get(:leak, :undefined)\n"
        'nil = System.get_env("EXFORGE_S3_SECRET_KEY")\n'
        "true = String.starts_with?(File.cwd!(), System.tmp_dir!())\n",
    )
    with SandboxPool(SandboxConfig(workers=1)) as pool:
        first, second, third = pool.map([writer, reader, GOOD])
    assert first.status == "passed" and first.worker_replaced  # persistent_term changed
    assert second.status == "passed", second.output
    assert third.status == "passed" and not third.worker_replaced


def test_strict_mode_gives_every_candidate_a_fresh_vm() -> None:
    with SandboxPool(SandboxConfig(workers=2, max_uses=1)) as pool:
        outcomes = pool.map([GOOD, HOSTILE["assertion"][0], GOOD])
        assert [o.status for o in outcomes] == ["passed", "failed", "passed"]
        assert all(o.worker_replaced for o in outcomes)
        assert pool.replaced == 3


def test_isolation_is_probed_and_described() -> None:
    found = isolation()
    assert found.description
    assert found.network_isolated == bool(found.prefix)


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
    assert classify_death("", 0) == "runtime_error"
