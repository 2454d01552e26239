"""The import graph of exforge's own packages has no cycle: not between modules (imports
inside functions included) and not between the layers' packages. `lint-imports` checks
the direction of the layers; this checks that nothing loops back inside a layer."""

from __future__ import annotations

import grimp

PACKAGES = ("schemas", "exforge", "streams", "workers", "serving")
# The packages of the layers (pyproject's import-linter contract), squashed to one node each.
COMPONENTS = (
    "schemas",
    "exforge.core",
    "exforge.elixir",
    "exforge.llm",
    "exforge.cli",
    "streams",
    "workers.trainer",
    "workers.evaluator",
    "serving",
)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of a directed graph: its strongly connected components with more than
    one node, or one node importing itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(edges.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


def module_imports() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    return {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}


def component_of(module: str) -> str | None:
    matches = [c for c in COMPONENTS if module == c or module.startswith(c + ".")]
    return max(matches, key=len) if matches else None


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert strongly_connected(edges) == [["a", "b", "c"], ["e"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    cycles = strongly_connected(module_imports())
    assert cycles == [], f"modules that import each other (directly or around a loop): {cycles}"


def test_no_import_cycle_between_layer_packages() -> None:
    squashed: dict[str, set[str]] = {}
    for module, imported in module_imports().items():
        source = component_of(module)
        if source is None:
            continue
        targets = {component_of(m) for m in imported} - {source, None}
        squashed.setdefault(source, set()).update(t for t in targets if t is not None)
    assert strongly_connected(squashed) == []
    assert set(squashed) == set(COMPONENTS), "every layer package holds modules"
