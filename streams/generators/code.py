"""Generators over a file's code and docs: completion, fill-in-the-middle, doc ↔ code,
spec → code and doctests → ExUnit."""

from __future__ import annotations

import re
import textwrap

from schemas.records import Doctest, FunctionInfo, ParsedFile
from streams.generators.common import (
    Candidate,
    Check,
    candidate,
    fenced,
    function_ref,
    module_source,
    ref,
    spec_of,
    specs,
)

WHOLE_FILE_LINES = 300
LOOSE_OPERATORS = re.compile(r"\|>|(?<![=!<>])=(?![=~>])|<-|\bwhen\b|\|\||&&|\b(?:and|or|in)\b|::")


def _documented(function: FunctionInfo) -> bool:
    return function.public and bool(function.doc and function.doc.strip())


def completion(file: ParsedFile, text: str) -> list[Candidate]:
    """The whole file when it is short, else one sample per top-level module."""
    if file.lines <= WHOLE_FILE_LINES or not file.modules:
        chunks = [(text, 1, file.lines)]
    else:
        top, end = [], 0
        for module in file.modules:
            if module.start_line > end:
                top.append(module)
                end = module.end_line
        chunks = [
            (module_source(text, m.start_line, m.end_line), m.start_line, m.end_line) for m in top
        ]
    return [
        candidate(
            "completion",
            [("human", f"Write the Elixir source of `{file.path}`."), ("gpt", fenced(chunk))],
            file,
            [ref(file, start, end)],
            within=text,
        )
        for chunk, start, end in chunks
    ]


def fim_split(text: str, function: FunctionInfo) -> tuple[str, str, str]:
    """(prefix, suffix, middle) split at a definition's boundaries (whole lines)."""
    lines = text.splitlines(keepends=True)
    start, end = function.start_line - 1, function.end_line
    return "".join(lines[:start]), "".join(lines[end:]), "".join(lines[start:end])


def fim(file: ParsedFile, text: str) -> list[Candidate]:
    """One fill-in-the-middle sample: a definition picked by the file's hash is the middle."""
    functions = [f for f in file.functions if f.end_line - f.start_line < 40]
    if not functions:
        return []
    function = functions[int(file.sha256[:8], 16) % len(functions)]
    prefix, suffix, middle = fim_split(text, function)
    human = (
        f"Fill in the missing part of `{file.path}` between the prefix and the suffix.\n\n"
        f"Prefix:\n\n{fenced(prefix)}\n\nSuffix:\n\n{fenced(suffix)}"
    )
    return [
        candidate(
            "fim",
            [("human", human), ("gpt", fenced(middle))],
            file,
            [function_ref(file, function)],
            within=text,
        )
    ]


def doc_to_code_prompt(function: FunctionInfo, spec: str | None = None) -> str:
    typed = f"Typespec:\n\n{fenced(spec)}\n\n" if spec else ""
    return (
        f"Implement `{function.module}.{function.name}/{function.arity}` in Elixir.\n\n"
        f"Documentation:\n\n{function.doc}\n\n"
        f"{typed}Start from this head:\n\n{fenced(function.head)}"
    )


def doc_to_code(file: ParsedFile, text: str) -> list[Candidate]:
    """Documented public function: doc (+ spec) and head → implementation."""
    found = specs(text)
    return [
        candidate(
            "doc_to_code",
            [("human", doc_to_code_prompt(f, spec_of(f, found))), ("gpt", fenced(f.source))],
            file,
            [function_ref(file, f)],
            within=text,
        )
        for f in file.functions
        if _documented(f)
    ]


def spec_to_code(file: ParsedFile, text: str) -> list[Candidate]:
    """Undocumented public function with a spec: spec and name → implementation."""
    found = specs(text)
    out = []
    for f in file.functions:
        spec = spec_of(f, found)
        if not f.public or _documented(f) or spec is None:
            continue
        human = (
            f"Write `{f.module}.{f.name}/{f.arity}` so that it satisfies this typespec:"
            f"\n\n{fenced(spec)}"
        )
        out.append(
            candidate(
                "spec_to_code",
                [("human", human), ("gpt", fenced(f.source))],
                file,
                [function_ref(file, f)],
                within=text,
            )
        )
    return out


def doc_attribute(doc: str) -> str:
    body = doc if doc.endswith("\n") else doc + "\n"
    return f'@doc """\n{body}"""'


def code_to_doc(file: ParsedFile, text: str) -> list[Candidate]:
    """Implementation → the `@doc` its project wrote for it."""
    return [
        candidate(
            "code_to_doc",
            [
                (
                    "human",
                    f"Write the `@doc` for this function of `{f.module}`:\n\n{fenced(f.source)}",
                ),
                ("gpt", fenced(doc_attribute(f.doc or ""))),
            ],
            file,
            [function_ref(file, f)],
        )
        for f in file.functions
        if _documented(f) and '"""' not in (f.doc or "")
    ]


def _operand(code: str) -> str:
    """Parenthesised when it spans lines or holds an operator that binds looser than `==`."""
    loose = "\n" in code or LOOSE_OPERATORS.search(code) is not None
    return f"({code})" if loose else code


def _assertion(example: Doctest) -> str:
    if example.expected is None:
        return example.expression
    return f"assert {_operand(example.expression)} == {_operand(example.expected)}"


def test_module(module: str, examples: list[Doctest]) -> str:
    by_owner: dict[str, list[Doctest]] = {}
    for example in examples:
        by_owner.setdefault(example.owner, []).append(example)
    tests = [
        f'  test "{owner} examples" do\n'
        + "\n".join(textwrap.indent(_assertion(e), "    ") for e in owned)
        + "\n  end"
        for owner, owned in by_owner.items()
    ]
    return (
        f"defmodule {module}DoctestTest do\n  use ExUnit.Case, async: true\n\n"
        + "\n\n".join(tests)
        + "\nend\n"
    )


def _usable(example: Doctest) -> bool:
    return not (example.expected or "").lstrip().startswith("#")


def doctest_to_test(file: ParsedFile, text: str) -> list[Candidate]:
    """The doctests of each module → an ExUnit module asserting the same results, kept
    only when it passes against the file's own code (a `test` check)."""
    out = []
    for module in file.modules:
        examples = [
            e
            for e in file.analysis.doctests
            if (e.owner == module.name or e.owner.rsplit(".", 1)[0] == module.name) and _usable(e)
        ]
        if not examples:
            continue
        shown = "\n".join(
            f"iex> {e.expression}" + (f"\n{e.expected}" if e.expected else "") for e in examples
        )
        tests = test_module(module.name, examples)
        human = (
            f"Turn these `{module.name}` doctest examples into an ExUnit test module:\n\n"
            f"```iex\n{shown}\n```"
        )
        out.append(
            candidate(
                "doctest_to_test",
                [("human", human), ("gpt", fenced(tests))],
                file,
                [ref(file, module.start_line, module.end_line)],
                checks=[Check(f"{text}\n{tests}", "test")],
            )
        )
    return out
