"""Elixir checks the code of every candidate's `gpt` turns before it is kept.

The checks of one candidate are `Code.string_to_quoted!` (`parse`) or
`Code.compile_string` (`compile`) calls; the code travels base64-encoded, so no quoting
can break out. The instruct stage runs them on the evaluator's pool of warm, sandboxed
BEAM VMs (`workers.evaluator.sandbox`), `batch` candidates per program: each candidate's
checks run in their own `try` and print a verdict line tagged with a per-program nonce;
the program ends with a one-test ExUnit module, so the run `passed` when the program ran
to its end. A batch that did not (a candidate halted or hung its VM) is run again one
candidate per program, so one bad candidate never decides another's fate.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence

from streams.generators.common import Check
from workers.evaluator.sandbox import Outcome, SandboxPool

PARSE_OR_COMPILE_ERROR = Outcome("syntax_error")
MARKER_TEST = """
defmodule ExforgeChecked do
  use ExUnit.Case, async: true
  test "checked", do: :ok
end
"""


def check_line(index: int, check: Check) -> str:
    code = base64.b64encode(check.code.encode()).decode()
    source = f'Base.decode64!("{code}")'
    if check.level == "compile":
        return f'Code.compile_string({source}, "check-{index}.ex")'
    return f'Code.string_to_quoted!({source}, file: "check-{index}.ex")'


def check_program(checks: Sequence[Check]) -> str:
    """An Elixir script that raises unless every check passes (what `elixir` runs)."""
    return "\n".join(check_line(i, c) for i, c in enumerate(checks)) + "\n"


def pool_program(checks: Sequence[Check]) -> str:
    """The same checks for the sandbox pool: `passed` when all succeed."""
    return check_program(checks) + MARKER_TEST


def failure_reason(checks: Sequence[Check], outcome: Outcome) -> str | None:
    """Why a candidate is dropped (None: it passed): the strictest level it was held to."""
    if outcome.status == "passed":
        return None
    if outcome.status in ("timeout", "memory"):
        return f"check_{outcome.status}"
    return "compile_failed" if any(c.level == "compile" for c in checks) else "parse_failed"


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
    batches = [candidates[i : i + batch] for i in range(0, len(candidates), batch)]
    nonces = [secrets.token_hex(8) for _ in batches]
    outcomes = pool.map([batch_program(b, n) for b, n in zip(batches, nonces, strict=True)])
    reasons: list[str | None] = []
    for group, nonce, outcome in zip(batches, nonces, outcomes, strict=True):
        verdicts = batch_verdicts(outcome, nonce, len(group))
        if verdicts is None:  # run one by one: who failed, and why
            alone = pool.map([pool_program(checks) for checks in group])
            reasons += [failure_reason(c, o) for c, o in zip(group, alone, strict=True)]
        else:
            reasons += [
                None if ok else failure_reason(c, PARSE_OR_COMPILE_ERROR)
                for c, ok in zip(group, verdicts, strict=True)
            ]
    return reasons
