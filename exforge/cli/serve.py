"""`exforge serve …`, `exforge generate` and `exforge usage`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from exforge.cli.console import JsonFlag, console, database, emit_json, fail, settings, table

serve_app = typer.Typer(
    help="Serve model versions: Triton, the gateway, API keys.", no_args_is_help=True
)
keys_app = typer.Typer(help="Gateway API keys (stored hashed).", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")


def _versions(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


@serve_app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[int, typer.Argument(help="Registered version.")],
    flavor: Annotated[str, typer.Option(help="cpu (python backend) or trtllm.")] = "cpu",
    out: Annotated[Path | None, typer.Option(help="Repository directory.")] = None,
    token_delay_ms: Annotated[
        float, typer.Option(help="cpu flavor: pause per decoding step (a slow test model).")
    ] = 0.0,
    as_json: JsonFlag = False,
) -> None:
    """Write a version as a Triton model repository, locally and to the store."""
    from exforge.core.store import open_store
    from serving.export import ExportError
    from serving.export import export as run_export

    if flavor not in ("cpu", "trtllm"):
        raise fail("--flavor must be cpu or trtllm", 2)
    config = settings()
    try:
        result = run_export(
            config,
            open_store(config),
            database(),
            name,
            version,
            flavor,
            out,
            token_delay_ms / 1000,
        )
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
    foreground: Annotated[
        bool, typer.Option(help="Stay until tritonserver exits (a container's command).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Start the local tritonserver (python backend, explicit model control) and load;
    EXFORGE_TRITON_DECOUPLED=false loads the models for HTTP `infer` (no streaming)."""
    import signal

    from exforge.core.stack import StackError
    from serving import triton
    from serving.export import existing_versions, repository_dir

    config = settings()
    repository = repository_dir(config, "cpu")
    instance = triton.default_instance(config)
    try:
        pid = triton.start(config, instance, repository)
        for name in model or sorted(p.name for p in repository.iterdir() if p.is_dir()):
            chosen = _versions(versions) or existing_versions(repository / name)
            triton.load(instance, name, chosen, decoupled=config.triton_decoupled)
    except StackError as exc:
        raise fail(str(exc)) from None
    status(as_json)
    if foreground:
        signal.signal(signal.SIGTERM, lambda *_: triton.stop(config, instance))
        raise typer.Exit(triton.wait(pid))


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
    """Load exactly these versions of a model into the local Triton (decoupled unless
    EXFORGE_TRITON_DECOUPLED=false)."""
    from exforge.core.stack import StackError
    from serving import triton

    config = settings()
    try:
        triton.load(
            triton.default_instance(config),
            name,
            _versions(versions) or [],
            decoupled=config.triton_decoupled,
        )
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
    app = create_app(Gateway(config, database()))
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
        key_id, secret = create_key(database(), name, scope or ["generate", "models"], rate, burst)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if as_json:
        emit_json({"key_id": key_id, "key": secret})
    else:
        console.print(f"key {key_id}: {secret}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id.")]) -> None:
    """Revoke an API key (running gateways refuse it within EXFORGE_GATEWAY_KEY_TTL_S)."""
    from serving.keys import revoke

    if not revoke(database(), key_id):
        raise fail(f"no key {key_id}", 2)
    console.print(f"key {key_id} revoked")


def usage(as_json: JsonFlag = False) -> None:
    """Requests and tokens served per API key, day, model and version."""
    from serving.usage import report

    rows = report(database())
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
