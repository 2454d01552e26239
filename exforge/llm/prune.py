"""Structured pruning of a Mistral model: whole decoder layers, and MLP channels.

Depth: a decoder layer whose output hidden states point where its input ones did adds
least; its score is the angular distance arccos(cos(x_in, x_out))/π averaged over real
tokens of calibration batches (Gromov et al., "The Unreasonable Ineffectiveness of the
Deeper Layers"). The layers with the smallest scores go.

Width: an MLP channel's importance is the mean magnitude of its activation, the input of
`down_proj` (act(gate(x))·up(x)), over the same tokens; every layer keeps its most
important channels, the same number in each layer so that the result is an ordinary
Mistral configuration (one `intermediate_size`) any loader reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import MistralForCausalLM

Batch = dict[str, torch.Tensor]


def _layers(model: MistralForCausalLM) -> torch.nn.ModuleList:
    return model.model.layers


def _real_tokens(batch: Batch) -> torch.Tensor:
    """Positions holding a sample's token (padding carries `sample_index` -1)."""
    if "sample_index" in batch:
        return batch["sample_index"] >= 0
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def _run(model: MistralForCausalLM, batches: Iterable[Batch]) -> Iterable[torch.Tensor]:
    """Forward each batch (no cache: packed samples keep their own masks); yields the
    mask of its real tokens after the forward."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(
                input_ids=batch["input_ids"].to(device),
                position_ids=batch["position_ids"].to(device),
                use_cache=False,
            )
            yield _real_tokens(batch).to(device)


def layer_distances(model: MistralForCausalLM, batches: Iterable[Batch]) -> list[float]:
    """Per decoder layer: the mean angular distance (0..1) between its input and output."""
    layers = _layers(model)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def before(index: int) -> Any:
        def hook(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(index: int) -> Any:
        def hook(_: Any, __: Any, output: Any) -> None:
            outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [
        handle
        for i, layer in enumerate(layers)
        for handle in (
            layer.register_forward_pre_hook(before(i), with_kwargs=True),
            layer.register_forward_hook(after(i)),
        )
    ]
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    try:
        for mask in _run(model, batches):
            for i in range(len(layers)):
                cosine = torch.nn.functional.cosine_similarity(
                    inputs[i][mask].double(), outputs[i][mask].double(), dim=-1
                )
                sums[i] += (torch.arccos(cosine.clamp(-1, 1)) / math.pi).sum().item()
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()


def least_distant(distances: Sequence[float], count: int) -> list[int]:
    """The `count` layers with the smallest distances, in layer order."""
    if not 0 < count < len(distances):
        raise ValueError(f"can drop 1 to {len(distances) - 1} of {len(distances)} layers")
    return sorted(sorted(range(len(distances)), key=lambda i: (distances[i], i))[:count])


def drop_layers(model: MistralForCausalLM, indices: Iterable[int]) -> MistralForCausalLM:
    """Remove decoder layers in place; the rest are renumbered (their KV-cache slots)."""
    dropped = set(indices)
    kept = [layer for i, layer in enumerate(_layers(model)) if i not in dropped]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    model.model.layers = torch.nn.ModuleList(kept)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in dropped]
    config.num_hidden_layers = len(kept)
    return model


def channel_importance(model: MistralForCausalLM, batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Per layer: mean |activation| of each MLP channel over the real tokens."""
    layers = _layers(model)
    seen: dict[int, torch.Tensor] = {}

    def capture(index: int) -> Any:
        def hook(_: Any, args: tuple[torch.Tensor, ...]) -> None:
            seen[index] = args[0]

        return hook

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)
    ]
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    count = 0
    try:
        for mask in _run(model, batches):
            for i in range(len(layers)):
                sums[i] += seen[i][mask].abs().double().sum(0).cpu()
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return [total / max(count, 1) for total in sums]


def keep_channels(model: MistralForCausalLM, importance: Sequence[torch.Tensor], keep: int) -> None:
    """Keep each layer's `keep` most important MLP channels (in place)."""
    width = model.config.intermediate_size
    if not 0 < keep <= width:
        raise ValueError(f"can keep 1 to {width} MLP channels, not {keep}")
    for layer, scores in zip(_layers(model), importance, strict=True):
        chosen = torch.topk(scores, keep).indices.sort().values
        mlp = layer.mlp
        mlp.gate_proj = _rows(mlp.gate_proj, chosen)
        mlp.up_proj = _rows(mlp.up_proj, chosen)
        mlp.down_proj = _columns(mlp.down_proj, chosen)
        mlp.intermediate_size = keep
    model.config.intermediate_size = keep


def _rows(linear: torch.nn.Linear, rows: torch.Tensor) -> torch.nn.Linear:
    smaller = torch.nn.Linear(linear.in_features, len(rows), bias=False)
    smaller.weight = torch.nn.Parameter(linear.weight.detach()[rows.to(linear.weight.device)])
    return smaller


def _columns(linear: torch.nn.Linear, columns: torch.Tensor) -> torch.nn.Linear:
    smaller = torch.nn.Linear(len(columns), linear.out_features, bias=False)
    weight = linear.weight.detach()[:, columns.to(linear.weight.device)].contiguous()
    smaller.weight = torch.nn.Parameter(weight)
    return smaller
