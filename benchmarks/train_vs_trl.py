"""Benchmark (a): exforge's training loop against TRL's `SFTTrainer` + peft, TRL both as
commonly run (`packing=False`: each micro-batch padded to its longest sample) and at its
fastest documented setting (`packing=True` with `padding_free=True`: best-fit-decreasing
packing, one flattened sequence per batch, sample boundaries from `position_ids`).

All sides train the same base (the `tiny` preset, NF4 like exforge's QLoRA) on the same
conversations encoded the same way (Tekken instruct format, loss on assistant tokens
only), with the same LoRA (rank 16, alpha 32, all linear layers), optimiser (AdamW,
lr 2e-4, cosine, clip 1.0), sequence length and number of optimiser steps. exforge and
packed TRL take two packed sequences per step; padded TRL takes micro-batches of two
samples and accumulates gradients to see the same samples per step.

Each side runs in its own child process, so peak memory is its own: CUDA's peak
allocation on a GPU, else peak RSS. Throughput counts real (non-padding) tokens per
second of training, by wall clock and by CPU time (steadier on a shared machine). The
sides alternate round by round (`--repeats`), and the ratios are taken within a round.

Usage: python benchmarks/train_vs_trl.py [--samples N] [--repeats R] [--out FILE]
GPU (Devstral's layer shapes, 4 of its 40 layers, random weights):
       python benchmarks/train_vs_trl.py --devstral-layers 4 --seq-len 2048 --samples 512 \
           --out benchmarks/results/train_vs_trl_gpu.json

`--kernels` measures instead the trainer's fused Triton kernels (RMSNorm, SwiGLU, RoPE;
workers/trainer/kernels.py) against PyTorch's ops: one Devstral-shaped decoder layer
(bf16, frozen weights as under QLoRA, gradients to the hidden states), forward and
backward over `--seq-len` tokens, the two variants alternating; figures: the speedup
within each pair and each variant's peak CUDA allocation. It needs CUDA (or, for a
functional check on the CPU at the tiny preset's shapes, TRITON_INTERPRET=1):
       python benchmarks/train_vs_trl.py --kernels --seq-len 4096 --repeats 20 \
           --out benchmarks/results/kernels_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.bench import figure, write_figures
from tests.support.shards import synthetic_samples

SEQ_LEN = 512
BATCH_PACKS = 2
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}
LEARNING_RATE = 2e-4
THREADS = 2


def corpus(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The three styles of the synthetic corpus with answers of varied length (1-12 lines),
    as real instruction data has: padding waste depends on that spread."""
    rng = random.Random(seed)
    samples = [s for stage in (1, 2, 3) for s in synthetic_samples(stage, math.ceil(count / 3))]
    for sample in samples:
        answer = sample["conversations"][1]
        answer["value"] = "\n".join([answer["value"]] * rng.randint(1, 12))
    return samples[:count]


