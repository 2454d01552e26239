"""Elixir syntax analysis on tree-sitter-elixir: modules, functions and their docs.

Pure functions, no I/O. `analyse` parses a file once and reads modules (`defmodule`,
`defprotocol`, `defimpl`, wherever they are), their `@moduledoc`, and the functions and
macros each module body defines when it runs: in the body and inside any expression of
it (`if`/`unless`/`case`/`for`, `describe` and other calls with blocks, `fn` bodies), but
not in a function's body, not inside `quote`, not inside a nested module (which has its
own) and not inside other `def*` macros (`defstruct`, `defguard`, DSL macros), whose
expansion is unknown here. Definitions are grouped by (name, arity, kind) with the
`@doc` that precedes the first clause in the order the body runs. Elixir's own parser
agrees on every file of the real-code corpus (`tests/test_corpus.py`).

Conventions:

* Line numbers are 1-based and inclusive.
* `FunctionInfo.source` is the text of every clause, each de-indented by the column its
  `def` starts at, joined with a blank line; `head` is de-indented the same way.
* Docs are the string values Elixir would store: heredocs lose the indentation of their
  closing delimiter and keep their final newline (`\\r\\n` inside a heredoc becomes
  `\\n`, where Elixir 1.14 keeps it); escapes are processed except in
  uppercase sigils (`~S`). `@doc false`, a missing doc and a doc that is not a literal
  give None; an interpolated doc is kept with its `#{...}` source text.
* Definitions whose name is computed (`def unquote(name)(x)`) are skipped.
* Types and callbacks (`@type`, `@typep`, `@opaque`, `@callback`, `@macrocallback`),
  behaviours (`use X`, `@behaviour X`) and `@impl`-marked definitions are read from the
  same module bodies; `exforge.elixir.features` adds what needs the whole tree (pipes,
  patterns, processes, macros, ExUnit, supervision trees, doctests, metrics).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import cache

from pydantic import TypeAdapter
from tree_sitter import Node

from exforge.elixir.definitions import Behaviour, Definitions
from exforge.elixir.features import features
from exforge.elixir.tree import (
    Finder,
    arguments,
    first_argument,
    first_named,
    keyword_value,
    named,
    parse,
)
from schemas.records import ElixirAnalysis, FunctionInfo, ModuleInfo, TypeInfo

__all__ = [
    "Behaviour",
    "Definitions",
    "FileAnalysis",
    "analyse",
    "definitions",
    "file_analysis",
    "normalise",
]

_MODULE_KEYWORDS: tuple[bytes, ...] = (b"defmodule", b"defprotocol", b"defimpl")
_DEF_KINDS: frozenset[str] = frozenset({"def", "defp", "defmacro", "defmacrop"})
_MODULE_KEYWORD_NAMES: frozenset[str] = frozenset(k.decode() for k in _MODULE_KEYWORDS)
# Expressions that hold no definition whatever their text.
_LEAVES: frozenset[str] = frozenset(
    {"string", "charlist", "sigil", "comment", "atom", "quoted_atom", "alias", "identifier"}
    | {"integer", "float", "char", "boolean", "nil", "keyword", "quoted_keyword"}
)
# Bytes every definition or module attribute holds: an expression without any of them
# is not walked into.
_DEFINITION_MARKS = re.compile(rb"def|@")
_STRING_TYPES: frozenset[str] = frozenset({"string", "charlist"})
_HEREDOC_DELIMITERS: frozenset[bytes] = frozenset({b'"""', b"'''"})
_DOC_SIGILS: frozenset[str] = frozenset({"S", "s"})
_TYPE_KINDS: frozenset[str] = frozenset({"type", "typep", "opaque", "callback", "macrocallback"})
# The module attributes the walk reads (`@spec` and the rest are passed over).
_READ_ATTRIBUTES: frozenset[str] = _TYPE_KINDS | {"behaviour", "impl", "doc", "moduledoc"}
_AT = ord("@")

# Validates a whole file's functions in one call (cheaper than one model call each).
_FUNCTIONS = TypeAdapter(list[FunctionInfo])


@dataclass(frozen=True)
class FileAnalysis:
    modules: list[ModuleInfo] = field(default_factory=list)
    functions: list[FunctionInfo] = field(default_factory=list)
    has_errors: bool = False
    lines: int = 0
    details: ElixirAnalysis = field(default_factory=ElixirAnalysis)


