"""`exforge models list|show|promote|rollback|split`: the model registry and rollouts."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from exforge.cli.console import JsonFlag, database, emit_json, fail, settings, table

models_app = typer.Typer(help="The model registry.", no_args_is_help=True)


@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Registered model versions."""
    from exforge.llm.registry import list_versions

    rows = list_versions(database(), name)
    if as_json:
        emit_json(rows)
        return
    columns = ["name", "version", "status", "base_model", "run_id", "created_at"]
    table("model versions", columns, [[row[c] for c in columns] for row in rows])


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int | None, typer.Argument(help="Version (default: newest).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """One model version with its metrics and adapter location."""
    from exforge.llm.registry import get_version

    row = get_version(database(), name, version)
    if row is None:
        raise fail(f"no model version {name} {version or ''}".strip(), 2)
    if as_json:
        emit_json(row)
    else:
        table(f"{name} v{row['version']}", ["field", "value"], [[k, v] for k, v in row.items()])


def _print_state(state: object, as_json: bool) -> None:
    data = state.as_dict()  # type: ignore[attr-defined]
    if as_json:
        emit_json(data)
    else:
        table(f"rollout {data['name']}", ["field", "value"], [[k, v] for k, v in data.items()])


def _rollout_call(
    action: Literal["promote", "rollback", "split"], *args: object, **kwargs: object
) -> object:
    from serving import rollout

    try:
        return getattr(rollout, action)(database(), *args, **kwargs)
    except (rollout.RolloutError, LookupError) as exc:
        raise fail(str(exc), 2) from None


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version that takes all traffic.")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the evaluation gate refuses.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Blue-green switch: VERSION serves everything; the old one stays for rollback.
    Refused when VERSION's pass@1 on the gate benchmark falls too far below production's."""
    from exforge.llm.gate import promotion_decision

    decision = promotion_decision(settings(), database(), name, version, force)
    if not decision.allowed:
        raise fail(decision.reason, 1)
    _print_state(_rollout_call("promote", name, version), as_json)


@models_app.command("rollback")
def models_rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: JsonFlag = False,
) -> None:
    """Drop the canary, or return to the previous stable version."""
    _print_state(_rollout_call("rollback", name, "manual"), as_json)


@models_app.command("split")
def models_split(
    name: Annotated[str, typer.Argument(help="Model name.")],
    canary: Annotated[int, typer.Argument(help="Canary version.")],
    percent: Annotated[float, typer.Argument(help="Share of traffic for the canary, 0-100.")],
    sticky: Annotated[bool, typer.Option(help="Assign by a hash of user/key (A/B).")] = True,
    steps: Annotated[str | None, typer.Option(help="Later shares, e.g. 25,50,100.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between healthy steps.")] = 300.0,
    as_json: JsonFlag = False,
) -> None:
    """Canary: PERCENT % to CANARY; steps advance while it stays healthy, 100 promotes."""
    shares = [float(s) for s in steps.split(",")] if steps else None
    state = _rollout_call(
        "split", name, canary, percent, sticky=sticky, steps=shares, step_interval_s=interval
    )
    _print_state(state, as_json)
