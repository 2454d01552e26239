"""`exforge serve …`, `exforge usage` and `exforge models promote|rollback|split`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from exforge.cli import app, models_app
from exforge.console import JsonFlag, console, emit_json, fail, settings, table

serve_app = typer.Typer(
    help="Serve model versions: Triton, the gateway, API keys.", no_args_is_help=True
)
keys_app = typer.Typer(help="Gateway API keys (stored hashed).", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")


def _engine():
    from exforge.db import open_database

    return open_database(settings())


def _versions(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


@serve_app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Registered version.")],
    flavor: Annotated[str, typer.Option(help="cpu (python backend) or trtllm.")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="Repository directory.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write a version as a Triton model repository, locally and to the store."""
    from exforge.store import open_store
    from serving.export import ExportError
    from serving.export import export as run_export

    if flavor not in ("cpu", "trtllm"):
        raise fail("--flavor must be cpu or trtllm", 2)
    config = settings()
    try:
        result = run_export(config, open_store(config), _engine(), name, version, flavor, out)
    except ExportError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        emit_json(result.as_dict())
    else:
        console.print(f"exported {name} v{version} ({flavor}) to {result.repository}")


@serve_app.command("up")
def up(
    model: Annotated[list[str] | None, typer.Option(help="Models to load (default: all).")] = None,
    versions: Annotated[str | None, typer.Option(help="Versions, e.g. 1,2 (default: all).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start the local tritonserver (python backend, explicit model control) and load."""
    from exforge.stack import StackError
    from serving import triton
    from serving.export import existing_versions, repository_dir

    config = settings()
    repository = repository_dir(config, "cpu")
    instance = triton.default_instance(config)
    try:
        triton.start(config, instance, repository)
        for name in model or sorted(p.name for p in repository.iterdir() if p.is_dir()):
            triton.load(instance, name, _versions(versions) or existing_versions(repository / name))
    except StackError as exc:
        raise fail(str(exc)) from None
    status(as_json)


@serve_app.command("down")
def down() -> None:
    """Stop the local tritonserver."""
    from serving import triton

    config = settings()
    stopped = triton.stop(config, triton.default_instance(config))
    console.print("tritonserver stopped" if stopped else "no tritonserver was running")


@serve_app.command("status")
def status(as_json: JsonFlag = False) -> None:
    """Liveness of the local Triton and the state of every model version."""
    from serving import triton

    config = settings()
    state = triton.status(config, triton.default_instance(config))
    if as_json:
        emit_json(state.as_dict())
    else:
        console.print(f"tritonserver {'live' if state.live else 'DOWN'} grpc {state.grpc}")
        rows = [[m.get("name"), m.get("version"), m.get("state")] for m in state.models]
        table("models", ["name", "version", "state"], rows)
    if not state.live:
        raise typer.Exit(1)


@serve_app.command("load")
def load(
    name: Annotated[str, typer.Argument(help="Model name.")],
    versions: Annotated[str, typer.Argument(help="Versions to serve, e.g. 1,2.")],
) -> None:
    """Load exactly these versions of a model into the local Triton."""
    from exforge.stack import StackError
    from serving import triton

    config = settings()
    try:
        triton.load(triton.default_instance(config), name, _versions(versions) or [])
    except StackError as exc:
        raise fail(str(exc)) from None
    console.print(f"{name}: versions {versions} loaded")


@serve_app.command("unload")
def unload(name: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Unload every version of a model from the local Triton."""
    from serving import triton

    config = settings()
    triton.unload(triton.default_instance(config), name)
    console.print(f"{name} unloaded")


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to complete.")],
    model: Annotated[str, typer.Option(help="Model name.")] = "exforge-elixir",
    version: Annotated[int, typer.Option(help="Version to call.")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0: greedy.")] = 0.0,
) -> None:
    """Stream a completion from Triton over gRPC, printing tokens as they arrive."""
    import asyncio

    from serving.client import stream_completion
    from serving.gateway import triton_urls
    from serving.pool import BackendDown, ModelError

    async def run() -> None:
        async for text in stream_completion(
            triton_urls(settings()), model, version, prompt, max_tokens, temperature
        ):
            console.out(text, end="", highlight=False)
        console.out("")

    try:
        asyncio.run(run())
    except (BackendDown, ModelError) as exc:
        raise fail(str(exc)) from None


@serve_app.command("gateway")
def gateway() -> None:
    """Run the OpenAI-compatible gateway (EXFORGE_GATEWAY_*, EXFORGE_TRITON_URL)."""
    import uvicorn

    from serving.app import create_app
    from serving.gateway import Gateway

    config = settings()
    app = create_app(Gateway(config, _engine()))
    uvicorn.run(app, host=config.gateway_host, port=config.gateway_port, log_level="warning")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    scope: Annotated[list[str] | None, typer.Option(help="generate, models.")] = None,
    rate: Annotated[float | None, typer.Option(help="Requests/s (token bucket).")] = None,
    burst: Annotated[int | None, typer.Option(help="Bucket size.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key; the secret is printed once and only its hash is stored."""
    from serving.keys import create_key

    try:
        key_id, secret = create_key(_engine(), name, scope or ["generate", "models"], rate, burst)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        emit_json({"key_id": key_id, "key": secret})
    else:
        console.print(f"key {key_id}: {secret}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id.")]) -> None:
    """Revoke an API key (gateways stop accepting it on restart or cache expiry)."""
    from serving.keys import revoke

    if not revoke(_engine(), key_id):
        raise fail(f"no key {key_id}", 2)
    console.print(f"key {key_id} revoked")


def usage(as_json: JsonFlag = False) -> None:
    """Requests and tokens served per API key, day, model and version."""
    from serving.usage import report

    rows = report(_engine())
    if as_json:
        emit_json(rows)
        return
    columns = [
        "day",
        "key_id",
        "model",
        "version",
        "requests",
        "prompt_tokens",
        "completion_tokens",
    ]
    table("usage", columns, [[row[c] for c in columns] for row in rows])


# ----------------------------------------------------------------------- rollouts


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
        return getattr(rollout, action)(_engine(), *args, **kwargs)
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
    from workers.evaluator.gate import promotion_decision

    decision = promotion_decision(settings(), _engine(), name, version, force)
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
