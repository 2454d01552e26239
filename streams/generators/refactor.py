"""Refactoring pairs from real syntax-tree transformations; both sides must compile.

* `refactor_pipes`: nested calls `f(g(x, a), b)` ↔ pipe chains `x |> g(a) |> f(b)`.
  A function written with pipes gives (nested → its own pipes); one written with nested
  calls gives (its own nesting → pipes).
* `refactor_pattern_match`: a multi-clause function ↔ one clause that `case`s on the
  arguments' shapes; the pair asks for the multi-clause form.

Each side is checked by compiling it in a throwaway module together with the sibling
definitions it calls (`Check(level="compile")`). A pipes pair's rewritten side is
compiled only when Elixir does not expand it to the same code as the function's own side
(`Check.like`): `x |> f(a)` is `f(x, a)` by the definition of `|>` (`Macro.pipe`).
"""

from __future__ import annotations

import re

from tree_sitter import Node, Query, QueryCursor

from exforge.elixir.tree import LANGUAGE, arguments, first_named, named, parsed, text
from schemas.records import FunctionInfo, ParsedFile
from streams.generators.common import (
    Candidate,
    Check,
    candidate,
    code_bytes,
    fenced,
    function_ref,
)

NOT_PIPEABLE = frozenset(
    {
        "def",
        "defp",
        "defmacro",
        "defmacrop",
        "if",
        "unless",
        "case",
        "cond",
        "with",
        "for",
        "fn",
        "quote",
        "unquote",
        "unquote_splicing",
        "receive",
        "try",
        "raise",
        "throw",
        "super",
        "__block__",
    }
)
CHECK_MODULE = "ExforgeRefactorCheck"
OPERATORS = frozenset({"binary_operator", "unary_operator"})
PIPES = Query(LANGUAGE, '(binary_operator operator: "|>") @pipe')
CALLS = Query(LANGUAGE, "(call) @call")


def _pipeable_call(node: Node) -> bool:
    """A call with parenthesised arguments, no do-block, to a plain or remote name."""
    if node.type != "call" or any(c.type == "do_block" for c in node.children):
        return False
    args = arguments(node)
    target = node.child_by_field_name("target")
    if args is None or target is None or args.children[0].type != "(":
        return False
    if target.type == "identifier":
        return (target.text or b"").decode() not in NOT_PIPEABLE
    return target.type == "dot"


def _call_parts(data: bytes, call: Node) -> tuple[str, list[str]]:
    args = arguments(call)
    assert args is not None
    head = data[call.start_byte : args.start_byte].decode()
    return head, [text(a) for a in named(args)]


def _call(head: str, args: list[str]) -> str:
    return f"{head}({', '.join(args)})"


def is_operator(node: Node, operator: str) -> bool:
    found = node.child_by_field_name("operator") if node.type == "binary_operator" else None
    return found is not None and found.type == operator


def unpiped(data: bytes, node: Node) -> str | None:
    """A pipe chain as nested calls; None when a stage is not a parenthesised call."""
    if not is_operator(node, "|>"):
        return text(node)
    left = node.child_by_field_name("left")
    right = node.child_by_field_name("right")
    if left is None or right is None or not _pipeable_call(right):
        return None
    inner = unpiped(data, left)
    if inner is None:
        return None
    head, args = _call_parts(data, right)
    return _call(head, [inner, *args])


def piped(data: bytes, node: Node) -> tuple[str, int]:
    """Nested calls as a pipe chain and its number of stages (0: not a call to pipe)."""
    args = arguments(node) if _pipeable_call(node) else None
    first = None if args is None else first_named(args)
    if first is None or first.type == "keywords":
        code = text(node)
        return (f"({code})" if node.type in OPERATORS else code), 0
    inner, stages = piped(data, first)
    head, rest = _call_parts(data, node)
    return f"{inner} |> {_call(head, rest[1:])}", stages + 1


def pipe_stages(node: Node) -> int:
    """The stages `piped` makes of a node, without writing the chain."""
    stages = 0
    while True:
        args = arguments(node) if _pipeable_call(node) else None
        first = None if args is None else first_named(args)
        if first is None or first.type == "keywords":
            return stages
        stages += 1
        node = first


def _outermost(nodes: list[Node]) -> list[Node]:
    """The nodes not inside another of them, in source order."""
    out: list[Node] = []
    end = -1
    for node in sorted(nodes, key=lambda n: (n.start_byte, -n.end_byte)):
        if node.start_byte >= end:
            out.append(node)
            end = node.end_byte
    return out


