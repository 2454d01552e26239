"""Gradient-checkpointing profiler: which layers to recompute for the fastest step that fits.

Checkpointing a decoder layer drops its activations after the forward pass and
recomputes them in the backward pass: less memory, more time. This profiler trains a few
forward/backward steps of the real model (adapters on, base frozen) with checkpointing
off, on every layer, and on every k-th layer, and measures for each setting

- the median step time,
- the activation memory: bytes of tensors autograd keeps for the backward pass (taken
  with saved-tensor hooks, so the same figure on every device),
- the peak memory: the most bytes allocated at once during a step, parameters included:
  CUDA's peak allocation on a GPU; on the CPU, whose allocator keeps no peak, the running
  total the PyTorch profiler's memory events carry (an extra, untimed step), which also
  counts what the backward pass allocates on top of the saved activations.

`recommend` picks the fastest setting whose peak fits a budget (`exforge train profile`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from transformers.modeling_layers import GradientCheckpointingLayer

from exforge.llm.lora import LoraSettings, apply_lora
from exforge.llm.model import Quantisation, load_model
from workers.trainer.loss import forward_losses


@dataclass(frozen=True)
class ProfileResult:
    every: int  # 0: off, 1: every layer, k: every k-th layer
    layers: int  # how many layers are checkpointed
    step_seconds: float
    activation_bytes: int
    peak_bytes: int

    @property
    def setting(self) -> str:
        return "off" if self.every == 0 else f"every {self.every} layer(s)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"setting": self.setting}


def decoder_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointing(model: torch.nn.Module, every: int) -> int:
    """Checkpoint every `every`-th decoder layer (0: none); returns how many are."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if every == 0:
        base.gradient_checkpointing_disable()
        return 0
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(base)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return sum(layer.gradient_checkpointing for layer in layers)


@contextmanager
def saved_activation_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward (each storage once)."""
    seen: set[int] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def model_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def profile_batch(
    vocab: int, batch_size: int, seq_len: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A full batch of random tokens: memory and time depend on the shape alone."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch_size, seq_len + 1), generator=generator)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "position_ids": torch.arange(seq_len).expand(batch_size, -1),
    }


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """One forward/backward pass; returns the bytes autograd saved for the backward."""
    with saved_activation_bytes() as saved:
        loss = forward_losses(model, batch).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved[0]


def peak_allocated(run: Callable[[], object]) -> int:
    """The most bytes `run()` holds allocated at once on the CPU, beyond what existed.

    The PyTorch profiler's allocation events carry the running total of what was
    allocated since profiling began (the figure CUDA's allocator keeps as its peak)."""
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    totals = [
        event.extra_fields.total_allocated
        for event in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if event.tag == _EventType.Allocation
    ]
    return max(totals, default=0)


def cpu_peak_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Parameters and buffers plus the most bytes a training step allocates at once."""
    return model_bytes(model) + peak_allocated(lambda: train_step(model, batch))


def _walk(events: Sequence[Any]) -> Iterator[Any]:
    for event in events:
        yield event
        yield from _walk(event.children)


def measure(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], every: int, steps: int = 3
) -> ProfileResult:
    """One warm-up step, then `steps` timed forward/backward steps with this setting."""
    layers = set_checkpointing(model, every)
    model.train()
    cuda = torch.cuda.is_available()
    times, activations = [], 0
    for index in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        activations = train_step(model, batch)
        if cuda:
            torch.cuda.synchronize()
        if index:  # the first step warms caches and kernels up
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else cpu_peak_bytes(model, batch)
    return ProfileResult(every, layers, statistics.median(times), activations, peak)


def profile(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], every: Sequence[int], steps: int = 3
) -> list[ProfileResult]:
    """Off, every layer and every k-th layer (each k in `every` above 1); ends switched off."""
    count = len(decoder_layers(model))
    settings = sorted({0, 1, *(k for k in every if 1 < k < count)})
    results = [measure(model, batch, setting, steps) for setting in settings]
    set_checkpointing(model, 0)
    return results


def recommend(results: Sequence[ProfileResult], budget_bytes: int | None) -> ProfileResult | None:
    """The fastest setting whose peak fits the budget (None: nothing fits)."""
    fitting = [r for r in results if budget_bytes is None or r.peak_bytes <= budget_bytes]
    return min(fitting, key=lambda r: r.step_seconds, default=None)


def run_profile(
    model_spec: str,
    quantisation: Quantisation,
    seq_len: int,
    batch_size: int,
    every: Sequence[int],
    budget_bytes: int | None,
    cache_dir: Path,
    steps: int = 3,
) -> dict[str, Any]:
    """Profile a base model with default adapters; the report `exforge train profile` prints."""
    base = load_model(model_spec, quantisation, cache_dir)
    model = apply_lora(base, LoraSettings())
    batch = profile_batch(base.config.vocab_size, batch_size, seq_len)
    results = profile(model, batch, every, steps)
    best = recommend(results, budget_bytes)
    return {
        "model": model_spec,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "budget_bytes": budget_bytes,
        "results": [r.as_dict() for r in results],
        "recommended": best.as_dict() if best else None,
    }
