"""Whole-file features of an Elixir file: tokens found in the text, then plain counting.

Everything that needs nodes anywhere in the tree (pipes, pattern matches, process
primitives, macros, ExUnit, supervision trees) comes from the tokens that show it: the
binary operators counted, `fn`, comments and calls by name are found in the text and
confirmed in the tree (cheaper than any walk of the whole tree, a tree-sitter query's
too); Python only looks at those nodes, so the cost stays close to parsing alone.
Doctests come from the docs the module walk read; metrics from the text, but for the
nesting of do-blocks and anonymous functions, which a query finds.

Conventions:

* `complexity` is 1 + branch points: each extra clause of a function, each extra clause
  of a `case`/`cond`/`receive`/`try`/`with ... else`/`fn`, each `if`/`unless`, and each
  `and`/`or`/`&&`/`||`/`when`.
* A line is a comment line when only blanks precede the comment that starts on it.
* `destructuring` counts `=` and `<-` whose left side is a tuple, list, map or struct,
  binary or `<>`/`|` pattern.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable
from typing import NamedTuple, TypeGuard

import numpy as np
from tree_sitter import Node, Query, QueryCursor

from exforge.elixir.definitions import Definitions
from exforge.elixir.hashing import WORD_BYTES, tokens
from exforge.elixir.tree import COMMENT, LANGUAGE, Finder, argument_nodes, named, text
from schemas.records import (
    BehaviourUse,
    CodeMetrics,
    Doctest,
    ElixirAnalysis,
    FunctionInfo,
    ModuleInfo,
    SupervisionTree,
)

__all__ = [
    "OTP_CALLBACKS",
    "Grading",
    "code_metrics",
    "doctests",
    "features",
    "grading",
    "grading_of",
    "nesting",
]

NESTING_QUERY = Query(LANGUAGE, "[(do_block) (anonymous_function)] @nesting")

# Callbacks of the process behaviours a module can adopt with `use`/`@behaviour`.
OTP_CALLBACKS: dict[str, frozenset[str]] = {
    "GenServer": frozenset(
        {
            "init/1",
            "handle_call/3",
            "handle_cast/2",
            "handle_info/2",
            "handle_continue/2",
            "terminate/2",
            "code_change/3",
            "format_status/1",
            "format_status/2",
            "child_spec/1",
        }
    ),
    "Supervisor": frozenset({"init/1", "child_spec/1"}),
    "DynamicSupervisor": frozenset({"init/1", "child_spec/1"}),
    "Agent": frozenset({"child_spec/1"}),
    "Task": frozenset({"child_spec/1"}),
    "GenStage": frozenset(
        {
            "init/1",
            "handle_demand/2",
            "handle_events/3",
            "handle_subscribe/4",
            "handle_cancel/3",
            "handle_call/3",
            "handle_cast/2",
            "handle_info/2",
            "terminate/2",
            "code_change/3",
            "format_status/2",
        }
    ),
    "Application": frozenset(
        {"start/2", "stop/1", "prep_stop/1", "start_phase/3", "config_change/3"}
    ),
    "Registry": frozenset(),
}
# Modules whose calls show a file works with an OTP abstraction it does not adopt.
_CALLED_OTP = ("Registry", "Agent", "Task", "GenServer", "Supervisor", "DynamicSupervisor")
_SPAWNS = frozenset({"spawn", "spawn_link", "spawn_monitor"})
_BRANCHING_STABS = frozenset({"case", "cond", "receive", "try", "with", "fn"})
_COMPOSITE = frozenset({"tuple", "list", "map", "struct", "bitstring", "binary_operator"})
_LOGIC = ("and", "or", "&&", "||", "when")

# The binary operators the features count, by the token between their operands.
_OPERATORS = ("|>", "=", "<-", *_LOGIC)
# Calls by name are found in the text and confirmed in the tree (cheaper than query
# predicates): local keywords, and the OTP/process modules' remote calls (`Name.`).
_LOCAL_CALLS = frozenset(
    [
        "case",
        "cond",
        "with",
        "if",
        "unless",
        "receive",
        "try",
        "spawn",
        "spawn_link",
        "spawn_monitor",
        "send",
        "quote",
        "unquote",
        "unquote_splicing",
        "test",
        "describe",
        "doctest",
    ]
)
_REMOTE_MODULES = frozenset(
    [
        "Process",
        "Kernel",
        "Supervisor",
        "DynamicSupervisor",
        "Registry",
        "Agent",
        "Task",
        "GenServer",
    ]
)
_CALL_NAMES = sorted(_LOCAL_CALLS | _REMOTE_MODULES)
# Every word the features look for: a file's tokens tell which can occur at all.
_WORDS = sorted({*_CALL_NAMES, *(op for op in _OPERATORS if op.isalpha()), "fn"})
_WORD_TOKENS = [(word, word.encode()) for word in _WORDS]
# A bytes regex's `\w`: what a word must not touch to be a whole word (true by byte).
_IS_WORD_BYTE = bytes(b in WORD_BYTES for b in range(256))
_BLANK_NON_WORD = bytes(b if b in WORD_BYTES else ord(" ") for b in range(256))
_IEX = re.compile(r"^\s*iex(?:\(\d+\))?>\s?(.*)$")
_CONTINUATION = re.compile(r"^\s*\.\.\.(?:\(\d+\))?>\s?(.*)$")


def features(source: str, data: bytes, root: Node, found: Definitions) -> ElixirAnalysis:
    """The file's features, from its tree and the module walk's definitions."""
    words = _words_in(data)
    finder = Finder(root)
    operators = _operators(data, finder, words)
    local_calls, remotes = _named_calls(data, finder, words)
    owners = _owners([call for call, _, _ in remotes], found.modules)
    modules = found.modules
    locals_ = Counter(name for name, _ in local_calls)
    pipes = operators["|>"]
    matches = operators["="] + operators["<-"]
    patterns = (m.child_by_field_name("left") for m in matches)
    trees = _supervisors(remotes, owners, finder)
    return ElixirAnalysis(
        types=found.types,
        doctests=doctests(modules, found.functions),
        behaviours=_behaviours(found, remotes, owners, trees),
        supervisors=trees,
        pipes=len(pipes),
        longest_pipe=_longest_pipe(pipes),
        multi_clause_functions=sum(1 for n in found.clauses.values() if n > 1),
        case=locals_["case"],
        cond=locals_["cond"],
        with_=locals_["with"],
        destructuring=sum(1 for n in patterns if n is not None and n.type in _COMPOSITE),
        **_uses(locals_, remotes, found)._asdict(),
        test_modules=sorted(
            {b.module for b in found.behaviours if b.via == "use" and b.name == "ExUnit.Case"}
        ),
        tests=locals_["test"],
        describes=locals_["describe"],
        doctest_targets=_doctest_targets(local_calls),
        metrics=code_metrics(
            source,
            data,
            _comments(data, finder, words),
            found.functions,
            _complexity(found, _fns(data, finder, words), operators, local_calls),
            nesting(root),
        ),
    )


def nesting(node: Node) -> int:
    """Deepest nesting of do-blocks and anonymous functions (found by a query, their
    nesting read from their byte ranges: a node encloses the ones that start inside it)."""
    found = QueryCursor(NESTING_QUERY).captures(node).get("nesting", [])
    spans = sorted((n.start_byte, -n.end_byte) for n in found)
    best = 0
    open_ends: list[int] = []
    for start, negative_end in spans:
        while open_ends and open_ends[-1] <= start:
            open_ends.pop()
        open_ends.append(-negative_end)
        best = max(best, len(open_ends))
    return best


class Grading(NamedTuple):
    """What a difficulty score (`streams.generators.grade`) reads of a text's features."""

    complexity: int
    loc: int
    nesting: int
    otp: bool  # behaviours, supervisors, or process primitives
    macros: bool  # defines or expands macros