def normalise(source: str) -> str:
    """Canonical text for exact-duplicate hashing.

    `\\r\\n` and `\\r` become `\\n`, a leading byte-order mark is dropped, trailing
    whitespace is stripped from every line, leading and trailing blank lines are removed
    and the result ends with exactly one newline ("" when nothing is left).
    """
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = list(map(str.rstrip, text.split("\n")))
    start = 0
    end = len(lines)
    while start < end and not lines[start]:
        start += 1
    while end > start and not lines[end - 1]:
        end -= 1
    if start == end:
        return ""
    return "\n".join(lines[start:end]) + "\n"


def analyse(source: str, data: bytes | None = None, root: Node | None = None) -> FileAnalysis:
    """Parse one Elixir file (unless its bytes and tree are given) and extract its
    modules, functions and features."""
    if data is None or root is None:
        data = source.encode("utf-8", "surrogatepass")
        root = parse(data)
    found = definitions(data, root)
    return file_analysis(source, root, found, features(source, data, root, found))


def definitions(data: bytes, root: Node) -> Definitions:
    """The modules, functions, types and behaviours of a parsed file (`data`, its bytes)."""
    return _Extractor(data).run(root)


def file_analysis(
    source: str, root: Node, found: Definitions, details: ElixirAnalysis
) -> FileAnalysis:
    """`analyse`'s result from its parts: the tree, its definitions and its features."""
    return FileAnalysis(
        modules=found.modules,
        functions=found.functions,
        has_errors=root.has_error,
        lines=source.count("\n") + (1 if source and not source.endswith("\n") else 0),
        details=details,
    )


# --------------------------------------------------------------------------- helpers


def _dedent_heredoc(raw: str) -> str:
    """Elixir's heredoc rule: drop the opening line, strip up to the closing indentation."""
    lines = raw.split("\n")
    if len(lines) < 2:
        return raw
    closing = lines[-1].rstrip("\r")
    indent = len(closing) if not closing.strip(" \t") else 0
    out: list[str] = []
    for line in lines[1:-1]:
        line = line.removesuffix("\r")
        if indent:
            lead = len(line) - len(line.lstrip(" \t"))
            line = line[min(lead, indent) :]
        out.append(line)
        out.append("\n")
    return "".join(out)


_ESCAPE = re.compile(
    r"\\(x\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{1,2}|u\{[0-9a-fA-F]+\}|u[0-9a-fA-F]{4}|\r?\n|.)",
    re.DOTALL,
)
_SIMPLE_ESCAPES: dict[str, str] = {
    "a": "\a",
    "b": "\b",
    "d": "\x7f",
    "e": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "s": " ",
    "t": "\t",
    "v": "\v",
    "0": "\0",
}


def _escape_value(match: re.Match[str]) -> str:
    esc = match.group(1)
    if len(esc) > 1 and esc[0] in "xu":
        digits = esc[1:].strip("{}")
        try:
            return chr(int(digits, 16))
        except (ValueError, OverflowError):
            return esc
    if esc in ("\n", "\r\n"):
        return ""  # line continuation
    return _SIMPLE_ESCAPES.get(esc, esc)


def _unescape(text: str) -> str:
    return _ESCAPE.sub(_escape_value, text) if "\\" in text else text


def _dedent_block(text: str, indent: int) -> str:
    """Strip up to `indent` leading blanks from every line but the first."""
    if not indent or "\n" not in text:
        return text
    pad = "\n" + " " * indent
    if "\t" not in text and text.count("\n ") == text.count(pad):
        return text.replace(pad, "\n")  # every indented line has `indent` spaces or more
    return _line_indent(indent).sub("\n", text)


@cache
def _line_indent(indent: int) -> re.Pattern[str]:
    """A line break and up to `indent` blanks after it."""
    return re.compile(rf"\n[ \t]{{1,{indent}}}")


def _signature(data: bytes, head: Node) -> tuple[str, int] | None:
    """(name, arity) of a definition head (in `data`); None when the name is computed."""
    node: Node | None = head
    while node is not None and node.type == "binary_operator":
        op = node.child_by_field_name("operator")
        if op is None or op.type != "when":
            break
        node = node.child_by_field_name("left")
    if node is None:
        return None
    kind = node.type
    name: str | None = None
    arity = 0
    if kind == "call":
        target = node.child_by_field_name("target")
        if target is None or target.type != "identifier":
            return None
        name = data[target.start_byte : target.end_byte].decode()
        args = arguments(node)
        if args is not None:
            arity = args.named_child_count
            if data.find(b"#", args.start_byte, args.end_byte) != -1:  # maybe comments
                arity = len(named(args))
    elif kind == "identifier":
        name = data[node.start_byte : node.end_byte].decode()
    elif kind in ("binary_operator", "unary_operator"):
        op = node.child_by_field_name("operator")
        name = op.type if op is not None else None
        arity = 2 if kind == "binary_operator" else 1
    if not name or name.startswith("unquote"):
        return None
    return name, arity


