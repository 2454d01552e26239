"""Benchmark (CI subset): one QLoRA training step of the tiny model with the chunked
output-head loss against the same step through full logits, in one process.

Both sides train the same NF4 base with the same adapters on the same packed batch (two
sequences of 512 Tekken tokens from the synthetic corpus) and alternate step by step, so
machine load falls on both alike. Figures (judged against a baseline): the ratio of their
step times within each pair, and each side's peak allocated bytes during a step (the
PyTorch profiler's allocation total on the CPU, CUDA's peak on a GPU); each side's
tokens/s, which depends on the machine, goes to the details. `make bench-check`
compares a run with benchmarks/baselines/ through `exforge bench compare`, which flags a
figure only when it moved beyond its measured spread.

Usage: python benchmarks/train_step.py [--repeats N] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.bench import figure, write_figures
from exforge.llm.chat import IGNORE, encode, load_tokenizer
from exforge.llm.lora import LoraSettings, apply_lora
from exforge.llm.model import load_model
from tests.support.shards import synthetic_samples
from workers.trainer.loss import forward_losses, token_losses
from workers.trainer.packing import collate, pack
from workers.trainer.profile import peak_allocated

SEQ_LEN, BATCH, THREADS = 512, 2, 2

Batch = dict[str, torch.Tensor]
Losses = Callable[[torch.nn.Module, Batch], torch.Tensor]


def full_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The loss from every position's logits, as transformers' own head makes them."""
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits
    return token_losses(logits, batch["targets"])


def step(model: torch.nn.Module, batch: Batch, losses: Losses) -> float:
    started = time.perf_counter()
    loss = losses(model, batch).sum() / (batch["targets"] != IGNORE).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def peak(model: torch.nn.Module, batch: Batch, losses: Losses) -> int:
    if not torch.cuda.is_available():
        return peak_allocated(lambda: step(model, batch, losses))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(model, batch, losses)
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="Figures JSON (with the git revision).")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    tokenizer = load_tokenizer()
    samples = [encode(tokenizer, s["conversations"]) for s in synthetic_samples(2, 64)]
    batch = collate(pack(samples, SEQ_LEN)[:BATCH])
    tokens = int((batch["sample_index"] >= 0).sum())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = apply_lora(load_model("tiny", "nf4", Path(tmp)), LoraSettings())
    sides: dict[str, Losses] = {"chunked": forward_losses, "full_logits": full_logits}
    for losses in sides.values():  # warm-up
        step(model, batch, losses)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, losses in sides.items():
            seconds[name].append(step(model, batch, losses))
    ratios = [f / c for f, c in zip(seconds["full_logits"], seconds["chunked"], strict=True)]
    figures = {"chunked_speedup": figure(ratios, "x")}
    for name, losses in sides.items():
        peaks = [peak(model, batch, losses) for _ in range(2)]
        figures[f"{name}_peak_bytes"] = figure(peaks, "bytes", "lower")
    # Absolute rates depend on the machine: details, not figures a baseline is judged on.
    rates = {name: [round(tokens / s, 1) for s in runs] for name, runs in seconds.items()}
    for name, value in figures.items():
        print(f"{name}: median {value.median:.4g} {value.unit} (runs {value.runs})")
    print(f"tokens/s: {rates}")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        details = {"seq_len": SEQ_LEN, "batch": BATCH, "tokens": tokens, "threads": THREADS}
        write_figures(args.out, "train_step", figures, device, details | {"tokens_per_s": rates})


if __name__ == "__main__":
    main()
