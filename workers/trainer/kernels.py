"""Fused Triton kernels for the trainer's model on CUDA: RMSNorm, SwiGLU and RoPE.

Each is a `torch.autograd.Function` whose forward and backward are one kernel launch
each (the backward of RMSNorm adds a sum of per-program weight gradients), instead of the
several element-wise PyTorch ops, each a pass over memory, that transformers' Mistral runs:

- RMSNorm: `w · x / sqrt(mean(x²) + eps)` per row, statistics in fp32 as Mistral computes
  them; the backward recomputes the normalised row from `x` and the saved `1/rms`;
- SwiGLU: `silu(gate) · up`; the backward recomputes `silu` from the saved inputs, so the
  activation is never stored;
- RoPE: the rotation of each head's halves by `cos`/`sin` (transformers' `rotate_half`
  convention) for all heads of one token in one program; its backward is the inverse
  rotation.

`use_fused_kernels(model)` swaps a Mistral model's norms, MLPs and attention modules for
subclasses that call these (in place: the same parameters, peft adapters inside them
keep working). Importing this module needs `triton`; with `TRITON_INTERPRET=1` set before
the import, Triton's interpreter runs the same kernels on CPU tensors (numpy, fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralMLP,
    MistralRMSNorm,
)

from exforge.llm.fusion import Attention

ELEMENTS_PER_PROGRAM = 1024


def _row_block(columns: int) -> int:
    return triton.next_power_of_2(columns)


def _programs(rows: int, device: torch.device) -> int:
    """How many programs share the rows of a reduction (four per SM on a GPU)."""
    if device.type == "cuda":
        return min(rows, torch.cuda.get_device_properties(device).multi_processor_count * 4)
    return min(rows, 4)


# ------------------------------------------------------------------------------ RMSNorm


@triton.jit
def _rms_norm_forward(X, W, Y, RSTD, stride, columns, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < columns
    x = tl.load(X + row * stride + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / columns + eps)
    tl.store(RSTD + row, rstd)
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride + offsets, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward(
    DY, X, W, RSTD, DX, DW, stride, rows, columns, rows_per_program, BLOCK: tl.constexpr
):
    program = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    in_row = offsets < columns
    w = tl.load(W + offsets, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = program * rows_per_program + i
        # no `in_row & (row < rows)`: Triton's interpreter gives int32, not a mask
        mask = offsets < tl.where(row < rows, columns, 0)
        x = tl.load(X + row * stride + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < rows, other=0.0)
        dyw = dy * w
        projection = tl.sum(dyw * x, axis=0) / columns
        dx = rstd * dyw - x * (rstd * rstd * rstd) * projection
        tl.store(DX + row * stride + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x * rstd
    tl.store(DW + program * columns + offsets, dw, mask=in_row)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        columns = x.shape[-1]
        rows = x.reshape(-1, columns).contiguous()
        dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(rows.shape, dtype=dtype, device=x.device)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block = _row_block(columns)
        _rms_norm_forward[(rows.shape[0],)](rows, weight, y, rstd, columns, columns, eps, block)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(*x.shape[:-1], columns)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        rows, weight, rstd = ctx.saved_tensors
        count, columns = rows.shape
        grad = dy.reshape(count, columns).contiguous()
        dx = torch.empty_like(rows)
        programs = _programs(count, rows.device)
        per_program = triton.cdiv(count, programs)
        partial = torch.empty((programs, columns), dtype=torch.float32, device=rows.device)
        _rms_norm_backward[(programs,)](
            grad, rows, weight, rstd, dx, partial, columns, count, columns, per_program,
            _row_block(columns),
        )  # fmt: skip
        dw = partial.sum(0).to(weight.dtype)
        return dx.view(*dy.shape[:-1], columns), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


# ------------------------------------------------------------------------------- SwiGLU


@triton.jit
def _silu_mul_forward(A, B, C, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = a * tl.sigmoid(a)
    tl.store(C + offsets, (silu * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_backward(DC, A, B, DA, DB, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    dc = tl.load(DC + offsets, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(a)
    silu = a * sigmoid
    da = dc * b * (sigmoid + silu * (1.0 - sigmoid))
    tl.store(DA + offsets, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offsets, (dc * silu).to(DB.dtype.element_ty), mask=mask)


class SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        count = gate.numel()
        grid = (triton.cdiv(count, ELEMENTS_PER_PROGRAM),)
        _silu_mul_forward[grid](gate, up, out, count, ELEMENTS_PER_PROGRAM)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        count = gate.numel()
        grid = (triton.cdiv(count, ELEMENTS_PER_PROGRAM),)
        _silu_mul_backward[grid](grad, gate, up, d_gate, d_up, count, ELEMENTS_PER_PROGRAM)
        return d_gate, d_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SiluMulFunction.apply(gate, up)


# --------------------------------------------------------------------------------- RoPE


# One program per token: x laid out [heads, 2·half], cos and sin [2·half]. Forward:
# (x1, x2) → (x1·c1 - x2·s1, x2·c2 + x1·s2); inverse: (d1·c1 + d2·s2, d2·c2 - d1·s1).
@triton.jit
def _rotary(
    X, COS, SIN, Y, heads, half, INVERSE: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, HEADS)[:, None]
    column = tl.arange(0, HALF)[None, :]
    in_half = column < half
    mask = (head < heads) & in_half
    first = token * heads * 2 * half + head * 2 * half + column
    x1 = tl.load(X + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + first + half, mask=mask, other=0.0).to(tl.float32)
    angles = token * 2 * half + column
    c1 = tl.load(COS + angles, mask=in_half, other=0.0).to(tl.float32)
    c2 = tl.load(COS + angles + half, mask=in_half, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + angles, mask=in_half, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + angles + half, mask=in_half, other=0.0).to(tl.float32)
    if INVERSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(Y + first, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + first + half, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x: [batch, heads, seq, dim] (any strides); cos, sin: [batch or 1, seq, dim]."""
    batch, heads, seq, dim = x.shape
    tokens = x.transpose(1, 2).contiguous()  # [batch, seq, heads, dim]: one token per row
    out = torch.empty_like(tokens)
    half = dim // 2
    _rotary[(batch * seq,)](
        tokens, cos, sin, out, heads, half, inverse,
        triton.next_power_of_2(heads), triton.next_power_of_2(half),
    )  # fmt: skip
    return out.transpose(1, 2)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, _, seq, dim = x.shape
        cos = cos.expand(batch, seq, dim).contiguous()
        sin = sin.expand(batch, seq, dim).contiguous()
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(query, key, cos, sin)`, fused."""
    return RotaryFunction.apply(query, cos, sin), RotaryFunction.apply(key, cos, sin)


# ------------------------------------------------------------------------- the modules


class KernelRMSNorm(MistralRMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class KernelMLP(MistralMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class KernelAttention(Attention):
    def rotate(
        self, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(query, key, cos, sin)


def use_fused_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Run the RMSNorms, SwiGLU MLPs and rotary embeddings of a Mistral model (or of any
    module holding its layers) through the kernels; in place, the modules keep their
    parameters and children."""
    swaps = {
        MistralRMSNorm: KernelRMSNorm,
        MistralMLP: KernelMLP,
        MistralAttention: KernelAttention,
    }
    for module in model.modules():
        swap = swaps.get(type(module))
        if swap is KernelMLP and module.config.hidden_act != "silu":
            continue
        if swap is not None:
            module.__class__ = swap
    return model
