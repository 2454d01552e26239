"""Elastic Weight Consolidation over the adapter parameters.

After a stage, the diagonal Fisher F (mean squared per-sample gradient of the
log-likelihood) says how much each trainable weight mattered for that stage; later
stages pay λ/2 · Σ F·(θ - θ*)² for moving it away from its value θ* at the stage end.
Fishers of successive stages add up (online EWC); θ* is the latest stage end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exforge.llm.chat import IGNORE
from exforge.llm.lora import trainable
from workers.trainer.loss import forward_losses


@dataclass
class EwcState:
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    stages: list[int] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat form for safetensors (checkpoints)."""
        return {
            **{f"fisher/{k}": v for k, v in self.fisher.items()},
            **{f"anchor/{k}": v for k, v in self.anchor.items()},
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], stages: list[int]) -> EwcState:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(part("fisher/"), part("anchor/"), list(stages))


def estimate_fisher(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mean over batches of squared gradients of the summed log-likelihood.

    Pass one sample per batch for the true per-sample diagonal; larger batches give the
    cheaper batch-level estimate. A batch without trained tokens (padding that keeps FSDP
    ranks in step) adds nothing and is not counted.
    """
    params = trainable(model)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        forward_losses(model, batch).sum().backward()
        for name, param in params.items():
            if param.grad is not None:
                fisher[name] += param.grad.detach().float() ** 2
        count += int((batch["targets"] != IGNORE).any())
    model.zero_grad(set_to_none=True)
    return {name: (f / max(count, 1)).cpu() for name, f in fisher.items()}


def consolidate(
    state: EwcState, model: torch.nn.Module, fisher: dict[str, torch.Tensor], stage: int
) -> EwcState:
    """Add a finished stage: accumulate its Fisher, anchor at the current weights."""
    total = {k: state.fisher.get(k, 0) + v for k, v in fisher.items()}
    anchor = {k: p.detach().float().cpu().clone() for k, p in trainable(model).items()}
    return EwcState(total, anchor, [*state.stages, stage])


def penalty(model: torch.nn.Module, state: EwcState, lam: float) -> torch.Tensor:
    """λ/2 · Σ F·(θ - θ*)² (zero before the first consolidation or with λ = 0)."""
    params = trainable(model)
    device = next(iter(params.values())).device
    total = torch.zeros((), device=device)
    if lam == 0 or not state.fisher:
        return total
    for name, param in params.items():
        fisher = state.fisher[name].to(device)
        anchor = state.anchor[name].to(device)
        total = total + (fisher * (param.float() - anchor) ** 2).sum()
    return lam / 2 * total


def importance_by_module(fisher: dict[str, torch.Tensor]) -> dict[tuple[int, str], float]:
    """Summed Fisher per (layer, module), e.g. (3, "q_proj"): where the stage's knowledge sits."""
    totals: dict[tuple[int, str], float] = {}
    for name, value in fisher.items():
        parts = name.split(".")
        if "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        module = next(p for p in parts if p.endswith("_proj"))
        totals[(layer, module)] = totals.get((layer, module), 0.0) + float(value.sum())
    return totals


def plot_importance(fisher: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Heat map of parameter importance, layers x modules, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = importance_by_module(fisher)
    layers = sorted({layer for layer, _ in totals})
    modules = sorted({module for _, module in totals})
    grid = [[totals.get((layer, m), 0.0) for m in modules] for layer in layers]
    fig, ax = plt.subplots(figsize=(1 + len(modules), 1 + 0.4 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="Σ Fisher")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
