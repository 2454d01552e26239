"""Benchmark (a): exforge's training loop against a plain TRL `SFTTrainer` + peft run.

Both sides train the same base (the `tiny` preset, NF4 like exforge's QLoRA), on the same
conversations encoded the same way (Tekken instruct format, loss on assistant tokens
only), with the same LoRA (rank 16, alpha 32, all linear layers), optimiser (AdamW,
lr 2e-4, cosine, clip 1.0), sequence length, micro-batch of 2 sequences and number of
optimiser steps, for one epoch. exforge packs conversations into full sequences without
cross-attention; the plain TRL run pads each micro-batch to its longest sample (its
default, `packing=False`) and accumulates gradients to see the same samples per step.

Each side runs in its own child process of this one run, so peak memory is its own:
CUDA's peak allocation on a GPU, else peak RSS (and its growth while training).
Throughput counts real (non-padding) tokens per second of training, by wall clock and
by CPU time (the latter is steadier on a shared machine).

Usage: python benchmarks/train_vs_trl.py [--samples N] [--out FILE]
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
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def run_exforge(samples: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    from exforge.core.settings import load_settings
    from exforge.core.store import FileStore
    from tests.support.shards import write_split
    from workers.trainer.data import Cursor
    from workers.trainer.recipe import StageConfig, TrainConfig, Trainer

    store = FileStore(root / "store")
    write_split(store, "bench", 1, "train", samples, 64)
    settings = load_settings(data_dir=root)

    def config(steps: int) -> TrainConfig:
        stage = StageConfig(
            stage=1, steps=steps, learning_rate=LEARNING_RATE, warmup_steps=0, min_lr_ratio=0
        )
        return TrainConfig(
            run_id="bench",
            dataset="bench",
            stages=[stage],
            seq_len=SEQ_LEN,
            batch_size=BATCH_PACKS,
            validate_every=0,
            fisher_samples=0,
            register_as=None,
            lora=LORA,
        )

    trainer = Trainer(config(1), settings, store)
    packs = trainer.epoch_packs(samples, Cursor(1, level=5))
    steps = len(packs) // BATCH_PACKS
    trainer.config = config(steps)
    trained = packs[: steps * BATCH_PACKS]
    tokens = sum(owner >= 0 for p in trained for owner in p.sample_index)
    samples_trained = len({(i, o) for i, p in enumerate(trained) for o in p.sample_index if o >= 0})
    return measure(trainer.run, tokens, steps) | {"samples": samples_trained}


# ---------------------------------------------------------------------------------- TRL


def run_trl(samples: list[dict[str, Any]], root: Path, steps: int) -> dict[str, Any]:
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
    # The same number of optimiser steps, in micro-batches of exforge's batch size.
    accumulation = math.ceil(len(rows) / steps / BATCH_PACKS)
    model = load_model("tiny", "nf4", root / "models", seed=0)
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
        max_length=SEQ_LEN,
        packing=False,
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
    used = rows[: steps * accumulation * BATCH_PACKS]
    tokens = sum(min(len(r["input_ids"]), SEQ_LEN) for r in used)
    extra = {"samples": len(used), "gradient_accumulation": accumulation}
    return measure(trainer.train, tokens, steps) | extra


# --------------------------------------------------------------------------------- main


def child(side: str, samples: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    data = corpus(samples)
    with tempfile.TemporaryDirectory() as tmp:
        if side == "exforge":
            return run_exforge(data, Path(tmp))
        return run_trl(data, Path(tmp), steps)


def spawn(side: str, samples: int, steps: int = 0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", side, "--samples", str(samples)]
    output = subprocess.run(
        [*command, "--steps", str(steps)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--side", choices=["exforge", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(child(args.side, args.samples, args.steps)), flush=True)
        return
    exforge = spawn("exforge", args.samples)
    trl = spawn("trl", args.samples, exforge["steps"])
    memory = "cuda_peak_bytes" if "cuda_peak_bytes" in exforge else "peak_rss_bytes"
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": THREADS,
        "seq_len": SEQ_LEN,
        "exforge": exforge,
        "trl": trl,
        "tokens_per_s_ratio": round(exforge["tokens_per_s"] / trl["tokens_per_s"], 2),
        "tokens_per_cpu_s_ratio": round(exforge["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"], 2),
        "peak_memory_ratio": round(exforge[memory] / trl[memory], 2),
        "memory_measure": memory,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