def _rewrite(source: str, pick: str) -> str | None:
    """Rewrite the outermost pipes (`pick="unpipe"`) or nested calls of two stages or more
    (`"pipe"`) of a source. A query finds the pipes or calls (rather than a walk of every
    node from Python); a call that is not rewritten may hold one that is."""
    ended, data = code_bytes(source)
    root = parsed(data)
    if root.has_error:
        return None
    edits: list[tuple[int, int, str]] = []
    if pick == "unpipe":
        for node in _outermost(QueryCursor(PIPES).captures(root).get("pipe", [])):
            replacement = unpiped(data, node)
            if replacement is None:
                return None
            edits.append((node.start_byte, node.end_byte, replacement))
    else:
        calls = QueryCursor(CALLS).captures(root).get("call", [])
        chains = [c for c in calls if pipe_stages(c) >= 2]
        for node in _outermost(chains):
            replacement, _ = piped(data, node)
            parent = node.parent
            if parent is not None and parent.type in ("binary_operator", "unary_operator", "dot"):
                replacement = f"({replacement})"
            edits.append((node.start_byte, node.end_byte, replacement))
    if not edits:
        return None
    out = data
    for start, end, replacement in sorted(edits, reverse=True):
        out = out[:start] + replacement.encode() + out[end:]
    rewritten = out.decode()
    return rewritten if ended == source else rewritten.removesuffix("\n")


def _calls(source: str, function: FunctionInfo) -> bool:
    return re.search(rf"(?<![\w.:]){re.escape(function.name)}(?![\w?!])", source) is not None


# A name as Elixir writes a local call to it: word characters, maybe ending in `?` or `!`
# (not the start of `!=`), not after `.` or `:`.
NAME_RUN = re.compile(r"(?<![\w.:])\w+(?:[?!](?!=))?")
NAME = re.compile(r"\w+[?!]?")


class Siblings:
    """The definitions of one module, and which of them each source calls (found once per
    source: a definition's own source is a side of each pair made of it, and a callee in
    the check units of the definitions that call it)."""

    def __init__(self, functions: list[FunctionInfo]) -> None:
        self.functions = functions
        self._called: dict[str, list[int]] = {}
        # definitions by name, for names of word characters (maybe ending in `?` or `!`);
        # the others (operators) are looked for one by one
        self._named: dict[str, list[int]] = {}
        self._operators: list[int] = []
        for index, function in enumerate(functions):
            if NAME.fullmatch(function.name):
                self._named.setdefault(function.name, []).append(index)
            else:
                self._operators.append(index)

    def called_by(self, source: str) -> list[int]:
        """Indices of the definitions `source` calls, in definition order. A name of word
        characters (maybe ending in `?` or `!`) is called when it is a whole name there,
        not after `.` or `:` (what `_calls` finds, looked up in the set of such names);
        other names (operators) go to `_calls`."""
        if source not in self._called:
            names = set(NAME_RUN.findall(source)) & self._named.keys()
            called = [index for name in names for index in self._named[name]]
            called += [i for i in self._operators if _calls(source, self.functions[i])]
            self._called[source] = sorted(called)
        return self._called[source]

    def check_unit(self, source: str, exclude: int) -> str:
        """A module holding `source` and the definitions it calls, transitively (all but
        `exclude`, the definition `source` stands for)."""
        included: list[int] = []
        chosen = {exclude}
        frontier: list[int | None] = [None]  # None: `source` itself
        while frontier:
            current = frontier.pop()
            called = self.called_by(source if current is None else self.functions[current].source)
            for index in called:
                if index not in chosen:
                    chosen.add(index)
                    included.append(index)
                    frontier.append(index)
        body = "\n\n".join([source, *(self.functions[i].source for i in included)])
        indented = "\n".join(f"  {line}" if line else "" for line in body.splitlines())
        return f"defmodule {CHECK_MODULE} do\n{indented}\nend\n"


def module_siblings(file: ParsedFile) -> dict[str, Siblings]:
    """Each module's definitions, by module name."""
    by_module: dict[str, list[FunctionInfo]] = {}
    for function in file.functions:
        by_module.setdefault(function.module, []).append(function)
    return {name: Siblings(functions) for name, functions in by_module.items()}


def _pair(
    kind: str,
    file: ParsedFile,
    function: FunctionInfo,
    siblings: Siblings,
    before: str,
    after: str,
    ask: str,
    expands_alike: bool = False,
) -> Candidate:
    """A pair of sides of one function; `expands_alike`: the rewrite only moves pipes, so
    the rewritten side compiles exactly when the function does, if Elixir expands both
    to the same code (the check then compiles only the function's own side)."""
    itself = next(i for i, f in enumerate(siblings.functions) if f is function)
    human = f"{ask}\n\n{fenced(before)}"
    # the function's own side first: when it does not compile alone, the rewritten side
    # is not compiled at all
    own, rewritten = (
        siblings.check_unit(side, itself)
        for side in sorted((before, after), key=lambda side: side != function.source)
    )
    return candidate(
        kind,
        [("human", human), ("gpt", fenced(after))],
        file,
        [function_ref(file, function)],
        checks=[
            Check(own, "compile"),
            Check(rewritten, "compile", like=own if expands_alike else None),
        ],
    )