def current_rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(train: Any, tokens: int, steps: int) -> dict[str, Any]:
    """Run `train()`; tokens/s over its wall time and the memory it peaked at."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = current_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    train()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    result = {
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "cpu_seconds": round(cpu_seconds, 2),
        "tokens_per_cpu_s": round(tokens / cpu_seconds, 1),
        "peak_rss_bytes": peak_rss(),
        "rss_growth_bytes": peak_rss() - before,
    }
    if torch.cuda.is_available():
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ------------------------------------------------------------------------------ exforge


@dataclass(frozen=True)
class Setup:
    model: str = "tiny"  # preset or model directory, NF4 on every side
    seq_len: int = SEQ_LEN

    def arguments(self) -> list[str]:
        return ["--model", self.model, "--seq-len", str(self.seq_len)]


def devstral_shaped(layers: int, directory: Path) -> Path:
    """Devstral Small's layer shapes and vocabulary with `layers` decoder layers, randomly
    initialised and saved (the GPU run: the real 40 layers need a real checkpoint)."""
    from transformers import MistralForCausalLM

    from exforge.llm.model import preset_config

    torch.manual_seed(0)
    config = preset_config("devstral-small", num_hidden_layers=layers)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def run_exforge(samples: list[dict[str, Any]], root: Path, setup: Setup) -> dict[str, Any]:
    from exforge.core.settings import load_settings
    from exforge.core.store import FileStore
    from tests.support.shards import write_split
    from workers.trainer.data import Cursor
    from workers.trainer.recipe import Recipe, StageConfig, TrainConfig

    store = FileStore(root / "store")
    write_split(store, "bench", 1, "train", samples, 64)
    settings = load_settings(data_dir=root)

    def config(steps: int) -> TrainConfig:
        stage = StageConfig(
            stage=1, steps=steps, learning_rate=LEARNING_RATE, warmup_steps=0, min_lr_ratio=0
        )
        return TrainConfig(
            run_id="bench",
            model=setup.model,
            dataset="bench",
            stages=[stage],
            seq_len=setup.seq_len,
            batch_size=BATCH_PACKS,
            validate_every=0,
            fisher_samples=0,
            register_as=None,
            lora=LORA,
        )

    trainer = Recipe(config(1), settings, store)
    packs = trainer.epoch_packs(samples, Cursor(1, level=5))
    steps = len(packs) // BATCH_PACKS
    trainer.config = config(steps)
    trained = packs[: steps * BATCH_PACKS]
    tokens = sum(owner >= 0 for p in trained for owner in p.sample_index)
    samples_trained = len({(i, o) for i, p in enumerate(trained) for o in p.sample_index if o >= 0})
    return measure(trainer.run, tokens, steps) | {"samples": samples_trained}


# ---------------------------------------------------------------------------------- TRL


def run_trl(
    samples: list[dict[str, Any]], root: Path, setup: Setup, steps: int, packed: bool
) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import MistralCommonBackend
    from trl import SFTConfig, SFTTrainer

    from exforge.llm.chat import SHIPPED_TEKKEN, encode, load_tokenizer
    from exforge.llm.lora import ALL_LINEAR
    from exforge.llm.model import load_model

    tokenizer = load_tokenizer()
    encoded = [encode(tokenizer, s["conversations"]) for s in samples]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    # Padded: the same samples per optimiser step, in micro-batches of two samples.
    accumulation = 1 if packed else math.ceil(len(rows) / steps / BATCH_PACKS)
    model = load_model(setup.model, "nf4", root / "models", seed=0)
    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=BATCH_PACKS,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=setup.seq_len,
        packing=packed,
        padding_free=packed,
        gradient_checkpointing=False,
        bf16=False,
        logging_steps=max(steps, 1),
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    peft = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(ALL_LINEAR),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=MistralCommonBackend(tokenizer_path=SHIPPED_TEKKEN),
        peft_config=peft,
    )
    counted = {"tokens": 0, "samples": 0}
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The real tokens and samples each batch brings (packed rows hold several)."""
        for example in examples:
            counted["tokens"] += min(len(example["input_ids"]), setup.seq_len)
            counted["samples"] += len(example.get("seq_lengths", [0]))
        return collate(examples)

    trainer.data_collator = counting
    result = measure(trainer.train, 0, steps)
    tokens_per = {"tokens_per_s": result["seconds"], "tokens_per_cpu_s": result["cpu_seconds"]}
    result |= {key: round(counted["tokens"] / seconds, 1) for key, seconds in tokens_per.items()}
    return result | counted | {"gradient_accumulation": accumulation}


# --------------------------------------------------------------------------------- main

SIDES = ("exforge", "trl_padded", "trl_packed")


def child(side: str, samples: int, steps: int, setup: Setup) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    data = corpus(samples)
    with tempfile.TemporaryDirectory() as tmp:
        if side == "exforge":
            return run_exforge(data, Path(tmp), setup)
        return run_trl(data, Path(tmp), setup, steps, packed=side == "trl_packed")