class _Uses(NamedTuple):
    """How often code spawns, sends and receives, and defines, quotes and unquotes
    macros: features of their own (`features`), read as two flags by a grade."""

    spawns: int
    sends: int
    receives: int
    macros: int
    quotes: int
    unquotes: int

    @property
    def processes(self) -> bool:
        return self.spawns + self.sends + self.receives > 0

    @property
    def metaprogramming(self) -> bool:
        return self.macros + self.quotes + self.unquotes > 0


def _uses(locals_: Counter[str], remotes: list[tuple[Node, str, str]], found: Definitions) -> _Uses:
    return _Uses(
        spawns=sum(locals_[s] for s in _SPAWNS)
        + sum(1 for _, mod, fun in remotes if fun in _SPAWNS and mod in ("Kernel", "Process")),
        sends=locals_["send"] + sum(1 for _, mod, fun in remotes if fun == "send"),
        receives=locals_["receive"],
        macros=sum(1 for f in found.functions if f.kind in ("defmacro", "defmacrop")),
        quotes=locals_["quote"],
        unquotes=locals_["unquote"] + locals_["unquote_splicing"],
    )


def grading_of(analysis: ElixirAnalysis, nesting: int) -> Grading:
    """The `Grading` of features `features` made (`nesting` when they lack it)."""
    uses = _Uses(*(getattr(analysis, name) for name in _Uses._fields))
    return Grading(
        complexity=analysis.metrics.complexity,
        loc=analysis.metrics.loc,
        nesting=nesting,
        otp=bool(analysis.behaviours or analysis.supervisors) or uses.processes,
        macros=uses.metaprogramming,
    )


