"""One validator for ShareGPT samples, real or synthetic (SSR), before they are trained on.

A valid sample is an optional system turn, then human/gpt turns alternating, starting
with human and ending with gpt, every turn non-empty; its meta (when present) is a
`SampleMeta`; and, given a token counter, it fits `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from schemas.records import SampleMeta, Turn

TokenCounter = Callable[[Sequence[dict[str, Any]]], int]
# The reason a sample is dropped for (as the instruct stage records it).
Reason = Literal["invalid_sharegpt", "too_many_tokens"]


@dataclass(frozen=True)
class Problem:
    reason: Reason
    message: str


def _invalid(message: str) -> Problem:
    return Problem("invalid_sharegpt", message)


def sharegpt_problems(
    sample: dict[str, Any], count_tokens: TokenCounter | None = None, max_tokens: int | None = None
) -> list[Problem]:
    """Why `sample` is not a valid training sample (empty: it is). Tokens are counted
    only for an otherwise valid sample."""
    turns = sample.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return [_invalid("conversations must be a list of at least two turns")]
    try:
        roles = [Turn.model_validate(turn).from_ for turn in turns]
        if "meta" in sample:
            SampleMeta.model_validate(sample["meta"])
    except ValidationError as exc:
        return [_invalid(f"invalid record: {exc.errors()[0]['msg']}")]
    problems = [
        _invalid(f"turn {i} is blank") for i, turn in enumerate(turns) if not turn["value"].strip()
    ]
    dialogue = roles[1:] if roles[0] == "system" else roles
    expected = ["human", "gpt"] * (len(dialogue) // 2)
    if len(dialogue) % 2 or dialogue != expected:
        problems.append(_invalid("turns must alternate human/gpt after an optional system turn"))
    if not problems and count_tokens is not None and max_tokens is not None:
        tokens = count_tokens(turns)
        if tokens > max_tokens:
            message = f"{tokens} tokens exceed the maximum of {max_tokens}"
            problems.append(Problem("too_many_tokens", message))
    return problems


def validate_sharegpt(
    sample: dict[str, Any], count_tokens: TokenCounter | None = None, max_tokens: int | None = None
) -> bool:
    return not sharegpt_problems(sample, count_tokens, max_tokens)
