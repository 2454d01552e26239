"""Base models: presets, local directories, Mistral's native format, quantisation.

Shared by training, evaluation and serving. A model spec is a preset name (`tiny`,
`devstral-small`), a directory with a transformers `config.json`, a directory in Mistral's
native format (`params.json` + `consolidated.safetensors`), or a Hugging Face id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, MistralConfig, MistralForCausalLM

from exforge.core.store import ObjectStore
from exforge.llm.fusion import fuse_projections, marked_fused

TEKKEN_VOCAB = 131_072
Quantisation = Literal["none", "nf4", "int8"]

# Devstral Small 2505/2507 as published; a real directory's config.json always wins.
PRESETS: dict[str, dict[str, Any]] = {
    "devstral-small": {
        "hidden_size": 5120,
        "intermediate_size": 32768,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": TEKKEN_VOCAB,
        "rope_theta": 1e9,
        "sliding_window": None,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # Same architecture and vocabulary, dimensions small enough for CPU tests.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": TEKKEN_VOCAB,
        "rope_theta": 1e9,
        "sliding_window": None,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    compute_dtype: torch.dtype
    bf16: bool


def detect_device() -> DeviceInfo:
    """CUDA with bf16 where the GPU has it, else CPU (bf16 kernels exist there too)."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        # Under torchrun each process owns the GPU of its LOCAL_RANK (modulo: a launcher
        # may show each process its own GPU only).
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        return DeviceInfo(device, torch.bfloat16 if bf16 else torch.float16, bf16)
    return DeviceInfo(torch.device("cpu"), torch.bfloat16, True)


def preset_config(name: str, **overrides: Any) -> MistralConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return MistralConfig(**{**PRESETS[name], **overrides})


STORE_SPEC = "store:"


def store_spec(prefix: str) -> str:
    """The model spec of a model directory kept in the object store under `prefix`."""
    return f"{STORE_SPEC}{prefix.rstrip('/')}"


def save_to_store(model: MistralForCausalLM, store: ObjectStore, prefix: str) -> str:
    """Write the model (config, safetensors) under `prefix` in the store; its spec."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            store.put(f"{prefix.rstrip('/')}/{path.name}", path.read_bytes())
    return store_spec(prefix)


def resolve_spec(spec: str, store: ObjectStore, cache_dir: Path) -> str:
    """A `store:PREFIX` spec as a local directory (its files fetched once, under
    `cache_dir/store/`); any other spec as it is."""
    if not spec.startswith(STORE_SPEC):
        return spec
    prefix = spec.removeprefix(STORE_SPEC)
    target = cache_dir / "store" / prefix
    if (target / "config.json").is_file():
        return str(target)
    keys = list(store.list(f"{prefix}/"))
    if not keys:
        raise FileNotFoundError(f"the store holds no model under {prefix}/")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (tmp / key.rsplit("/", 1)[1]).write_bytes(store.get(key))
    try:
        tmp.rename(target)
    except OSError:  # another process fetched it first
        shutil.rmtree(tmp)
    return str(target)


def materialise_preset(name: str, directory: Path, seed: int = 0) -> Path:
    """Write a randomly initialised preset model as safetensors, once per (name, seed).

    Quantised loading goes through `from_pretrained`, which needs weights on disk; the
    seed makes every worker and every resume see the same base.
    """
    target = directory / f"{name}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    torch.manual_seed(seed)
    model = MistralForCausalLM(preset_config(name))
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another rank got there first, with the same weights
        shutil.rmtree(tmp)
    return target


def quantisation_config(
    kind: Quantisation, compute_dtype: torch.dtype, fsdp: bool = False
) -> BitsAndBytesConfig | None:
    """NF4 with double quantisation and bf16 compute (QLoRA), INT8, or nothing.

    `fsdp`: store the packed 4-bit weights as the compute dtype (same bytes, other element
    type): FSDP flattens a layer's weights into one tensor, which needs a single dtype.
    """
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if fsdp else torch.uint8,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(
    spec: str,
    quantisation: Quantisation = "nf4",
    cache_dir: Path | None = None,
    seed: int = 0,
    fsdp: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    fuse: bool = True,
) -> MistralForCausalLM:
    """Load a model (training, evaluation and serving all load through here), memory-mapped
    and layer by layer (`low_cpu_mem_usage`).

    `fsdp`: lay the weights out so FSDP can shard them (see `quantisation_config`).
    `dtype` and `device` default to `detect_device`'s compute dtype and device.
    `fuse`: an unquantised model whose configuration is marked fused gets its projections
    fused (`exforge.llm.fusion`); False keeps the stored layout (merging, compressing).
    """
    found = detect_device()
    dtype = dtype or found.compute_dtype
    device = device or found.device
    path = Path(spec)
    if spec in PRESETS and not path.exists():
        path = materialise_preset(spec, cache_dir or Path(".data/models"), seed)
    elif (path / "params.json").is_file() and not (path / "config.json").is_file():
        path = native_to_hf_dir(path, (cache_dir or Path(".data/models")) / f"{path.name}-hf")
    model = MistralForCausalLM.from_pretrained(
        str(path) if path.exists() else spec,
        quantization_config=quantisation_config(quantisation, dtype, fsdp),
        dtype=dtype,
        low_cpu_mem_usage=True,
        device_map={"": device.index} if device.type == "cuda" else "cpu",
    )
    if quantisation != "none":
        keep_standard_4bit_layout(model)
    elif fuse and marked_fused(model):
        fuse_projections(model)
    return model


def keep_standard_4bit_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    It repacks on the first no-grad eval forward and keeps that layout, whose kernel has
    no autograd: training after a validation pass would then get wrong gradients, and
    dequantising (merge, reports) would read the repacked bytes.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------- Mistral native format


def config_from_params(params: dict[str, Any]) -> MistralConfig:
    """Mistral's `params.json` as a transformers configuration."""
    return MistralConfig(
        hidden_size=params["dim"],
        intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
        head_dim=params.get("head_dim", params["dim"] // params["n_heads"]),
        vocab_size=params["vocab_size"],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 1e6),
        sliding_window=params.get("sliding_window"),
        max_position_embeddings=params.get("max_position_embeddings", 131072),
        tie_word_embeddings=False,
    )


LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def rotary_permute(weight: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """Mistral rotates interleaved pairs (x0,x1),(x2,x3)…; transformers rotates halves.
    Reordering each head's q/k rows maps one convention onto the other."""
    rows, cols = weight.shape
    half = rows // heads // 2
    if inverse:
        return weight.view(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return weight.view(heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def native_to_hf(state: dict[str, torch.Tensor], config: MistralConfig) -> dict[str, torch.Tensor]:
    """Rename (and, for q/k, permute) native weights to transformers' Mistral names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        _, index, rest = name.split(".", 2)
        module, suffix = rest.rsplit(".", 1)
        if module == "attention.wq":
            tensor = rotary_permute(tensor, config.num_attention_heads)
        elif module == "attention.wk":
            tensor = rotary_permute(tensor, config.num_key_value_heads)
        out[f"model.layers.{index}.{LAYER_NAMES[module]}.{suffix}"] = tensor
    return out


def native_to_hf_dir(source: Path, target: Path) -> Path:
    """Convert a native directory once into a transformers one (safetensors, mmap-able)."""
    if (target / "config.json").is_file():
        return target
    config = config_from_params(json.loads((source / "params.json").read_text()))
    state = native_to_hf(load_file(source / "consolidated.safetensors"), config)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    model.load_state_dict(state, assign=True)
    model.save_pretrained(target)
    return target