def grading(source: str, data: bytes, root: Node, found: Definitions) -> Grading:
    """`grading_of(features(source, data, root, found))`, at a fraction of the cost: the
    instruct stage grades each sample's code (a function, a rewrite, a fill-in middle),
    and a score reads five of the features. Not found here, as the score needs none of
    them: pipes, `=`/`<-` matches (the most frequent operators), doctests, tests, the
    supervision trees and behaviours themselves. A supervision tree is a call on
    `Supervisor`/`DynamicSupervisor` inside a module, which also makes that module a
    caller of OTP (`_behaviours`, `via="call"`): `otp` needs the calls alone."""
    words = _words_in(data)
    finder = Finder(root)
    operators = _operators(data, finder, words, _LOGIC)
    local_calls, remotes = _named_calls(data, finder, words)
    owners = _owners([call for call, _, _ in remotes], found.modules)
    uses = _uses(Counter(name for name, _ in local_calls), remotes, found)
    calls_otp = any(
        mod in _CALLED_OTP and owner is not None
        for (_, mod, _), owner in zip(remotes, owners, strict=True)
    )
    _, non_blank, comment_rows = _line_counts(source, data, _comments(data, finder, words))
    return Grading(
        complexity=_complexity(found, _fns(data, finder, words), operators, local_calls),
        loc=non_blank - comment_rows,
        nesting=nesting(root),
        otp=bool(found.behaviours) or calls_otp or uses.processes,
        macros=uses.metaprogramming,
    )


# --------------------------------------------------------------------------- helpers


def _owners(nodes: list[Node], modules: list[ModuleInfo]) -> list[str | None]:
    """The innermost module whose lines hold each node: of the modules whose lines hold
    its row, the one starting last (the first listed of those starting on that line: the
    implementations of one `defimpl P, for: [A, B]`).

    Nodes and modules come in source order, so one sweep finds them all: a module opens
    when the rows reach its start line and, once a row has passed its end line, stays
    closed (asking every module for every node was quadratic in files of many modules)."""
    owners: list[str | None] = []
    opened: list[deque[ModuleInfo]] = []  # open modules by start line, the last started last
    added = 0
    for node in nodes:
        row = node.start_point.row + 1
        while added < len(modules) and modules[added].start_line <= row:
            module = modules[added]
            if opened and opened[-1][0].start_line == module.start_line:
                opened[-1].append(module)
            else:
                opened.append(deque([module]))
            added += 1
        while opened:
            group = opened[-1]
            while group and group[0].end_line < row:
                group.popleft()
            if group:
                break
            opened.pop()
        owners.append(opened[-1][0].name if opened else None)
    return owners


def _words_in(data: bytes) -> frozenset[str]:
    """The `_WORDS` that are words of a file's UTF-8 `data` as `\\w` delimits them in a
    bytes regex (the text's runs of word bytes: blanking the others and splitting is
    cheaper than the token CRCs near-dup hashing computes, for snippets too)."""
    words = set(data.translate(_BLANK_NON_WORD).split())
    return frozenset(word for word, token in _WORD_TOKENS if token in words)


