"""The trainer's Triton kernels (RMSNorm, SwiGLU, RoPE) against transformers' PyTorch ops,
forward and gradients in fp32, run on CPU tensors by Triton's interpreter: odd sequence
lengths, a hidden size, MLP width, head count and head dimension that are no powers of
two. And where they are used: on CUDA when the config asks, never on the CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralRMSNorm, apply_rotary_pos_emb

from exforge.llm.model import preset_config
from workers.trainer.recipe import TrainConfig, uses_fused_kernels

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The kernels module, its kernels run by Triton's interpreter (tests/conftest.py sets
    TRITON_INTERPRET before triton is first imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from workers.trainer import kernels

    assert isinstance(kernels._silu_mul_forward, InterpretedFunction)
    return kernels


def gradients_match(
    fused: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *inputs: torch.Tensor,
) -> None:
    """Same outputs, and the same input gradients for the same random output gradients."""
    mine = [x.detach().clone().requires_grad_() for x in inputs]
    theirs = [x.detach().clone().requires_grad_() for x in inputs]
    outputs, expected = fused(*mine), reference(*theirs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    generator = torch.Generator().manual_seed(7)
    grads = [torch.randn(e.shape, generator=generator) for e in expected]
    for out, exp in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, exp, **TOLERANCE)
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(expected, grads)
    for x, y in zip(mine, theirs, strict=True):
        assert x.grad is not None and y.grad is not None
        assert x.grad.abs().max() > 0
        torch.testing.assert_close(x.grad, y.grad, **TOLERANCE)


@pytest.mark.parametrize(("seq", "hidden"), [(7, 80), (13, 1000)])
def test_rms_norm_equals_mistral_rms_norm(kernels: ModuleType, seq: int, hidden: int) -> None:
    torch.manual_seed(0)
    norm = MistralRMSNorm(hidden, eps=1e-5)
    x, weight = torch.randn(3, seq, hidden) * 3, torch.randn(hidden)

    def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(norm, {"weight": weight}, (x,))

    gradients_match(lambda x, w: kernels.rms_norm(x, w, 1e-5), reference, x, weight)


@pytest.mark.parametrize("shape", [(2, 7, 144), (1, 13, 1000)])
def test_silu_mul_equals_swiglu(kernels: ModuleType, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    gate, up = torch.randn(shape) * 4, torch.randn(shape)
    gradients_match(kernels.silu_mul, lambda g, u: torch.nn.functional.silu(g) * u, gate, up)


def rotary_tables(batch: int, seq: int, dim: int, offset: int = 0) -> tuple[torch.Tensor, ...]:
    positions = torch.arange(offset, offset + seq).expand(batch, -1).float()
    frequencies = 1.0 / 1e6 ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions[..., None] * frequencies
    table = torch.cat([angles, angles], dim=-1)
    return table.cos(), table.sin()


@pytest.mark.parametrize(("seq", "heads", "kv_heads", "dim"), [(7, 5, 1, 24), (13, 4, 2, 16)])
def test_rotary_equals_apply_rotary_pos_emb(
    kernels: ModuleType, seq: int, heads: int, kv_heads: int, dim: int
) -> None:
    torch.manual_seed(2)
    # the attention's layout: projections viewed [batch, seq, heads, dim], then transposed
    query = torch.randn(2, seq, heads, dim).transpose(1, 2)
    key = torch.randn(2, seq, kv_heads, dim).transpose(1, 2)
    cos, sin = rotary_tables(2, seq, dim, offset=3)
    gradients_match(
        lambda q, k: kernels.rotary(q, k, cos, sin),
        lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
        query,
        key,
    )
    # one table for the whole batch (position ids of batch size 1) broadcasts
    one_cos, one_sin = (t[:1] for t in rotary_tables(2, seq, dim))
    rotated, _ = kernels.rotary(query, key, one_cos, one_sin)
    expected, _ = apply_rotary_pos_emb(query, key, one_cos, one_sin)
    torch.testing.assert_close(rotated, expected, **TOLERANCE)


def test_model_with_kernels_equals_the_model_without(kernels: ModuleType) -> None:
    torch.manual_seed(3)
    config = preset_config(
        "tiny",
        vocab_size=512,
        hidden_size=80,
        intermediate_size=144,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=16,
    )
    plain = MistralForCausalLM(config)
    fused = kernels.use_fused_kernels(copy.deepcopy(plain))
    modules = {type(m).__name__ for m in fused.modules()}
    assert {"KernelRMSNorm", "KernelMLP", "KernelAttention"} <= modules
    assert not {"MistralRMSNorm", "MistralMLP", "MistralAttention"} & modules
    ids = torch.randint(512, (2, 11), generator=torch.Generator().manual_seed(4))
    losses = [model(input_ids=ids, labels=ids, use_cache=False).loss for model in (fused, plain)]
    torch.testing.assert_close(losses[0], losses[1], **TOLERANCE)
    for loss in losses:
        loss.backward()
    for (name, mine), theirs in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert mine.grad is not None and theirs.grad is not None, name
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_kernels_only_on_cuda_when_asked() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert uses_fused_kernels(TrainConfig(), cuda)
    assert not uses_fused_kernels(TrainConfig(fused_kernels=False), cuda)
    assert not uses_fused_kernels(TrainConfig(), cpu)
    assert not uses_fused_kernels(TrainConfig(fused_kernels=True), cpu)
