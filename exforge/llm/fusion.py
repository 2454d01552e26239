"""Projection fusion: Q, K and V as one matmul, gate and up as one, in each layer.

`fuse_projections` swaps every layer's attention and MLP for fused equivalents holding
the concatenated weights ([q; k; v] and [gate; up]); the outputs are the same up to
floating-point summation order. A model saved with `config.fused_projections = true` is
stored with the ordinary, unfused weight names any loader reads, and
`exforge.llm.model.load_model` fuses it again as it loads it unquantised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import MistralForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralMLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

FLAG = "fused_projections"


def _concatenated(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    return fused


class Attention(MistralAttention):
    """Mistral attention whose projections and rotary embedding are methods, so that a
    subclass replaces one of them (fused projections, a rotary kernel) and nothing else."""

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Query, key and value as [batch, heads, seq, head_dim]."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        return tuple(
            proj(hidden_states).view(shape).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )

    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary_pos_emb(query, key, cos, sin)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project(hidden_states)
        query, key = self.rotate(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )
        output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(output), weights


class FusedAttention(Attention):
    """Mistral attention with one [q; k; v] projection."""

    def __init__(self, unfused: MistralAttention) -> None:
        torch.nn.Module.__init__(self)
        self.config = unfused.config
        self.layer_idx = unfused.layer_idx
        self.head_dim = unfused.head_dim
        self.num_key_value_groups = unfused.num_key_value_groups
        self.scaling = unfused.scaling
        self.attention_dropout = unfused.attention_dropout
        self.is_causal = True
        self.sizes = [unfused.q_proj.out_features, unfused.k_proj.out_features]
        self.sizes.append(unfused.v_proj.out_features)
        self.qkv_proj = _concatenated([unfused.q_proj, unfused.k_proj, unfused.v_proj])
        self.o_proj = unfused.o_proj

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        return tuple(
            part.view(shape).transpose(1, 2)
            for part in self.qkv_proj(hidden_states).split(self.sizes, dim=-1)
        )


class FusedMLP(torch.nn.Module):
    """SwiGLU with one [gate; up] projection."""

    def __init__(self, unfused: MistralMLP) -> None:
        super().__init__()
        self.width = unfused.gate_proj.out_features
        self.gate_up_proj = _concatenated([unfused.gate_proj, unfused.up_proj])
        self.down_proj = unfused.down_proj
        self.act_fn = unfused.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: MistralForCausalLM) -> MistralForCausalLM:
    """Fuse every layer's projections in place (plain, unquantised linear layers only)."""
    for layer in model.model.layers:
        if not isinstance(layer.self_attn, FusedAttention):
            layer.self_attn = FusedAttention(layer.self_attn)
        if not isinstance(layer.mlp, FusedMLP):
            layer.mlp = FusedMLP(layer.mlp)
    setattr(model.config, FLAG, True)
    return model


def marked_fused(model: MistralForCausalLM) -> bool:
    return bool(getattr(model.config, FLAG, False))
