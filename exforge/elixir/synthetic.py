"""Generated Elixir modules with known near-duplicates, for benchmarks and tests.

`module(rng, name)` draws a module of documented functions built from a handful of
templates with random names, variables and literals, so two drawn modules share little.
The variants are what near-duplicate detection must catch: `renamed` (one variable
renamed throughout one function), `reordered` (functions shuffled) and `recommented`
(comments rewritten). Everything is deterministic given the `random.Random` seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

__all__ = ["Function", "Module", "mixed", "module", "recommented", "renamed", "reordered"]

_VERBS = [
    "fetch",
    "load",
    "parse",
    "build",
    "merge",
    "split",
    "render",
    "count",
    "score",
    "rank",
    "index",
    "group",
    "sort",
    "scan",
]
_NOUNS = [
    "user",
    "order",
    "item",
    "entry",
    "token",
    "record",
    "batch",
    "event",
    "metric",
    "page",
    "node",
    "edge",
    "tag",
    "slot",
]
_VARS = [
    "acc",
    "list",
    "items",
    "rows",
    "value",
    "values",
    "key",
    "keys",
    "opts",
    "state",
    "data",
    "input",
    "result",
    "entry",
    "map",
]
_WORDS = [
    "quickly",
    "safely",
    "lazily",
    "strictly",
    "eagerly",
    "reliably",
    "cheaply",
    "exactly",
    "only",
    "always",
]
_TEMPLATES = (
    "{a}\n|> Enum.{op}(fn {x} -> {x} {bin} {n} end)\n|> Enum.{agg}()",
    "case Map.fetch({a}, :{k}) do\n  {{:ok, {x}}} -> {{:ok, {x} {bin} {n}}}\n"
    "  :error -> {{:error, :{k}}}\nend",
    "for {x} <- {a}, {x} > {n}, into: %{{}} do\n  {{{x}, {x} {bin} {m}}}\nend",
    "with {{:ok, {x}}} <- Keyword.fetch({a}, :{k}),\n     true <- {x} > {n} do\n"
    "  {x} {bin} {m}\nelse\n  _ -> {m}\nend",
    "Enum.reduce({a}, {n}, fn {x}, {y} ->\n  {y} {bin} {x}\nend)",
    "{a}\n|> Stream.{op}(&(&1 {bin} {n}))\n|> Stream.take({m})\n|> Enum.to_list()",
)


@dataclass(frozen=True)
class Function:
    name: str
    arg: str
    doc: str
    comment: str
    body: str


@dataclass(frozen=True)
class Module:
    name: str
    functions: tuple[Function, ...]

    def source(self) -> str:
        parts = [f'defmodule {self.name} do\n  @moduledoc "Generated module {self.name}."\n']
        for f in self.functions:
            body = "\n".join("    " + line for line in f.body.split("\n"))
            parts.append(
                f'\n  @doc "{f.doc}"\n  # {f.comment}\n  def {f.name}({f.arg}) do\n{body}\n  end\n'
            )
        return "".join(parts) + "end\n"


def _function(rng: random.Random, index: int) -> Function:
    a, x, y = rng.sample(_VARS, 3)
    name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}_{index}"
    body = rng.choice(_TEMPLATES).format(
        a=a,
        x=x,
        y=y,
        k=rng.choice(_NOUNS),
        op=rng.choice(("map", "filter", "reject", "flat_map")),
        agg=rng.choice(("sum", "count", "max", "min", "uniq")),
        bin=rng.choice(("+", "-", "*")),
        n=rng.randint(1, 999),
        m=rng.randint(1, 999),
    )
    words = " ".join(rng.sample(_WORDS, 3))
    return Function(
        name=name,
        arg=a,
        doc=f"{name.replace('_', ' ').capitalize()} from `{a}`, {words}.",
        comment=f"{rng.choice(_VERBS)}s {rng.choice(_NOUNS)}s {words}",
        body=body,
    )


def module(rng: random.Random, name: str, functions: int = 8) -> Module:
    return Module(name, tuple(_function(rng, i) for i in range(functions)))


def renamed(rng: random.Random, mod: Module) -> Module:
    """One variable renamed throughout one function."""
    index = rng.randrange(len(mod.functions))
    f = mod.functions[index]
    new = f"{f.arg}_{rng.choice(_NOUNS)}"
    pattern = re.compile(rf"\b{re.escape(f.arg)}\b")
    changed = replace(f, arg=new, doc=pattern.sub(new, f.doc), body=pattern.sub(new, f.body))
    return replace(mod, functions=(*mod.functions[:index], changed, *mod.functions[index + 1 :]))


def reordered(rng: random.Random, mod: Module) -> Module:
    """The same functions in another order."""
    functions = list(mod.functions)
    while functions == list(mod.functions):
        rng.shuffle(functions)
    return replace(mod, functions=tuple(functions))


def recommented(rng: random.Random, mod: Module, count: int = 2) -> Module:
    """`count` comments rewritten."""
    functions = list(mod.functions)
    for index in rng.sample(range(len(functions)), count):
        comment = f"TODO: {' '.join(rng.sample(_WORDS, 4))}"
        functions[index] = replace(functions[index], comment=comment)
    return replace(mod, functions=tuple(functions))


def mixed(rng: random.Random, first: Module, second: Module, shared: int) -> Module:
    """`shared` functions of `first` with the rest from `second`: related, not a copy."""
    keep = rng.sample(range(len(first.functions)), shared)
    functions = [
        first.functions[i] if i in keep else second.functions[i]
        for i in range(len(first.functions))
    ]
    return Module(first.name, tuple(functions))