def spawn(side: str, samples: int, setup: Setup, steps: int = 0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", side, "--samples", str(samples)]
    output = subprocess.run(
        [*command, *setup.arguments(), "--steps", str(steps)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def memory_measure(result: dict[str, Any]) -> str:
    return "cuda_peak_bytes" if "cuda_peak_bytes" in result else "peak_rss_bytes"


def one_round(samples: int, setup: Setup) -> dict[str, dict[str, Any]]:
    """Every side once, exforge first (it fixes the number of steps)."""
    exforge = spawn("exforge", samples, setup)
    return {"exforge": exforge} | {
        side: spawn(side, samples, setup, exforge["steps"]) for side in SIDES[1:]
    }


def kernel_layer(preset: str, seq_len: int, repeats: int) -> tuple[dict[str, Any], dict]:
    """Fused kernels against PyTorch's ops in one decoder layer of `preset`'s shapes."""
    import copy
    import os

    from transformers.models.mistral.modeling_mistral import (
        MistralDecoderLayer,
        MistralRotaryEmbedding,
    )

    from exforge.llm.model import preset_config
    from workers.trainer.kernels import use_fused_kernels

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--kernels needs CUDA (or TRITON_INTERPRET=1 for a CPU check)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter has no bf16
    torch.manual_seed(0)
    config = preset_config(preset, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    with device:
        plain = MistralDecoderLayer(config, 0).to(dtype).requires_grad_(False)
        rotary = MistralRotaryEmbedding(config)
        hidden = torch.randn(1, seq_len, config.hidden_size, dtype=dtype)
        positions = torch.arange(seq_len)[None]
        grad = torch.randn_like(hidden)
    fused = use_fused_kernels(copy.deepcopy(plain))
    embeddings = rotary(hidden, positions)
    layers = {"pytorch": plain, "fused": fused}

    def step(layer: torch.nn.Module) -> tuple[float, torch.Tensor]:
        x = hidden.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = layer(x, position_embeddings=embeddings, attention_mask=None, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, out.detach()

    outputs = {name: step(layer)[1] for name, layer in layers.items()}  # warm-up, compile
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            seconds[name].append(step(layer)[0])
    ratios = [p / f for p, f in zip(seconds["pytorch"], seconds["fused"], strict=True)]
    figures = {"kernel_speedup": figure(ratios, "x")}
    if cuda:
        for name, layer in layers.items():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(layer)
            peak = torch.cuda.max_memory_allocated() - before
            figures[f"{name}_peak_bytes"] = figure([peak], "bytes", "lower")
    difference = (outputs["fused"].float() - outputs["pytorch"].float()).abs().max()
    details = {
        "layer": preset,
        "seq_len": seq_len,
        "dtype": str(dtype),
        "max_abs_output_difference": float(difference),
        "seconds": seconds,
    }
    return figures, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="Figures JSON (with the git revision).")
    parser.add_argument("--model", default="tiny", help="Preset or model directory.")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument(
        "--devstral-layers",
        type=int,
        help="Train a Devstral-shaped model with this many layers (the GPU run).",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="Fused kernels against PyTorch's ops in one Devstral-shaped decoder layer "
        "(needs CUDA; the tiny preset's shapes under TRITON_INTERPRET=1 on the CPU).",
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = Setup(args.model, args.seq_len)
    if args.side:
        print(json.dumps(child(args.side, args.samples, args.steps, setup)), flush=True)
        return
    if args.kernels:
        preset = "devstral-small" if torch.cuda.is_available() else "tiny"
        figures, details = kernel_layer(preset, args.seq_len, args.repeats)
        for name, value in figures.items():
            print(f"{name}: median {value.median:.4g} {value.unit} (runs {value.runs})")
        print(f"max |fused - pytorch| of the layer output: {details['max_abs_output_difference']}")
        if args.out:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            write_figures(args.out, "train_kernels", figures, device, details)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.devstral_layers:
            setup = Setup(str(devstral_shaped(args.devstral_layers, Path(tmp))), args.seq_len)
        rounds = [one_round(args.samples, setup) for _ in range(args.repeats)]
    memory = memory_measure(rounds[0]["exforge"])
    figures = {}
    for side in SIDES:
        figures[f"{side}_tokens_per_s"] = figure([r[side]["tokens_per_s"] for r in rounds], "tok/s")
        figures[f"{side}_peak_memory"] = figure([r[side][memory] for r in rounds], "bytes", "lower")
    for side in SIDES[1:]:
        for measure_name in ("tokens_per_s", "tokens_per_cpu_s"):
            ratios = [r["exforge"][measure_name] / r[side][measure_name] for r in rounds]
            figures[f"{measure_name}_ratio_vs_{side}"] = figure(ratios, "x")
        memory_ratios = [r["exforge"][memory] / r[side][memory] for r in rounds]
        figures[f"peak_memory_ratio_vs_{side}"] = figure(memory_ratios, "x", "lower")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    details = {
        "threads": THREADS,
        "model": args.model
        if not args.devstral_layers
        else f"devstral-shaped/{args.devstral_layers}",
        "seq_len": args.seq_len,
        "memory": memory,
        "rounds": rounds,
    }
    summary = {
        name: {"median": round(f.median, 3), "min": min(f.runs), "max": max(f.runs)}
        for name, f in figures.items()
        if "ratio" in name
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        write_figures(args.out, "train_vs_trl", figures, device, details)


if __name__ == "__main__":
    main()
