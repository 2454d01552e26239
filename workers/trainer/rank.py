"""Choosing the LoRA rank: two cheap measurements instead of a guess.

**Loss after a fixed budget** (`loss_after_budget`): train fresh adapters of each
candidate rank on the same batches for the same few steps and compare the final losses.
Pick the smallest rank whose loss is within a tolerance of the best: a higher rank that
does not lower the loss only costs memory and invites over-fitting. Use it before a
run, on a slice of the stage's data, with `steps` around 50-200 on the real model.

**SVD energy of a trained ΔW** (`effective_ranks`): after a (short) run at a generous
rank, ΔW = scale · B·A of every adapted module is decomposed; the number of singular
values holding `energy` (e.g. 90 %) of Σσ² is the rank the update actually uses. If
most modules need far fewer than the trained rank, train the next run at about the
largest (or a high percentile of the) effective ranks; if many saturate at the trained
rank, the rank is too low.

Both work on the CPU with the `tiny` preset too, where the numbers only prove the
mechanics; the meaningful numbers come from the real base and data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from exforge.llm.lora import LoraSettings, apply_lora
from workers.trainer.packing import forward_losses


def loss_after_budget(
    load_base: Callable[[], torch.nn.Module],
    ranks: Sequence[int],
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float = 2e-4,
    seed: int = 0,
) -> dict[int, float]:
    """Mean token loss of the last batch after `steps` AdamW steps, for each rank.

    `load_base` returns a fresh frozen base each time (adapters wrap it in place); the
    batches cycle, so every rank sees exactly the same data in the same order.
    """
    losses = {}
    for rank in ranks:
        torch.manual_seed(seed)
        model = apply_lora(load_base(), LoraSettings(rank=rank, alpha=2.0 * rank))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
        model.train()
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = forward_losses(model, batch).sum() / (batch["targets"] != -100).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        losses[rank] = float(loss.detach())
    return losses


def smallest_good_rank(losses: dict[int, float], tolerance: float = 0.02) -> int:
    """The smallest rank whose loss is within `tolerance` (relative) of the best."""
    best = min(losses.values())
    return min(rank for rank, loss in losses.items() if loss <= best * (1 + tolerance))


def effective_rank(delta: torch.Tensor, energy: float = 0.9) -> int:
    """How many singular values of ΔW hold `energy` of its squared Frobenius norm."""
    squared = torch.linalg.svdvals(delta.float()) ** 2
    if squared.sum() == 0:
        return 0
    cumulative = torch.cumsum(squared, 0) / squared.sum()
    return int((cumulative < energy).sum()) + 1


def effective_ranks(model: torch.nn.Module, energy: float = 0.9) -> dict[str, int]:
    """Effective rank of ΔW = scale · B·A for every LoRA-wrapped module of a peft model."""
    ranks = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a = module.lora_A["default"].weight
        b = module.lora_B["default"].weight
        delta = module.scaling["default"] * (b.detach().float() @ a.detach().float())
        ranks[name] = effective_rank(delta, energy)
    return ranks
