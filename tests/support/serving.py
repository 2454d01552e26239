"""Helpers of the serving tests: registered tiny-model versions, Triton servers, gateways.

The versions every serving test shares (`serve_versions`):
1 and 2  the tiny model, each with its own random LoRA adapter (they write different text);
3        a diverged version: its adapter holds NaN, so it fails inside Triton on its first
         token (the decoding loop refuses non-finite logits);
4        version 1's weights exported with a per-token delay: it decodes slowly.
Triton A serves all four, Triton B serves version 1 (the failover test kills one).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from safetensors.torch import save
from sqlalchemy import Engine

from exforge.core.db import open_database
from exforge.core.settings import Settings, load_settings
from exforge.core.stack import free_port
from exforge.core.store import ObjectStore, open_store
from exforge.llm.lora import LoraSettings, adapter_state, apply_lora
from exforge.llm.model import load_model
from exforge.llm.registry import register_version
from serving import rollout, triton
from serving.app import create_app
from serving.export import export
from serving.gateway import Gateway
from serving.keys import create_key

MODEL = "elixir"
DIVERGED = 3
SLOW = 4
TOKEN_DELAY_S = 0.1


def register_versions(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    count: int,
    diverged: tuple[int, ...] = (),
    seeds: dict[int, int] | None = None,
) -> None:
    """Register `count` versions of the tiny model, each with its own random adapter (as
    the trainer stores them); `diverged` versions get NaN in theirs; `seeds` gives a
    version another version's adapter."""
    model = apply_lora(load_model("tiny", "none", settings.root / "models"), LoraSettings(rank=4))
    for version in range(1, count + 1):
        torch.manual_seed((seeds or {}).get(version, version))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
                    if version in diverged:
                        param.fill_(float("nan"))
        prefix = f"models/{MODEL}/run{version}"
        store.put(f"{prefix}/adapter.safetensors", save(adapter_state(model)))
        config = model.peft_config["default"].to_dict()
        store.put(f"{prefix}/adapter_config.json", json.dumps(config, default=sorted).encode())
        register_version(
            engine, MODEL, "tiny", f"{prefix}/adapter.safetensors", f"run{version}", {}
        )


@dataclass
class Served:
    settings: Settings
    engine: Engine
    store: ObjectStore
    a: triton.Instance
    b: triton.Instance


@contextmanager
def serve_versions(root: Path) -> Iterator[Served]:
    settings = load_settings(
        data_dir=root,
        rollback_min_requests=5,
        rollback_error_rate=0.2,
        gateway_concurrency=8,
        gateway_key_ttl_s=0.5,
        # these tests count streamed tokens one by one; the output redaction (on by
        # default, released at whitespace) is tested in tests/test_gateway_guard.py
        gateway_redact_output=False,
    )
    store, engine = open_store(settings), open_database(settings)
    register_versions(settings, store, engine, 4, diverged=(DIVERGED,), seeds={SLOW: 1})
    for version in (1, 2, DIVERGED):
        export(settings, store, engine, MODEL, version, "cpu")
    export(settings, store, engine, MODEL, SLOW, "cpu", token_delay_s=TOKEN_DELAY_S)
    repo = settings.root / "triton" / "cpu"
    a = triton.Instance("triton-a", free_port(), free_port(), free_port())
    b = triton.Instance("triton-b", free_port(), free_port(), free_port())
    try:
        for instance, versions in ((a, [1, 2, DIVERGED, SLOW]), (b, [1])):
            triton.start(settings, instance, repo)
            triton.load(instance, MODEL, versions)
        rollout.promote(engine, MODEL, 1)
        yield Served(settings, engine, store, a, b)
    finally:
        for instance in (a, b):
            triton.stop(settings, instance)


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def refresh(self) -> None:
        """Make the gateway see rollout changes now (it also re-reads them every second)."""
        asyncio.run(self.gateway.refresh())


@contextmanager
def run_gateway(
    settings: Settings, engine: Engine, urls: list[str], port: int | None = None
) -> Iterator[RunningGateway]:
    """The gateway app on a real uvicorn server in a thread, with a full-scope key."""
    port = port or free_port()
    gateway = Gateway(settings, engine, urls)
    server = uvicorn.Server(
        uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _, secret = create_key(engine, "tests", ["generate", "models"], rate_per_s=1000, burst=2000)
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("gateway failed to start")
            thread.join(0.05)
        yield RunningGateway(f"http://127.0.0.1:{port}", gateway, secret)
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def stable_version(served: Served, gateway: RunningGateway, version: int) -> Iterator[None]:
    """Serve `version` as the stable one for a while, then version 1 again."""
    rollout.promote(served.engine, MODEL, version)
    gateway.refresh()
    try:
        yield
    finally:
        rollout.promote(served.engine, MODEL, 1)
        gateway.refresh()


def repository(settings: Settings) -> Path:
    return settings.root / "triton" / "cpu"
