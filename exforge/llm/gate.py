"""Evaluation-gated promotion: a version may replace production only if its stored pass@1
on the gate benchmark (`EXFORGE_EVAL_GATE_BENCHMARK`) is at most
`EXFORGE_EVAL_GATE_MAX_DROP` below the production version's; `force` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.llm.registry import production_version, stored_metric

METRIC = "pass@1"


@dataclass(frozen=True)
class GateDecision:
    allowed: bool
    reason: str
    candidate: float | None = None
    production: float | None = None
    production_version: int | None = None


def check_promotion(
    engine: Engine,
    model: str,
    version: int,
    benchmark: str = "builtin",
    max_drop: float = 0.0,
    force: bool = False,
) -> GateDecision:
    """Allow or refuse promoting `model` `version`, with the reason in words."""
    current = production_version(engine, model)
    candidate = stored_metric(engine, model, version, benchmark, METRIC)
    baseline = None if current is None else stored_metric(engine, model, current, benchmark, METRIC)
    facts = {"candidate": candidate, "production": baseline, "production_version": current}
    shown = "none" if candidate is None else f"{candidate:.3f}"
    if force:
        return GateDecision(True, f"forced: gate not applied ({METRIC} {shown})", **facts)
    if current is None or current == version:
        return GateDecision(True, f"no other production version of {model} to compare", **facts)
    if candidate is None:
        return GateDecision(
            False,
            f"{model} v{version} has no stored {METRIC} on {benchmark}: run "
            f"`exforge eval run --model {model}:{version} --benchmark {benchmark}` "
            "first, or force",
            **facts,
        )
    if baseline is None:
        return GateDecision(
            True, f"production v{current} has no stored {METRIC} on {benchmark}", **facts
        )
    drop = baseline - candidate
    verdict = (
        f"{METRIC} on {benchmark}: v{version} {candidate:.3f} vs production v{current} "
        f"{baseline:.3f} (drop {drop:+.3f}, allowed {max_drop:.3f})"
    )
    allowed = drop <= max_drop + 1e-12
    return GateDecision(allowed, ("allowed: " if allowed else "refused: ") + verdict, **facts)


def promotion_decision(
    settings: Settings, engine: Engine, model: str, version: int, force: bool = False
) -> GateDecision:
    """`check_promotion` on the configured benchmark and threshold
    (`EXFORGE_EVAL_GATE_BENCHMARK`, `EXFORGE_EVAL_GATE_MAX_DROP`)."""
    return check_promotion(
        engine, model, version, settings.eval_gate_benchmark, settings.eval_gate_max_drop, force
    )
