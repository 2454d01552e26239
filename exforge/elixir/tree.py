"""tree-sitter-elixir: the parser, how exforge finds nodes and reads call nodes.

Comments are named nodes in tree-sitter's tree, wherever they sit; every reader here
leaves them out, so a comment between arguments is never taken for one.

Nodes are found from byte offsets (tokens found in the text) with a `Finder`, never by
asking tree-sitter from the root: `Node.descendant_for_byte_range` and `Node.parent`
descend from the root, so each costs the depth of its node, and asking for every token
of deeply nested code (hostile or generated) is quadratic in its depth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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


class Finder:
    """The smallest node over each byte range asked for, like tree-sitter's
    `descendant_for_byte_range` from the root, in time linear in the tree for ranges asked
    in source order.

    The finder keeps the path from the root to its last answer; it climbs that path to
    the nearest node that also holds the next range and descends from there. Asked in
    order of start, it leaves a node only once the ranges have passed its end, so it
    enters each node at most once per pass over the file, whatever the nesting (from the
    root, one lookup costs the depth of its answer: nested `defmodule`s took 12 s at depth
    10,000). A range out of order is answered as well, climbing further. The path also
    gives parents and enclosing nodes without descending from the root again."""

    __slots__ = ("cursor", "path", "spans")

    def __init__(self, root: Node) -> None:
        # the cursor moves along the path (`Node.first_child_for_byte` is no help:
        # py-tree-sitter 0.26 crashes when no child is there)
        self.cursor = root.walk()
        self.path = [root]
        self.spans = [(root.start_byte, root.end_byte)]  # of the path's nodes

    def find(self, start: int, end: int) -> Node:
        """The smallest node, named or not, whose bytes hold `start`..`end`."""
        path, spans, cursor = self.path, self.spans, self.cursor
        # A node holds the range as tree-sitter's lookups take it: a node ending at
        # `start` does not hold an empty range there. Within a parent that holds the
        # range, the finder moves on to later siblings rather than asking the parent
        # for the child at `start`, which scans its children from the first (quadratic in
        # a node of many children, thousands of comments in one body).
        while len(spans) > 1:
            node_start, node_end = spans[-1]
            if node_start <= start and node_end >= end and node_end > start:
                break
            parent_end = spans[-2][1]
            # the parent holds the range, which does not start before this child
            if node_start <= start and parent_end >= end and parent_end > start:
                if node_end <= start and cursor.goto_next_sibling():
                    sibling = path[-1] = cursor.node
                    spans[-1] = (sibling.start_byte, sibling.end_byte)
                    continue
                path.pop()  # no child holds it (children come in order, apart)
                spans.pop()
                cursor.goto_parent()
                return path[-1]
            path.pop()
            spans.pop()
            cursor.goto_parent()
        while cursor.goto_first_child_for_byte(start) is not None:
            child = cursor.node
            node_start, node_end = child.start_byte, child.end_byte
            if not (node_start <= start and node_end >= end and node_end > start):
                cursor.goto_parent()
                break
            path.append(child)
            spans.append((node_start, node_end))
        return path[-1]

    def find_named(self, start: int, end: int) -> Node:
        """The smallest named node over `start`..`end` (`named_descendant_for_byte_range`)."""
        self.find(start, end)
        return next((node for node in reversed(self.path) if node.is_named), self.path[0])

    def parent(self, node: Node) -> Node | None:
        """The parent of a node on the path to the last answer (None: the root or off it)."""
        return self.enclosing(node, lambda _: True)

    def enclosing(self, node: Node, test: Callable[[Node], bool]) -> Node | None:
        """The nearest proper ancestor passing `test` of a node on the path to the last
        answer (None: none, or the node is off the path)."""
        path = self.path
        at = next((i for i in range(len(path) - 1, 0, -1) if path[i] == node), 0)
        return next((path[i] for i in range(at - 1, -1, -1) if test(path[i])), None)


def deeper_than(root: Node, limit: int) -> bool:
    """Whether some node lies more than `limit` levels below `root`.

    A node can have a descendant deeper than the limit only when it has more descendants
    than levels left to the limit, so the walk enters only such nodes: in ordinary code,
    the few largest subtrees (`descendant_count` is stored in the tree)."""
    cursor = root.walk()
    depth = 0
    while True:
        if depth > limit:
            return True
        if depth + cursor.node.descendant_count - 1 > limit and cursor.goto_first_child():
            depth += 1
            continue
        while not cursor.goto_next_sibling():
            if not cursor.goto_parent():
                return False
            depth -= 1


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
