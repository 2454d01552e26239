"""What the module walk of a file finds (`analysis.py`), before the whole-tree features
(`features.py`) are added to it."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.records import FunctionInfo, ModuleInfo, TypeInfo


@dataclass(frozen=True)
class Behaviour:
    """`use X` / `@behaviour X` in a module, before callbacks are matched."""

    module: str
    name: str
    via: str  # "use" | "behaviour"


@dataclass(frozen=True)
class Definitions:
    """What the module walk finds, before the whole-tree features are added."""

    modules: list[ModuleInfo]
    functions: list[FunctionInfo]
    clauses: dict[tuple[str, str, int, str], int]  # (module, name, arity, kind) → clauses
    types: list[TypeInfo]
    behaviours: list[Behaviour]
    impls: dict[str, set[str]]  # module → `name/arity` of definitions marked `@impl`