def _whole_words(data: bytes, words: frozenset[str]) -> list[tuple[int, str]]:
    """(offset in `data`, name) of each call name of `words` as a whole word, in source
    order."""
    # every call name is a word: one the file's words lack occurs nowhere as a whole word
    hits = [
        (start, name)
        for name in _CALL_NAMES
        if name in words
        for start in _positions(data, name, words)
    ]
    hits.sort()
    return hits


def _named_calls(
    data: bytes, finder: Finder, words: frozenset[str]
) -> tuple[list[tuple[str, Node]], list[tuple[Node, str, str]]]:
    """(name, call) of local calls named in `_LOCAL_CALLS`; (call, module, function) of
    remote calls on `_REMOTE_MODULES` (`Name.`). Text in strings and comments is no call."""
    local_calls: list[tuple[str, Node]] = []
    remotes: list[tuple[Node, str, str]] = []
    for start, name in _whole_words(data, words):
        end = start + len(name)
        if name in _LOCAL_CALLS:
            call = _call_with_target(finder, start, end, "identifier")
            if call is not None:
                local_calls.append((name, call))
            continue
        if data[end : end + 1] != b".":
            continue
        dot = finder.find_named(start, end + 1)
        if dot.type != "dot" or dot.start_byte != start:
            continue
        alias = dot.child_by_field_name("left")
        fun = dot.child_by_field_name("right")
        if alias is None or alias.type != "alias" or alias.end_byte != end or fun is None:
            continue  # `Name.` ends a longer alias (`My.Task.run`) or is no call's module
        call = _call_with_target(finder, start, dot.end_byte, "dot")
        if call is not None:
            remotes.append((call, name, text(fun)))
    return local_calls, remotes


def _call_with_target(finder: Finder, start: int, end: int, kind: str) -> Node | None:
    """The call whose target, of type `kind`, spans bytes `start`..`end`; None if none.

    A target is followed by its arguments or `do` block, so the byte after it lies in its
    call: the smallest named node over the target and that byte is the call (a
    `Name.fun` without arguments is a call of the target's extent: its parent)."""
    node: Node | None = finder.find_named(start, end + 1)
    if node is None or node.start_byte != start or node.type != "call":
        node = finder.find_named(start, end)
        node = finder.parent(node) if node.end_byte == end else None
        if node is None or node.type != "call" or node.end_byte != end:
            return None
    target = node.child_by_field_name("target")
    if target is None or target.type != kind or target.start_byte != start:
        return None
    return node if target.end_byte == end else None


def _positions(data: bytes, text: str, words: frozenset[str]) -> list[int]:
    """Where `text` occurs in `data`: a word (`or`, `case`) only when the file's `words`
    (`_words_in`) hold it, and then only as a whole word (inside `for` or `error` it is no
    token, which the text shows without the tree); a symbol of one or two bytes (`#`,
    `|>`) by array comparisons, faster than a `find` per hit."""
    token = text.encode()
    is_word = text.isalpha()
    if (is_word and text not in words) or token not in data:
        return []
    if not is_word:
        array = np.frombuffer(data, dtype=np.uint8)
        if len(token) == 1:
            return np.flatnonzero(array == token[0]).tolist()
        hits = array[:-1] == token[0]
        hits &= array[1:] == token[1]
        return np.flatnonzero(hits).tolist()
    found = []
    size = len(token)
    last = len(data) - 1
    start = data.find(token)
    while start != -1:
        end = start + size
        if (not start or not _IS_WORD_BYTE[data[start - 1]]) and (
            end > last or not _IS_WORD_BYTE[data[end]]
        ):
            found.append(start)
        start = data.find(token, start + 1)
    return found


def _operators(
    data: bytes, finder: Finder, words: frozenset[str], operators: Iterable[str] = _OPERATORS
) -> dict[str, list[Node]]:
    """Binary operator nodes by the operators the features count (`|>`, `=`, `and`...),
    or by those of `operators`.

    The operator token is unnamed, so the smallest named node over it is its
    `binary_operator`. All operators are looked up in one pass in source order, where the
    finder moves least from one token to the next."""
    found: dict[str, list[Node]] = {op: [] for op in operators}
    tokens = sorted((start, op) for op in found for start in _positions(data, op, words))
    for start, token in tokens:
        node = finder.find_named(start, start + len(token))
        if node.type != "binary_operator":
            continue
        operator = node.child_by_field_name("operator")
        if operator is not None and operator.start_byte == start and operator.type == token:
            found[token].append(node)
    return found


