"""QLoRA adapters with peft on a frozen NF4 base, and merging them back.

Only adapter weights train; the quantised base never changes (tests prove it bit for
bit). A registered version is merged into the unquantised base (`merged_model`), so the
result is a plain bf16 `MistralForCausalLM` that any serving stack can load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from pydantic import BaseModel, Field
from transformers import MistralForCausalLM

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    rslora: bool = Field(False, description="Scale by alpha/sqrt(rank) (stable at high rank).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (magnitude + direction).")
    gradient_checkpointing: bool = False


def apply_lora(model: MistralForCausalLM, settings: LoraSettings, fsdp: bool = False) -> PeftModel:
    """Freeze the (quantised) base and wrap the target modules with adapters.

    `fsdp`: leave the frozen non-quantised weights in the compute dtype. peft's k-bit
    preparation casts them to fp32, and FSDP flattens each layer into one tensor of one
    dtype, beside the 4-bit weights stored as the compute dtype. The adapters stay fp32.
    """
    if getattr(model, "is_quantized", False) and not fsdp:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    elif settings.gradient_checkpointing:
        # FSDP's backward re-gathers shards inside the recomputation: non-reentrant only.
        kwargs = {"use_reentrant": False} if fsdp else None
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (adapters), by a rank- and wrapper-independent name."""
    return {_plain(name): param for name, param in model.named_parameters() if param.requires_grad}


def _plain(name: str) -> str:
    # DDP's wrapper prefix; FSDP's in front of every unit it wraps
    return name.removeprefix("module.").replace("_fsdp_wrapped_module.", "")


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in trainable(model).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = trainable(model)
    missing = set(params) ^ set(state)
    if missing:
        raise KeyError(f"adapter state does not match the model: {sorted(missing)[:4]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def merged_model(settings: Settings, store: ObjectStore, row: dict[str, Any], target: Path) -> None:
    """The version's base with its LoRA adapter (if it has one) folded in, saved as bf16
    safetensors with the base's configuration (a fused version stays marked fused)."""
    from safetensors.torch import load as load_safetensors

    from exforge.llm.model import load_model, resolve_spec

    models = settings.root / "models"
    spec = resolve_spec(row["base_model"], store, models)
    model = load_model(spec, "none", models, dtype=torch.float32, fuse=False)
    adapter_key = row["adapter_key"]
    if adapter_key:
        config = json.loads(store.get(adapter_key.rsplit("/", 1)[0] + "/adapter_config.json"))
        adapted = get_peft_model(model, LoraConfig(**config | {"inference_mode": False}))
        load_adapter_state(adapted, load_safetensors(store.get(adapter_key)))
        model = adapted.merge_and_unload()
    model.to(torch.bfloat16).save_pretrained(target)
    own_tokenizer = Path(spec) / "tekken.json"
    if own_tokenizer.is_file():
        shutil.copy(own_tokenizer, target / "tekken.json")


def merged_version_dir(settings: Settings, store: ObjectStore, row: dict[str, Any]) -> Path:
    """`merged_model` of a registered version, made once per version under
    `<data dir>/eval-models/` (evaluation and compression reports read it there)."""
    target = settings.root / "eval-models" / row["name"] / str(row["version"])
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_model(settings, store, row, tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process merged it first
        shutil.rmtree(tmp)
    return target
