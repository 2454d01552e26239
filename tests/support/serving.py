"""Helpers of the serving tests: registered tiny-model versions, Triton servers, gateways."""

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

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.lora import LoraSettings, adapter_state, apply_lora
from exforge.llm.model import load_model
from exforge.llm.registry import register_version
from serving import triton
from serving.app import create_app
from serving.gateway import Gateway
from serving.keys import create_key

MODEL = "elixir"


def register_versions(settings: Settings, store: ObjectStore, engine: Engine, count: int) -> None:
    """Register `count` versions of the tiny model, each with its own random adapter (as
    the trainer stores them), so the versions generate different text."""
    model = apply_lora(load_model("tiny", "none", settings.root / "models"), LoraSettings(rank=4))
    for version in range(1, count + 1):
        torch.manual_seed(version)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        prefix = f"models/{MODEL}/run{version}"
        store.put(f"{prefix}/adapter.safetensors", save(adapter_state(model)))
        config = model.peft_config["default"].to_dict()
        store.put(f"{prefix}/adapter_config.json", json.dumps(config, default=sorted).encode())
        register_version(
            engine, MODEL, "tiny", f"{prefix}/adapter.safetensors", f"run{version}", {}
        )


def triton_instance(name: str, ports: list[int]) -> triton.Instance:
    return triton.Instance(name, *ports)


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@contextmanager
def run_gateway(
    settings: Settings, engine: Engine, urls: list[str], port: int
) -> Iterator[RunningGateway]:
    """The gateway app on a real uvicorn server in a thread, with a full-scope key."""
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


def gather(*coroutines: object) -> list[object]:
    async def run() -> list[object]:
        return await asyncio.gather(*coroutines)  # type: ignore[arg-type]

    return asyncio.run(run())


def repository(settings: Settings) -> Path:
    return settings.root / "triton" / "cpu"
