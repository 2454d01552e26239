"""Elixir checks the code of every candidate's `gpt` turns before it is kept.

The checks of one candidate are `Code.string_to_quoted!` (`parse`) or
`Code.compile_string` (`compile`, and `test`: code with ExUnit tests that must pass)
calls; the code travels base64-encoded, so no quoting can break out. The instruct stage
runs them on the evaluator's pool of warm, sandboxed BEAM VMs
(`exforge.elixir.sandbox`), `batch` candidates per program: each candidate's checks
run in their own `try` and print a verdict line tagged with a per-program nonce; the
program ends with a one-test ExUnit module, so the run `passed` when the program ran to
its end. A batch that did not (a candidate halted or hung its VM) is run again one
candidate per program, so one bad candidate never decides another's fate. A candidate
with `test` checks runs alone: its own tests decide whether the program `passed`.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence

from exforge.elixir.sandbox import Outcome, SandboxPool
from streams.generators.common import Check

FAILED_CHECK = Outcome("syntax_error")
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


def batch_program(batch: Sequence[Sequence[Check]], nonce: str) -> str:
    """Every candidate's checks in a `try`, each printing `<nonce> <index> ok|failed`."""
    parts = []
    for index, checks in enumerate(batch):
        body = "\n".join(f"  {check_line(i, c)}" for i, c in enumerate(checks))
        parts.append(
            f'try do\n{body}\n  IO.puts("{nonce} {index} ok")\n'
            f'rescue\n  _ -> IO.puts("{nonce} {index} failed")\n'
            f'catch\n  _, _ -> IO.puts("{nonce} {index} failed")\nend'
        )
    return "\n".join(parts) + MARKER_TEST


def batch_verdicts(outcome: Outcome, nonce: str, size: int) -> list[bool] | None:
    """Per candidate: passed? None when the program did not run to its end."""
    found = dict(re.findall(rf"^{nonce} (\d+) (ok|failed)$", outcome.output, re.MULTILINE))
    if outcome.status != "passed" or len(found) != size:
        return None
    return [found[str(i)] == "ok" for i in range(size)]


def check_all(
    pool: SandboxPool, candidates: Sequence[Sequence[Check]], batch: int = 16
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
