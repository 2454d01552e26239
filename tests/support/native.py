"""Writing a model in Mistral's native format (`params.json` + `consolidated.safetensors`):
no real weights can be downloaded here, so tests make such a directory from a random
model and prove that `exforge.llm.model` reads it back exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

from exforge.llm.model import LAYER_NAMES, TOP_NAMES, rotary_permute


def params_from_config(config: MistralConfig) -> dict[str, Any]:
    return {
        "dim": config.hidden_size,
        "hidden_dim": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_parameters["rope_theta"],
        "sliding_window": config.sliding_window,
    }


def hf_to_native(state: dict[str, torch.Tensor], config: MistralConfig) -> dict[str, torch.Tensor]:
    """The inverse of `native_to_hf` (exports for Mistral's own inference stack)."""
    top = {hf: native for native, hf in TOP_NAMES.items()}
    layer = {hf: native for native, hf in LAYER_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        _, _, index, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        native = layer[module]
        if native == "attention.wq":
            tensor = rotary_permute(tensor, config.num_attention_heads, inverse=True)
        elif native == "attention.wk":
            tensor = rotary_permute(tensor, config.num_key_value_heads, inverse=True)
        out[f"layers.{index}.{native}.{suffix}"] = tensor
    return out


def save_native(model: MistralForCausalLM, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_to_native(model.state_dict(), model.config).items()}
    save_file(state, directory / "consolidated.safetensors")
    (directory / "params.json").write_text(json.dumps(params_from_config(model.config), indent=2))
