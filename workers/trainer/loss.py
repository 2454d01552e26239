"""The loss at the output head, in chunks of tokens: full-vocabulary logits never exist.

Over Tekken's 131,072-token vocabulary the logits of a batch are the largest tensors of a
step (2 x 512 positions: 512 MiB in fp32, then as much again for their softmax and their
gradient). `head_losses` computes, chunk by chunk of trained positions only (prompt and
padding positions are skipped, not masked), the logits, the per-token loss and the
gradient with respect to the hidden states at once, as Liger's and Unsloth's fused
linear cross-entropy do; the backward pass only scales the stored gradient. The output
head is frozen (QLoRA trains adapters only), so no gradient for it is kept.

With a teacher (knowledge distillation) the loss of a token is
`(1 - alpha)·CE(student) + alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, the teacher's
logits made chunk by chunk from its hidden states in the same loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch.distributed.fsdp import FullyShardedDataParallel

from exforge.llm.chat import IGNORE

DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher's hidden states at the trained positions and its output head."""

    hidden: torch.Tensor  # (tokens, teacher hidden size)
    weight: torch.Tensor  # (vocabulary, teacher hidden size)
    temperature: float
    alpha: float  # weight of the distillation term


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: Teacher | None,
    rows: slice,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses of one chunk of positions and d(loss)/d(logits) for them, in fp32."""
    logits = (hidden[rows] @ weight.T).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    target = targets[rows].unsqueeze(1)
    losses = -log_probs.gather(1, target).squeeze(1)
    grad = log_probs.exp()
    grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
    if teacher is None:
        return losses, grad
    t, alpha = teacher.temperature, teacher.alpha
    teacher_logits = (teacher.hidden[rows] @ teacher.weight.T).float()
    teacher_log = torch.log_softmax(teacher_logits / t, dim=-1)
    student_log = torch.log_softmax(logits / t, dim=-1)
    teacher_probs = teacher_log.exp()
    kd = (teacher_probs * (teacher_log - student_log)).sum(-1) * t * t
    kd_grad = (student_log.exp() - teacher_probs) * t
    return (1 - alpha) * losses + alpha * kd, (1 - alpha) * grad + alpha * kd_grad


class _HeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        teacher: Teacher | None,
        chunk: int,
    ) -> torch.Tensor:
        losses = torch.empty(len(targets), device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        for start in range(0, len(targets), chunk):
            rows = slice(start, start + chunk)
            losses[rows], grad_logits = _chunk_loss(hidden, weight, targets, teacher, rows)
            grad_hidden[rows] = grad_logits @ weight.float()
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        grad = (grad_hidden * grad_losses.unsqueeze(1)).to(ctx.hidden_dtype)
        return grad, None, None, None, None


def head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: Teacher | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-token losses of `targets` (tokens,) from final hidden states (tokens, hidden)."""
    if weight.requires_grad:
        raise ValueError("the chunked head loss keeps no gradient for a trainable output head")
    return _HeadLosses.apply(hidden, weight.detach(), targets, teacher, chunk)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model with the `lm_head` inside DDP's and peft's wrappers."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if isinstance(inner, PeftModel) else inner


@contextmanager
def hidden_output(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """While open, the model's `logits` output is its final hidden states; yields the
    output head's weight."""
    lm = causal_lm(model)
    head = lm.lm_head
    lm.lm_head = torch.nn.Identity()
    try:
        yield head.weight
    finally:
        lm.lm_head = head


def hidden_states(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states (batch, positions, hidden) and the output head's weight."""
    device = next(model.parameters()).device
    with hidden_output(model) as weight:
        hidden = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,  # a cache disables the packed-sequence mask
        ).logits
    return hidden, weight


def chunkable(model: torch.nn.Module, chunk: int | None) -> bool:
    """Whether the output head is applied outside the forward: when chunks are asked for,
    not under FSDP (it holds the weight in shards there) and not when the head trains."""
    if chunk is None or isinstance(model, FullyShardedDataParallel):
        return False
    return not causal_lm(model).lm_head.weight.requires_grad


@dataclass(frozen=True)
class Distillation:
    """A frozen teacher whose softened output the student learns alongside the targets."""

    teacher: torch.nn.Module
    temperature: float
    alpha: float

    @torch.no_grad()
    def at(self, batch: dict[str, torch.Tensor], trained: torch.Tensor) -> Teacher:
        hidden, weight = hidden_states(self.teacher, batch)
        return Teacher(hidden[trained], weight, self.temperature, self.alpha)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position in fp32 (0 where the target is ignored)."""
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(targets)


def forward_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    distillation: Distillation | None = None,
    chunk: int | None = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-token losses of a packed batch (positions tell the model where samples start),
    0 where the target is ignored; chunked at the head wherever `chunkable` allows (`chunk`
    None: the whole logits, as under FSDP)."""
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    if not chunkable(model, chunk):
        if distillation is not None:
            raise ValueError("distillation needs the output head outside the forward (no FSDP)")
        logits = model(
            input_ids=batch["input_ids"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
        ).logits
        return token_losses(logits, targets)
    hidden, weight = hidden_states(model, batch)
    trained = targets != IGNORE
    teacher = distillation.at(batch, trained) if distillation is not None else None
    losses = head_losses(hidden[trained], weight, targets[trained], teacher, chunk)
    full = losses.new_zeros(targets.shape)
    full[trained] = losses
    return full