def _clean_alias(text: str) -> str:
    return "".join(text.split())


def _strip_elixir_prefix(name: str) -> str:
    return name[7:] if name.startswith("Elixir.") else name


@dataclass(slots=True)
class _Group:
    module: str
    name: str
    arity: int
    kind: str
    doc: str | None
    head: str
    sources: list[str]
    start_line: int
    end_line: int
    start_byte: int


@dataclass
class _Body:
    """Walking state for one module body."""

    module: str
    groups: list[_Group]
    found: _Found
    by_key: dict[tuple[str, int, str], _Group] = field(default_factory=dict)
    doc: str | None = None  # the pending `@doc`
    moduledoc: str | None = None
    impl: bool = False  # an `@impl` (other than `@impl false`) waits for its definition


@dataclass
class _Found:
    """Per-file accumulators of the module walk."""

    types: list[TypeInfo] = field(default_factory=list)
    behaviours: list[Behaviour] = field(default_factory=list)
    impls: dict[str, set[str]] = field(default_factory=dict)


class _Extractor:
    """Walks one parsed file; holds the source bytes for slicing."""

    __slots__ = ("data", "marks")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.marks = [m.start() for m in _DEFINITION_MARKS.finditer(data)]

    def text(self, start: int, end: int) -> str:
        return self.data[start:end].decode("utf-8", "replace")

    def node_text(self, node: Node) -> str:
        return self.text(node.start_byte, node.end_byte)

    # ---------------------------------------------------------------- modules

    def run(self, root: Node) -> Definitions:
        found = self.module_calls(root)
        modules: list[ModuleInfo] = []
        groups: list[_Group] = []
        acc = _Found()
        stack: list[tuple[int, str]] = []  # (end_byte, full name) of enclosing modules
        for node in found:
            while stack and stack[-1][0] <= node.start_byte:
                stack.pop()
            parent = stack[-1][1] if stack else None
            target = node.child_by_field_name("target")
            args = arguments(node)
            if target is None or target.text is None or args is None:
                continue
            names = self.module_names(target.text.decode(), args, parent)
            if not names:
                continue
            body = self.module_body(node, args)
            for name in names:  # `defimpl P, for: [A, B]` defines P.A and P.B
                moduledoc = self.collect(body, name, groups, acc)
                modules.append(
                    ModuleInfo(
                        name=name,
                        moduledoc=moduledoc,
                        start_line=node.start_point.row + 1,
                        end_line=node.end_point.row + 1,
                    )
                )
            stack.append((node.end_byte, names[0]))
        groups.sort(key=lambda g: g.start_byte)
        functions = _FUNCTIONS.validate_python(
            [
                {
                    "module": g.module,
                    "name": g.name,
                    "arity": g.arity,
                    "kind": g.kind,
                    "doc": g.doc,
                    "head": g.head,
                    "source": "\n\n".join(g.sources),
                    "start_line": g.start_line,
                    "end_line": g.end_line,
                }
                for g in groups
            ]
        )
        clauses = {(g.module, g.name, g.arity, g.kind): len(g.sources) for g in groups}
        return Definitions(modules, functions, clauses, acc.types, acc.behaviours, acc.impls)

    def module_calls(self, root: Node) -> list[Node]:
        """Every `defmodule`/`defprotocol`/`defimpl` call, in source order.

        Rather than visiting every node from Python, find the keywords with a byte search
        and keep the hits that are the target identifier of a call (not text in a string,
        comment or longer identifier).
        """
        data = self.data
        calls: list[Node] = []
        finder = Finder(root)
        for keyword in _MODULE_KEYWORDS:
            size = len(keyword)
            pos = data.find(keyword)
            while pos != -1:
                end = pos + size
                node = finder.find(pos, end)
                if node.type == "identifier" and node.start_byte == pos and node.end_byte == end:
                    call = finder.parent(node)
                    if call is not None and call.type == "call":
                        target = call.child_by_field_name("target")
                        if target is not None and target.start_byte == pos:
                            calls.append(call)
                pos = data.find(keyword, end)
        calls.sort(key=lambda n: n.start_byte)
        return calls

    def alias_name(self, node: Node, parent: str | None) -> str | None:
        """An alias-like expression as an absolute module name (no nesting applied)."""
        kind = node.type
        if kind == "alias":
            return _strip_elixir_prefix(_clean_alias(self.node_text(node)))
        if kind == "identifier" and node.text == b"__MODULE__":
            return parent
        if kind == "dot":
            left = node.child_by_field_name("left")
            right = node.child_by_field_name("right")
            if (
                left is not None
                and right is not None
                and left.text == b"__MODULE__"
                and right.type == "alias"
            ):
                if parent is None:
                    return None
                return f"{parent}.{_clean_alias(self.node_text(right))}"
        if kind == "atom":
            return _strip_elixir_prefix(self.node_text(node)[1:])
        if kind == "quoted_atom":
            content = [c for c in node.named_children if c.type == "quoted_content"]
            return _strip_elixir_prefix("".join(self.node_text(c) for c in content))
        text = self.node_text(node).strip()
        return text or None

    def module_names(self, keyword: str, args: Node, parent: str | None) -> list[str]:
        """The modules a module call defines: one, or one per `for:` type of a
        `defimpl` given a list."""
        first = first_named(args)
        if first is None or first.type == "keywords":
            return []
        if keyword == "defimpl":
            protocol = self.alias_name(first, parent)
            if protocol is None:
                return []
            target = keyword_value(args, "for")
            if target is None:
                fors = [parent]
            elif target.type == "list":
                fors = [self.alias_name(t, parent) for t in named(target)]
            else:
                fors = [self.alias_name(target, parent)]
            modules = [f"{protocol}.{impl_for}" for impl_for in fors if impl_for]
            return modules or [protocol]
        if first.type == "alias" and parent is not None:
            alias = _clean_alias(self.node_text(first))
            if not alias.startswith("Elixir."):
                return [f"{parent}.{alias}"]
        name = self.alias_name(first, parent)
        return [name] if name else []

    def module_body(self, call: Node, args: Node) -> list[Node]:
        for child in call.children:
            if child.type == "do_block":
                return child.named_children
        value = keyword_value(args, "do")
        if value is None:
            return []
        if value.type == "block":
            return value.named_children
        return [value]

    # -------------------------------------------------------------- functions

    def collect(
        self, statements: list[Node], module: str, groups: list[_Group], found: _Found
    ) -> str | None:
        """Record the definitions among `statements`; return the module's `@moduledoc`."""
        body = _Body(module=module, groups=groups, found=found)
        self._walk_body(statements, body)
        return body.moduledoc

    def _walk_body(self, statements: list[Node], body: _Body) -> None:
        """Read a body's expressions in order: definitions and attributes, and inside
        whatever else may hold one (comments and literals are passed over)."""
        for stmt in statements:
            kind = stmt.type
            if kind in _LEAVES:
                continue
            if kind == "unary_operator" and self.data[stmt.start_byte] == _AT:
                self._attribute(stmt, body)
                continue
            target = stmt.child_by_field_name("target") if kind == "call" else None
            if (
                target is not None
                and target.type == "identifier"
                and not self._call(stmt, self.node_text(target), body)
            ):
                continue
            if self._may_define(stmt):
                self._walk_body(stmt.named_children, body)

    def _call(self, stmt: Node, keyword: str, body: _Body) -> bool:
        """Read a call by its name; whether its arguments and block may still define."""
        if keyword in _DEF_KINDS or keyword == "defdelegate":
            doc = body.doc
            body.doc = None
            self._clause(stmt, keyword, doc, body)
            body.impl = False
            return False
        if keyword == "use":
            self._behaviour(stmt, "use", body)
            return False
        if keyword in _MODULE_KEYWORD_NAMES or keyword == "quote":
            return False  # a nested module has its own body; quoted code defines nothing
        if keyword.startswith("def"):
            body.doc = None  # defstruct, defguard, defexception... take the pending doc
            return False
        return True

    def _may_define(self, node: Node) -> bool:
        """Whether a definition mark (`def`, `@`) lies in the node's text."""
        at = bisect_left(self.marks, node.start_byte)
        return at < len(self.marks) and self.marks[at] < node.end_byte

    def _attribute(self, stmt: Node, body: _Body) -> None:
        if self.data[stmt.start_byte] != _AT:  # unary operators are prefixes: this is no `@`
            return
        operand = stmt.child_by_field_name("operand")
        if operand is None or operand.type != "call":
            return
        target = operand.child_by_field_name("target")
        if target is None or target.type != "identifier":
            return
        name = self.node_text(target)
        if name not in _READ_ATTRIBUTES:
            return
        if name == "behaviour":
            self._behaviour(operand, "behaviour", body)
            return
        value = first_argument(operand)
        if name == "impl":
            body.impl = value is not None and self.node_text(value) != "false"
        elif value is None:
            return
        elif name in _TYPE_KINDS:
            self._type(value, name, body)
        elif value.type in ("keywords", "list"):
            return  # metadata such as `@doc since: "1.2"` leaves the doc alone
        elif name == "doc":
            body.doc = self.literal(value)
        else:
            body.moduledoc = self.literal(value)

    def _type(self, value: Node, kind: str, body: _Body) -> None:
        """`@type name(args) :: spec` (also `when` clauses of callbacks): name and arity."""
        node = value
        while node.type == "binary_operator":
            op = node.child_by_field_name("operator")
            left = node.child_by_field_name("left")
            if op is None or left is None or op.type not in ("when", "::"):
                break
            node = left
        signature = _signature(self.data, node)
        if signature is not None:
            body.found.types.append(
                TypeInfo(
                    module=body.module,
                    name=signature[0],
                    arity=signature[1],
                    kind=kind,  # type: ignore[arg-type]
                    line=value.start_point.row + 1,
                )
            )

    def _behaviour(self, call: Node, via: str, body: _Body) -> None:
        first = first_argument(call)
        if first is None or first.type not in ("alias", "atom", "dot", "identifier"):
            return
        name = self.alias_name(first, body.module)
        if name:
            body.found.behaviours.append(Behaviour(body.module, name, via))

    def literal(self, node: Node) -> str | None:
        """The value of a string, charlist or `~S`/`~s` sigil literal; None otherwise."""
        kind = node.type
        raw_mode = False
        if kind == "sigil":
            sigil_name = next((c for c in node.children if c.type == "sigil_name"), None)
            if sigil_name is None or sigil_name.text is None:
                return None
            letter = sigil_name.text.decode()
            if letter not in _DOC_SIGILS:
                return None
            raw_mode = letter.isupper()
        elif kind not in _STRING_TYPES:
            return None
        start = node.child_by_field_name("quoted_start")
        end = node.child_by_field_name("quoted_end")
        if start is None or end is None or end.is_missing:
            return None
        value_start = start.end_byte
        value = self.text(value_start, end.start_byte)
        if self.data[start.start_byte : value_start] in _HEREDOC_DELIMITERS:
            value = _dedent_heredoc(value)
        return value if raw_mode else _unescape(value)

    def _clause(
        self,
        stmt: Node,
        keyword: str,
        doc: str | None,
        body: _Body,
    ) -> None:
        head_node = first_argument(stmt)
        if head_node is None or head_node.type == "keywords":
            return
        signature = _signature(self.data, head_node)
        if signature is None:
            return
        name, arity = signature
        kind = "def" if keyword == "defdelegate" else keyword
        if body.impl:
            body.found.impls.setdefault(body.module, set()).add(f"{name}/{arity}")
        # When only blanks precede the clause on its line, de-indent its later lines by
        # as many columns (Elixir-heredoc style: never strip more than blanks).
        start = stmt.start_byte
        row, column = stmt.start_point
        end_row = stmt.end_point.row
        indent = 0
        if column and not self.data[start - column : start].strip(b" \t"):
            indent = column
        source = _dedent_block(self.text(start, stmt.end_byte), indent)
        key = (name, arity, kind)
        group = body.by_key.get(key)
        if group is None:
            head = _dedent_block(self.text(start, head_node.end_byte), indent)
            group = _Group(
                module=body.module,
                name=name,
                arity=arity,
                kind=kind,
                doc=doc,
                head=head,
                sources=[source],
                start_line=row + 1,
                end_line=end_row + 1,
                start_byte=start,
            )
            body.by_key[key] = group
            body.groups.append(group)
        else:
            group.sources.append(source)
            group.end_line = max(group.end_line, end_row + 1)