def _fns(data: bytes, finder: Finder, words: frozenset[str]) -> list[Node]:
    """Every `fn ... end` of the tree (the unnamed `fn` token starts one)."""
    fns = []
    for start in _positions(data, "fn", words):
        node = finder.find_named(start, start + 2)
        if node.type == "anonymous_function" and node.start_byte == start:
            fns.append(node)
    return fns


def _comments(data: bytes, finder: Finder, words: frozenset[str]) -> list[Node]:
    """Every comment of the tree (each starts with `#`; a `#` inside one is no start)."""
    comments = []
    for start in _positions(data, "#", words):
        node = finder.find(start, start + 1)
        if node.type == COMMENT and node.start_byte == start:
            comments.append(node)
    return comments


def _longest_pipe(pipes: list[Node]) -> int:
    """`|>` count of the longest chain (a chain nests through the left operand).

    `pipes` holds every pipe of the tree, so a pipe's left operand is a pipe when its span
    is one of theirs; a left operand starts where its pipe does and ends sooner, so in
    (start, end) order it comes first. The longest chain from any pipe is the longest
    from the top of a chain."""
    chain: dict[tuple[int, int], int] = {}  # span → pipes down the left operands
    for pipe in sorted(pipes, key=lambda p: (p.start_byte, p.end_byte)):
        left = pipe.child_by_field_name("left")
        below = chain.get((left.start_byte, left.end_byte), 0) if left is not None else 0
        chain[(pipe.start_byte, pipe.end_byte)] = below + 1
    return max(chain.values(), default=0)


def _complexity(
    found: Definitions,
    fns: Iterable[Node],
    operators: dict[str, list[Node]],
    local_calls: list[tuple[str, Node]],
) -> int:
    extra_clauses = sum(n - 1 for n in found.clauses.values())
    # A `fn` holds its clauses; a `case`/`cond`/`receive`/`try`/`with` call holds them one
    # level down, in its `do` block (an `else` block sits in the `do` block: the clauses
    # in it are one level further down and do not count).
    clauses = [_stab_clauses(fn) for fn in fns]
    for name, call in local_calls:
        if name in _BRANCHING_STABS:
            holders = (c for c in call.named_children if c.type != "anonymous_function")
            clauses.append(sum(_stab_clauses(holder) for holder in holders))
    stab_branches = sum(n - 1 for n in clauses if n)
    conditionals = sum(1 for name, _ in local_calls if name in ("if", "unless"))
    logic = sum(len(operators[op]) for op in _LOGIC)
    return 1 + extra_clauses + stab_branches + conditionals + logic


def _stab_clauses(node: Node) -> int:
    return [child.type for child in node.named_children].count("stab_clause")


def _doctest_targets(calls: Iterable[tuple[str, Node]]) -> list[str]:
    targets = []
    for name, call in calls:
        if name != "doctest":
            continue
        args = argument_nodes(call)
        if args and args[0].type == "alias":
            targets.append("".join(text(args[0]).split()))
    return sorted(set(targets))


