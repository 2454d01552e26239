"""What every generator shares: the candidate sample, fences, specs and provenance.

A generator is a plain function `ParsedFile -> list[Candidate]`. A candidate is an
`InstructionSample` plus the Elixir code the instruct stage must check before it is
kept: each `Check` names the code and how strictly (`parse`: `Code.string_to_quoted`,
`compile`: Elixir compiles it, `test`: compile and run the ExUnit tests in it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from tree_sitter import Node

from exforge.elixir.tree import Finder, parsed
from schemas.records import (
    FunctionInfo,
    InstructionSample,
    ParsedFile,
    SampleMeta,
    SourceRef,
    Turn,
)

CheckLevel = Literal["parse", "compile", "test"]
FENCE_OPENERS = ("```elixir\n", "```iex\n", "```\n")
SPEC = b"@spec"
SPEC_HEAD = re.compile(r"^\s*([a-z_][\w?!]*)\s*(\((.*)\))?\s*::", re.DOTALL)


@dataclass(frozen=True)
class Check:
    code: str
    level: CheckLevel = "parse"
    # the file `code` was cut from (whole clauses or lines, maybe de-indented): a parse
    # check passes when the whole file parses
    within: str | None = field(default=None, repr=False, compare=False)
    # a `compile` check's code that compiles exactly when this does if Elixir expands
    # both alike (pipes unpiped, metadata aside): `code` is then not compiled again
    like: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Candidate:
    sample: InstructionSample
    checks: tuple[Check, ...] = field(default_factory=tuple)


def fenced(code: str) -> str:
    return f"```elixir\n{code.rstrip()}\n```"


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a turn, in order. A block opens with a `FENCE_OPENERS`
    line and ends before the next line that starts with three backticks (what the regex
    ```` ```(?:elixir|iex)?\\n(.*?)\\n``` ```` finds, by string searches: the regex would
    try its lazy `.*?` at every character of a block, and blocks are whole files)."""
    blocks = []
    start = text.find("```")
    while start != -1:
        opener = next((o for o in FENCE_OPENERS if text.startswith(o, start)), "")
        end = text.find("\n```", start + len(opener)) if opener else -1
        if end == -1:  # no block starts here: the next backtick may open one
            start = text.find("```", start + 1)
            continue
        blocks.append(text[start + len(opener) : end])
        start = text.find("```", end + 4)
    return blocks


def code_bytes(code: str) -> tuple[str, bytes]:
    """Code as it is parsed for a grade or a refactoring: ending in a newline (added when
    it has none), and its bytes. Both parse the same bytes, so a function's source is
    parsed once for both (`parsed` remembers the tree)."""
    source = code if code.endswith("\n") else code + "\n"
    return source, source.encode("utf-8", "surrogatepass")


def ref(file: ParsedFile, start: int | None = None, end: int | None = None) -> SourceRef:
    return SourceRef(
        source_id=file.source_id, path=file.path, sha256=file.sha256, start_line=start, end_line=end
    )


def function_ref(file: ParsedFile, function: FunctionInfo) -> SourceRef:
    return ref(file, function.start_line, function.end_line)


def candidate(
    kind: str,
    turns: list[tuple[str, str]],
    file: ParsedFile,
    refs: list[SourceRef],
    concepts: list[str] | None = None,
    checks: list[Check] | None = None,
    within: str | None = None,
) -> Candidate:
    """A sample of `kind` from (role, text) turns; stage and difficulty are set later
    (`streams.generators.grade`), checks default to parsing every gpt code block (cut
    verbatim from the file text `within`, when given)."""
    conversations = [Turn(from_=role, value=text) for role, text in turns]  # type: ignore[arg-type]
    if checks is None:
        checks = [
            Check(code, within=within)
            for role, text in turns
            if role == "gpt"
            for code in code_blocks(text)
        ]
    sample = InstructionSample(
        sample_id=InstructionSample.content_id(conversations, kind),
        conversations=conversations,
        meta=SampleMeta(
            kind=kind, stage=1, license=file.license, concepts=concepts or [], source_refs=refs
        ),
    )
    return Candidate(sample, tuple(checks))


def _arity(args: str | None) -> int:
    """Top-level comma count of a spec's argument list."""
    if args is None or not args.strip():
        return 0
    depth, count = 0, 1
    for char in args:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            count += 1
    return count


@lru_cache(maxsize=64)
def specs(text: str) -> dict[tuple[int, str, int], str]:
    """`@spec` source by (line of the spec, name, arity), read from the syntax tree (once
    per file text: two generators ask). Callers must not change the result.

    A spec is a unary `@` node whose text starts with `@spec`, not inside another: the
    bytes `@spec` are found in the text and each hit confirmed in the tree (the smallest
    named node over its `@` is the attribute starting there; text in a string or a
    comment is none), rather than visiting every node from Python; a text without
    them is not parsed. A later spec of the same key and line gives way to an earlier
    one."""
    data = text.encode()
    start = data.find(SPEC)
    if start == -1:
        return {}
    finder = Finder(parsed(data))  # the hits come in source order
    attributes: list[Node] = []
    end = -1  # where the last attribute found ends: one inside it is part of it
    while start != -1:
        node = finder.find_named(start, start + 1)
        if node.type == "unary_operator" and node.start_byte == start and start >= end:
            attributes.append(node)
            end = node.end_byte
        start = data.find(SPEC, start + 1)
    found: dict[tuple[int, str, int], str] = {}
    for node in reversed(attributes):
        source = data[node.start_byte : node.end_byte].decode()
        match = SPEC_HEAD.match(source.removeprefix("@spec"))
        if match:
            found[(node.start_point.row + 1, match.group(1), _arity(match.group(3)))] = source
    return found


def spec_of(function: FunctionInfo, file_specs: dict[tuple[int, str, int], str]) -> str | None:
    """The nearest `@spec` for the function's name/arity above its first clause."""
    best: tuple[int, str] | None = None
    for (line, name, arity), source in file_specs.items():
        matches = name == function.name and arity == function.arity
        if matches and line < function.start_line and (best is None or line > best[0]):
            best = (line, source)
    if best is None or function.start_line - best[0] > 3 + best[1].count("\n"):
        return None
    return best[1]


def module_source(text: str, start_line: int, end_line: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines[start_line - 1 : end_line]) + "\n"
