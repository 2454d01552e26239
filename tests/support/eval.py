"""A registered tiny model version for evaluation tests: the tiny preset with a LoRA
adapter stored where a training run stores it, registered in the SQLite registry."""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import save as save_safetensors
from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.lora import LoraSettings, adapter_state, apply_lora
from exforge.llm.model import load_model
from exforge.llm.registry import register_version


def register_tiny_version(
    settings: Settings, store: ObjectStore, engine: Engine, name: str
) -> dict[str, Any]:
    model = apply_lora(load_model("tiny", "none", settings.root / "models"), LoraSettings(rank=4))
    prefix = f"models/{name}/test-run/"
    store.put(prefix + "adapter.safetensors", save_safetensors(adapter_state(model)))
    config = model.peft_config["default"].to_dict()
    store.put(prefix + "adapter_config.json", json.dumps(config, default=sorted).encode())
    event = register_version(engine, name, "tiny", prefix + "adapter.safetensors", None, {})
    return event.model_dump(mode="json")