def _behaviours(
    found: Definitions,
    remotes: list[tuple[Node, str, str]],
    owners: list[str | None],
    trees: list[SupervisionTree],
) -> list[BehaviourUse]:
    """Adopted behaviours with their implemented callbacks; then OTP modules only called
    or supervised (`via="call"`)."""
    defined: dict[str, set[str]] = {}  # module → `name/arity` (for adopted behaviours only)
    if found.behaviours:
        for f in found.functions:
            defined.setdefault(f.module, set()).add(f"{f.name}/{f.arity}")
    result: list[BehaviourUse] = []
    seen: set[tuple[str, str]] = set()
    for b in found.behaviours:
        if (b.module, b.name) in seen:
            continue
        seen.add((b.module, b.name))
        known = OTP_CALLBACKS.get(b.name)
        mine = defined.get(b.module, set())
        if known is not None:
            callbacks = mine & known
        else:  # a behaviour of its own: what the module marks `@impl`, not OTP's
            otp_names = set().union(
                *(OTP_CALLBACKS.get(o.name, ()) for o in found.behaviours if o.module == b.module)
            )
            callbacks = found.impls.get(b.module, set()) - otp_names
        result.append(
            BehaviourUse(
                module=b.module,
                behaviour=b.name,
                via=b.via,  # type: ignore[arg-type]
                otp=known is not None,
                callbacks=sorted(callbacks),
            )
        )
    called = [(owner, mod) for (_, mod, _), owner in zip(remotes, owners, strict=True)]
    called += [(t.module, c) for t in trees for c in t.children]
    for owner, mod in called:
        if mod in _CALLED_OTP and owner is not None and (owner, mod) not in seen:
            seen.add((owner, mod))
            result.append(BehaviourUse(module=owner, behaviour=mod, via="call", otp=True))
    return result


def _supervisors(
    remotes: list[tuple[Node, str, str]], owners: list[str | None], finder: Finder
) -> list[SupervisionTree]:
    trees = []
    for (call, mod, fun), owner in zip(remotes, owners, strict=True):
        if mod not in ("Supervisor", "DynamicSupervisor") or fun not in ("init", "start_link"):
            continue
        args = argument_nodes(call)
        if owner is None:
            continue
        if mod == "DynamicSupervisor":
            if fun == "init" or (args and args[0].type == "keywords"):
                trees.append(
                    SupervisionTree(
                        module=owner, supervisor=mod, strategy=_strategy(args), children=[]
                    )
                )
            continue
        if not args or args[0].type not in ("list", "identifier"):
            continue  # Supervisor.start_link(Module, arg): the tree is in Module.init/1
        children = args[0] if args[0].type == "list" else _bound_list(finder, call, text(args[0]))
        options = [
            _bound_list(finder, call, text(a)) or a if a.type == "identifier" else a for a in args
        ]
        trees.append(
            SupervisionTree(
                module=owner,
                supervisor=mod,
                strategy=_strategy(options),
                children=[] if children is None else _children(children, owner),
            )
        )
    return trees


def _strategy(args: list[Node]) -> str | None:
    """`strategy:` among keyword arguments, or in a keyword list argument."""
    for arg in args:
        keywords = arg if arg.type == "keywords" else None
        if arg.type == "list":
            keywords = next((c for c in arg.named_children if c.type == "keywords"), None)
        if keywords is None:
            continue
        for pair in keywords.named_children:
            key = pair.child_by_field_name("key")
            value = pair.child_by_field_name("value")
            if key is not None and value is not None and text(key).strip() == "strategy:":
                return text(value).lstrip(":")
    return None


def _bound_list(finder: Finder, call: Node, name: str) -> Node | None:
    """The list last bound to `name` before `call` in the enclosing definition."""
    finder.find(call.start_byte, call.end_byte)
    scope = finder.enclosing(call, lambda node: node.type == "do_block")
    if scope is None:
        return None
    bound = None
    for stmt in scope.named_children:
        if stmt.start_byte >= call.start_byte:
            break
        if stmt.type != "binary_operator":
            continue
        op = stmt.child_by_field_name("operator")
        left = stmt.child_by_field_name("left")
        right = stmt.child_by_field_name("right")
        if (
            op is not None
            and op.type == "="
            and left is not None
            and text(left) == name
            and right is not None
            and right.type == "list"
        ):
            bound = right
    return bound


def _children(children: Node, owner: str) -> list[str]:
    return [_child_name(c, owner) for c in named(children)]


