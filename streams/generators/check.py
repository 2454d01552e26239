"""Elixir checks the code of every candidate's `gpt` turns before it is kept.

The checks of one candidate are `Code.string_to_quoted!` (`parse`) or
`Code.compile_string` (`compile`, and `test`: code with ExUnit tests that must pass)
calls; the code travels base64-encoded, so no quoting can break out. The instruct stage
runs them on the evaluator's pool of warm, sandboxed BEAM VMs
(`exforge.elixir.sandbox`), `batch` candidates per program. A program runs each
distinct check once (`unit`), however many candidates hold it, and remembers its
result; each candidate's verdict line, tagged with a per-program nonce, says whether
all of its checks passed, in order, stopping at the first that fails (so a refactor
pair whose original side does not compile is not compiled a second time). A parse
check of code cut from a file (`Check.within`: whole clauses or lines, maybe
de-indented) passes when the whole file parses: a complete piece of a file Elixir
accepts is accepted alone (the corpus tests hold every generator to it); the piece is
parsed alone only when the file is not. The
program ends with a `done` line; a batch that did not reach it (a candidate halted or
hung its VM) is run again one candidate per program, so one bad candidate never decides
another's fate. A candidate with `test` checks runs alone: its own tests decide
whether the program `passed`.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence

from exforge.elixir.sandbox import Outcome, SandboxPool
from streams.generators.common import Check

FAILED_CHECK = Outcome("syntax_error")
PROGRAM_CANDIDATES = 16  # candidates that share one program
MARKER_TEST = """
defmodule ExforgeChecked do
  use ExUnit.Case, async: true
  test "checked", do: :ok
end
"""


def check_line(index: int, check: Check) -> str:
    code = base64.b64encode(check.code.encode()).decode()
    source = f'Base.decode64!("{code}")'
    if check.level in ("compile", "test"):
        return f'Code.compile_string({source}, "check-{index}.ex")'
    return f'Code.string_to_quoted!({source}, file: "check-{index}.ex")'


def tested(checks: Sequence[Check]) -> bool:
    return any(c.level == "test" for c in checks)


def check_lines(checks: Sequence[Check]) -> str:
    return "\n".join(check_line(i, c) for i, c in enumerate(checks)) + "\n"


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


class Units:
    """The distinct checks of one program, numbered in order of first use."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}

    def of(self, check: Check) -> int:
        return self.index.setdefault((check.code, check.level), len(self.index))

    def expression(self, check: Check) -> str:
        """Elixir that is true when `check` passes (running each unit at most once)."""
        own = f"run.({self.of(check)}) == :ok"
        if check.level != "parse" or check.within is None:
            return own
        whole = self.of(Check(check.within))
        return f"(run.({whole}) == :ok or {own})"

    def definitions(self) -> str:
        lines = [
            f"  {i} => fn -> {check_line(i, Check(code, level))} end"  # type: ignore[arg-type]
            for (code, level), i in self.index.items()
        ]
        return "units = %{\n" + ",\n".join(lines) + "\n}\n"


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
      result

    result ->
      result
  end
end
"""


def batch_program(batch: Sequence[Sequence[Check]], nonce: str) -> str:
    """Every candidate's verdict, `<nonce> <index> ok|failed`, then `<nonce> done`."""
    units = Units()
    verdicts = []
    for index, checks in enumerate(batch):
        passed = " and ".join(units.expression(c) for c in checks) or "true"
        verdicts.append(f'IO.puts("{nonce} {index} " <> if({passed}, do: "ok", else: "failed"))')
    return units.definitions() + RUN_UNIT + "\n".join(verdicts) + f'\nIO.puts("{nonce} done")\n'


def batch_verdicts(outcome: Outcome, nonce: str, size: int) -> list[bool] | None:
    """Per candidate: passed? None when the program did not run to its end."""
    found = dict(re.findall(rf"^{nonce} (\d+) (ok|failed)$", outcome.output, re.MULTILINE))
    done = re.search(rf"^{nonce} done$", outcome.output, re.MULTILINE) is not None
    if not done or len(found) != size:
        return None
    return [found[str(i)] == "ok" for i in range(size)]


def check_all(
    pool: SandboxPool, candidates: Sequence[Sequence[Check]], batch: int = PROGRAM_CANDIDATES
) -> list[str | None]:
    """The failure reason (None: passed) of each candidate's checks, in order."""
    reasons: dict[int, str | None] = {}
    alone = [i for i, checks in enumerate(candidates) if tested(checks)]
    shared = [i for i, checks in enumerate(candidates) if not tested(checks)]
    batches = [shared[i : i + batch] for i in range(0, len(shared), batch)]
    nonces = [secrets.token_hex(8) for _ in batches]
    programs = [
        batch_program([candidates[i] for i in group], nonce)
        for group, nonce in zip(batches, nonces, strict=True)
    ]
    outcomes = pool.map(programs)
    for group, nonce, outcome in zip(batches, nonces, outcomes, strict=True):
        verdicts = batch_verdicts(outcome, nonce, len(group))
        if verdicts is None:  # run one by one: who failed, and why
            alone += group
            continue
        for index, ok in zip(group, verdicts, strict=True):
            reasons[index] = None if ok else failure_reason(candidates[index], FAILED_CHECK)
    single = pool.map([pool_program(candidates[i]) for i in alone])
    for index, outcome in zip(alone, single, strict=True):
        reasons[index] = failure_reason(candidates[index], outcome)
    return [reasons[i] for i in range(len(candidates))]