def refactor_pipes(file: ParsedFile, text: str) -> list[Candidate]:
    out = []
    modules = module_siblings(file)
    for function in file.functions:
        if "|>" in function.source:
            nested = _rewrite(function.source, "unpipe")
            if nested is not None:
                out.append(
                    _pair(
                        "refactor_pipes",
                        file,
                        function,
                        modules[function.module],
                        nested,
                        function.source,
                        "Rewrite this function with the pipe operator instead of nested calls.",
                        expands_alike=True,
                    )
                )
            continue
        chained = _rewrite(function.source, "pipe")
        if chained is not None:
            out.append(
                _pair(
                    "refactor_pipes",
                    file,
                    function,
                    modules[function.module],
                    function.source,
                    chained,
                    "Rewrite the nested calls of this function as pipe chains.",
                    expands_alike=True,
                )
            )
    return out


# --------------------------------------------------------------------- pattern matching


def _clauses(source: str) -> list[tuple[list[str], str | None, str]] | None:
    """(argument patterns, guard, body) of every clause; None when one is not simple."""
    data = code_bytes(source)[1]
    root = parsed(data)
    if root.has_error:
        return None
    clauses = []
    for clause in named(root):
        args = arguments(clause)
        head = None if args is None else first_named(args)
        if clause.type != "call" or args is None or head is None:
            return None
        guard = None
        if is_operator(head, "when"):
            guard_node = head.child_by_field_name("right")
            head = head.child_by_field_name("left")  # type: ignore[assignment]
            guard = text(guard_node) if guard_node else None
        head_args = arguments(head) if head is not None and head.type == "call" else None
        if head_args is None:
            return None
        patterns = [text(a) for a in named(head_args)]
        if any("\\\\" in p for p in patterns):
            return None
        body = _body(data, clause, args)
        if body is None:
            return None
        clauses.append((patterns, guard, body))
    return clauses


def dedent_after_first(text: str, columns: int) -> str:
    """Strip up to `columns` leading blanks from every line but the first."""
    first, *rest = text.split("\n")
    return "\n".join(
        [first, *(line[min(columns, len(line) - len(line.lstrip())) :] for line in rest)]
    )


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.split("\n"))


def _body(data: bytes, clause: Node, args: Node) -> str | None:
    block = next((c for c in clause.children if c.type == "do_block"), None)
    if block is not None:
        if any(c.type.endswith("_block") for c in block.named_children):
            return None  # rescue/catch/after/else blocks
        statements = named(block)
        if not statements:
            return None
        code = data[statements[0].start_byte : statements[-1].end_byte].decode()
        return dedent_after_first(code, statements[0].start_point.column)
    keywords = named(args)[-1]
    if keywords.type != "keywords" or len(keywords.named_children) != 1:
        return None
    pair = keywords.named_children[0]
    value = pair.child_by_field_name("value")
    key = pair.child_by_field_name("key")
    if value is None or key is None or text(key).strip() != "do:":
        return None
    return text(value)


def as_case(function: FunctionInfo) -> str | None:
    """A multi-clause function as one clause that `case`s on its arguments."""
    clauses = _clauses(function.source)
    if clauses is None or len(clauses) < 2 or function.arity == 0:
        return None
    names = [f"arg{i}" for i in range(1, function.arity + 1)]
    subject = names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"
    branches = []
    for patterns, guard, body in clauses:
        pattern = patterns[0] if len(patterns) == 1 else "{" + ", ".join(patterns) + "}"
        when = f" when {guard}" if guard else ""
        branches.append(f"    {pattern}{when} ->\n" + _indent(body, "      "))
    return (
        f"{function.kind} {function.name}({', '.join(names)}) do\n"
        f"  case {subject} do\n" + "\n\n".join(branches) + "\n  end\nend"
    )


def refactor_pattern_match(file: ParsedFile, text: str) -> list[Candidate]:
    out = []
    modules = module_siblings(file)
    for function in file.functions:
        single = as_case(function)
        if single is not None:
            out.append(
                _pair(
                    "refactor_pattern_match",
                    file,
                    function,
                    modules[function.module],
                    single,
                    function.source,
                    "Refactor this function: replace the `case` on its arguments with "
                    "multi-clause function heads that pattern match.",
                )
            )
    return out
