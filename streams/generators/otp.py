"""OTP generators: "implement a GenServer that …" from a module's public API, callbacks
and state; supervision-tree design questions answered with the children spec."""

from __future__ import annotations

from schemas.records import BehaviourUse, FunctionInfo, ModuleInfo, ParsedFile, SupervisionTree
from streams.generators.common import Candidate, candidate, fenced, function_ref, module_source, ref

PROCESS_BEHAVIOURS = frozenset(
    {"GenServer", "Supervisor", "DynamicSupervisor", "Agent", "Task", "GenStage", "Application"}
)
STRATEGIES = {
    "one_for_one": "a crashed child is restarted alone, the others keep running. ",
    "one_for_all": "the children depend on each other, so all restart when one crashes. ",
    "rest_for_one": "a crashed child and the children started after it restart together. ",
}


def _summary(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def _api_line(function: FunctionInfo) -> str:
    summary = _summary(function.doc)
    return f"- `{function.name}/{function.arity}`" + (f": {summary}" if summary else "")


def _state(functions: list[FunctionInfo]) -> str | None:
    """The state `init/1` starts from, as its source (the best description there is)."""
    init = next((f for f in functions if f.name == "init" and f.arity == 1), None)
    return init.source if init else None


def behaviour_prompt(use: BehaviourUse, module: ModuleInfo, functions: list[FunctionInfo]) -> str:
    article = "an" if use.behaviour[0] in "AEIOU" else "a"
    callbacks = {c.split("/")[0] for c in use.callbacks}
    api = [_api_line(f) for f in functions if f.public and f.name not in callbacks]
    parts = [f"Implement `{module.name}` as {article} {use.behaviour}."]
    purpose = _summary(module.moduledoc)
    if purpose:
        parts.append(f"What it does: {purpose}")
    if api:
        parts.append("Public API:\n" + "\n".join(api))
    if use.callbacks:
        parts.append("Callbacks to implement: " + ", ".join(f"`{c}`" for c in use.callbacks) + ".")
    state = _state(functions)
    if state and use.behaviour in ("GenServer", "GenStage"):
        parts.append(f"Its state starts as `init/1` builds it:\n\n{fenced(state)}")
    return "\n\n".join(parts)


def behaviour_samples(file: ParsedFile, text: str) -> list[Candidate]:
    modules = {m.name: m for m in file.modules}
    out = []
    for use in file.analysis.behaviours:
        module = modules.get(use.module)
        adopted = use.via in ("use", "behaviour") and use.behaviour in PROCESS_BEHAVIOURS
        if not adopted or module is None:
            continue
        functions = [f for f in file.functions if f.module == module.name]
        source = module_source(text, module.start_line, module.end_line)
        out.append(
            candidate(
                "otp_pattern",
                [("human", behaviour_prompt(use, module, functions)), ("gpt", fenced(source))],
                file,
                [ref(file, module.start_line, module.end_line)],
                concepts=[use.behaviour],
            )
        )
    return out


def _init_function(tree: SupervisionTree, functions: list[FunctionInfo]) -> FunctionInfo | None:
    """The definition that hands children and strategy to `Supervisor.init` (else the one
    that calls `Supervisor.start_link` with them)."""
    own = [f for f in functions if f.module == tree.module]
    for call in (f"{tree.supervisor}.init(", f"{tree.supervisor}.start_link("):
        found = next((f for f in own if call in f.source), None)
        if found is not None:
            return found
    return None


def tree_samples(file: ParsedFile, text: str) -> list[Candidate]:
    out = []
    for tree in file.analysis.supervisors:
        init = _init_function(tree, file.functions)
        if init is None:
            continue
        children = ", ".join(f"`{c}`" for c in tree.children) or "children started on demand"
        human = (
            f"Design the supervision tree of `{tree.module}`, a {tree.supervisor} over {children}. "
            "Which restart strategy fits, and what is its children specification?"
        )
        strategy = (tree.strategy or ":one_for_one").lstrip(":")
        gpt = (
            f"Use a `{tree.supervisor}` with `:{strategy}`: {STRATEGIES.get(strategy, '')}"
            f"The children spec goes in `{init.name}/{init.arity}`:\n\n{fenced(init.source)}"
        )
        out.append(
            candidate(
                "otp_pattern",
                [("human", human), ("gpt", gpt)],
                file,
                [function_ref(file, init)],
                concepts=[tree.supervisor, "supervision tree"],
            )
        )
    return out


def otp_pattern(file: ParsedFile, text: str) -> list[Candidate]:
    return behaviour_samples(file, text) + tree_samples(file, text)