def _child_name(spec: Node, owner: str) -> str:
    """The module a child spec starts: `Mod`, `{Mod, arg}`, `Mod.child_spec(..)`, maps…"""
    kind = spec.type
    if kind == "alias":
        return "".join(text(spec).split())
    if kind == "identifier" and text(spec) == "__MODULE__":
        return owner
    if kind == "tuple" and spec.named_children:
        return _child_name(spec.named_children[0], owner)
    if kind == "call":
        target = spec.child_by_field_name("target")
        args = argument_nodes(spec)
        if target is not None and target.type == "dot":
            left = target.child_by_field_name("left")
            if left is not None and text(left) == "Supervisor" and args:
                return _child_name(args[0], owner)  # Supervisor.child_spec({Mod, a}, id: ..)
            if left is not None:
                return _child_name(left, owner)
        if target is not None and text(target) in ("worker", "supervisor") and args:
            return _child_name(args[0], owner)
    if kind == "map":
        content = (c for c in spec.named_children if c.type == "map_content")
        keywords = (k for c in content for k in c.named_children if k.type == "keywords")
        for pair in (p for k in keywords for p in k.named_children):
            key = pair.child_by_field_name("key")
            value = pair.child_by_field_name("value")
            if key is not None and value is not None and text(key).strip() == "start:":
                return _child_name(value, owner)
    return " ".join(text(spec).split())[:80]


def doctests(modules: list[ModuleInfo], functions: list[FunctionInfo]) -> list[Doctest]:
    """The `iex>` examples in every moduledoc and doc, in source order."""
    docs = [(m.name, m.moduledoc, m.start_line) for m in modules if _may_hold_examples(m.moduledoc)]
    docs += [
        (f"{f.module}.{f.name}/{f.arity}", f.doc, f.start_line)
        for f in functions
        if _may_hold_examples(f.doc)
    ]
    found: list[Doctest] = []
    for owner, doc, _line in sorted(docs, key=lambda d: d[2]):
        found.extend(_examples(owner, doc))
    return found


def _may_hold_examples(doc: str | None) -> TypeGuard[str]:
    return doc is not None and "iex" in doc


def _examples(owner: str, doc: str) -> Iterable[Doctest]:
    lines = doc.split("\n")
    i = 0
    while i < len(lines):
        prompt = _IEX.match(lines[i])
        i += 1
        if prompt is None:
            continue
        expression = [prompt.group(1)]
        while i < len(lines) and (more := _CONTINUATION.match(lines[i])) is not None:
            expression.append(more.group(1))
            i += 1
        expected = []
        while i < len(lines) and lines[i].strip() and _IEX.match(lines[i]) is None:
            expected.append(lines[i].strip())
            i += 1
        yield Doctest(
            owner=owner,
            expression="\n".join(expression).strip(),
            expected="\n".join(expected) or None,
        )


def _word_characters(source: str, data: bytes) -> int:
    """Characters of `source` in `\\w+` runs (`data`: its UTF-8)."""
    if source.isascii():  # `\w` is then a set of bytes
        return len(data) - len(data.translate(None, WORD_BYTES))
    return sum(map(len, tokens(source)))


def code_metrics(
    source: str,
    data: bytes,
    comments: Iterable[Node],
    functions: list[FunctionInfo],
    complexity: int,
    nesting: int,
) -> CodeMetrics:
    """Line metrics of `source` (`data` is its UTF-8 encoding, `comments` its comments)."""
    lines, non_blank, comment_rows = _line_counts(source, data, comments)
    if not lines:
        return CodeMetrics(complexity=complexity, nesting=nesting)
    lengths = list(map(len, lines))
    public = [f for f in functions if f.public]
    alnum = _word_characters(source, data) - source.count("_")
    return CodeMetrics(
        lines=len(lines),
        loc=non_blank - comment_rows,
        comment_lines=comment_rows,
        comment_ratio=comment_rows / non_blank if non_blank else 0.0,
        doc_coverage=(sum(1 for f in public if f.doc) / len(public)) if public else None,
        max_line_length=max(lengths),
        mean_line_length=sum(lengths) / len(lengths),
        alphanumeric_fraction=alnum / len(source) if source else 0.0,
        complexity=complexity,
        nesting=nesting,
    )


def _line_counts(source: str, data: bytes, comments: Iterable[Node]) -> tuple[list[str], int, int]:
    """The lines of `source` (without the empty one after a final newline), how many are
    not blank, and how many are comment lines (only blanks before the comment)."""
    lines = source.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return lines, 0, 0
    non_blank = len(lines) - lines.count("") - sum(map(str.isspace, lines))
    comment_rows = set()
    for comment in comments:
        start = comment.start_byte
        row, column = comment.start_point
        if not data[start - column : start].strip():
            comment_rows.add(row)
    return lines, non_blank, len(comment_rows)
