"""tree-sitter-elixir: the parser, and how exforge reads call nodes.

Comments are named nodes in tree-sitter's tree, wherever they sit; every reader here
leaves them out, so a comment between arguments is never taken for one.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import tree_sitter_elixir
from tree_sitter import Language, Node, Parser

LANGUAGE: Language = Language(tree_sitter_elixir.language())
COMMENT = "comment"

_local = threading.local()


def _parser() -> Parser:
    """One parser per thread (parsers are not thread-safe); the language is shared."""
    parser: Parser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = Parser(LANGUAGE)
        _local.parser = parser
    return parser


def parse(data: bytes) -> Node:
    """The root node of a file's syntax tree (tree-sitter alone: the parse stage's floor)."""
    return _parser().parse(data).root_node


@lru_cache(maxsize=128)
def parsed(data: bytes) -> Node:
    """`parse`, remembered for the most recently parsed texts: the instruct stage parses
    the same text more than once (a file for its `@spec`s and for the grade of its
    whole-file sample, a function for each of the refactorings tried on it), ~40% of
    its parsing. Trees are only read, so callers share them."""
    return parse(data)


def text(node: Node) -> str:
    """A node's source text (bytes that are not UTF-8 become U+FFFD)."""
    return node.text.decode("utf-8", "replace") if node.text is not None else ""


def arguments(call: Node) -> Node | None:
    """A call's `arguments` node: the child after its target, unless a comment sits
    between them."""
    second = call.child(1) if call.child_count > 1 else None
    if second is not None and second.type == "arguments":
        return second
    for child in call.children:
        if child.type == "arguments":
            return child
    return None


def named(node: Node) -> list[Node]:
    """A node's named children, comments left out."""
    return [child for child in node.named_children if child.type != COMMENT]


def first_named(node: Node) -> Node | None:
    """A node's first named child that is not a comment."""
    if not node.named_child_count:
        return None
    first = node.named_child(0)
    if first is None or first.type != COMMENT:
        return first
    for child in node.named_children:
        if child.type != COMMENT:
            return child
    return None


def argument_nodes(call: Node) -> list[Node]:
    """A call's arguments (the trailing keyword list is one), comments left out."""
    args = arguments(call)
    return [] if args is None else named(args)


def first_argument(call: Node) -> Node | None:
    args = arguments(call)
    return None if args is None else first_named(args)


def keyword_value(args: Node, key: str) -> Node | None:
    """The value of `key:` in the trailing keyword list of call arguments."""
    for child in args.named_children:
        if child.type != "keywords":
            continue
        for pair in child.named_children:
            if pair.type != "pair":
                continue
            key_node = pair.child_by_field_name("key")
            if (
                key_node is not None
                and key_node.text is not None
                and key_node.text.rstrip().rstrip(b":").decode() == key
            ):
                return pair.child_by_field_name("value")
    return None
