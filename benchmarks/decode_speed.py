"""Decoding options on and off: tokens/s and first-token latency of the serving loop.

The serving loop (`exforge.llm.generation.Decoder`) decodes the same prompts, greedily,
as one continuously batched run, once per configuration: the default (PyTorch's own
attention choice, eager step, a KV cache that grows each step) and each option of
`DecodeOptions` turned on alone: one attention kernel forced (each of those the device
runs), the step compiled with `torch.compile`, the static KV cache; then all of the
fastest together. Configurations take turns within each round, each round starting with
the next one (round 0 warms every one up, compilation included), and each one's speed is
also taken as a ratio to the default of the same round, so load from other processes
cancels out of the ratios.

CPU (the tiny model of Devstral's architecture):
    python benchmarks/decode_speed.py [--repeats R] [--out FILE]
GPU (Devstral Small's layer shapes and vocabulary, random weights, 8 of its 40 layers):
    python benchmarks/decode_speed.py --devstral-layers 8 --prompts 16 --max-tokens 128 \
        --out benchmarks/results/decode_speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.bench import figure, write_figures
from exforge.llm.chat import text_ids, text_tokenizer
from exforge.llm.generation import DecodeOptions, Decoder, Sampling
from exforge.llm.model import load_model, preset_config
from workers.evaluator.benchmarks import BUILTIN, load_benchmark
from workers.evaluator.compression import Speed, timed_batch

THREADS = 2
KERNELS = ("flash", "efficient", "cudnn", "math")


def devstral_shaped(layers: int) -> torch.nn.Module:
    """Devstral Small's layer shapes with `layers` decoder layers, random, bf16 on CUDA."""
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    config = preset_config("devstral-small", num_hidden_layers=layers)
    with torch.device("cuda"):
        return MistralForCausalLM(config).to(torch.bfloat16).eval()


def runs_on_device(kernel: str, model: torch.nn.Module, prompt: list[int]) -> bool:
    """Whether one forward with only this attention kernel allowed runs here."""
    device = next(model.parameters()).device
    with torch.no_grad(), DecodeOptions(attention=kernel).attention_context():  # type: ignore[arg-type]
        try:
            model(input_ids=torch.tensor([prompt], device=device))
        except RuntimeError:
            return False
    return True


def configurations(kernels: list[str]) -> dict[str, DecodeOptions]:
    chosen = {"default": DecodeOptions()}
    chosen |= {f"attention_{k}": DecodeOptions(attention=k) for k in kernels}  # type: ignore[arg-type]
    chosen["compile"] = DecodeOptions(compile=True)
    chosen["static_cache"] = DecodeOptions(static_cache=True)
    return chosen


def fastest_together(kernels: list[str], rounds: list[dict[str, Speed]]) -> DecodeOptions:
    """Every option that beat the default on its own, the fastest kernel among them."""

    def ratio(name: str) -> float:
        return statistics.median(r[name].tokens_per_s / r["default"].tokens_per_s for r in rounds)

    faster = [k for k in kernels if ratio(f"attention_{k}") > 1]
    kernel = max(faster, key=lambda k: ratio(f"attention_{k}")) if faster else "auto"
    return DecodeOptions(
        attention=kernel,  # type: ignore[arg-type]
        compile=ratio("compile") > 1,
        static_cache=ratio("static_cache") > 1,
    )


def measure(
    model: torch.nn.Module,
    tokenizer: Any,
    chosen: dict[str, DecodeOptions],
    prompts: list[list[int]],
    sampling: Sampling,
    repeats: int,
) -> list[dict[str, Speed]]:
    decoders = {
        name: Decoder(model, tokenizer, max_batch=len(prompts), prefix_entries=0, options=opts)
        for name, opts in chosen.items()
    }
    names, rounds = list(decoders), []
    for number in range(repeats + 1):  # round 0: warm-up (and compilation)
        order = names[number % len(names) :] + names[: number % len(names)]  # no favoured slot
        speeds = {name: timed_batch(decoders[name], prompts, sampling) for name in order}
        if number:
            rounds.append(speeds)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="Requests decoded together.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--devstral-layers", type=int, help="GPU: a Devstral-shaped model.")
    parser.add_argument("--out", type=Path, help="Figures JSON (with the git revision).")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        if args.devstral_layers:
            model = devstral_shaped(args.devstral_layers)
        else:
            model = load_model("tiny", "none", Path(tmp), dtype=torch.float32).eval()
        tokenizer = text_tokenizer()
        problems = load_benchmark(BUILTIN).problems[: args.prompts]
        prompts = [text_ids(tokenizer, p.prompt) for p in problems]
        sampling = Sampling(max_tokens=args.max_tokens)
        kernels = [k for k in KERNELS if runs_on_device(k, model, prompts[0])]
        chosen = configurations(kernels)
        rounds = measure(model, tokenizer, chosen, prompts, sampling, args.repeats)
        together = fastest_together(kernels, rounds)
        combined = measure(
            model,
            tokenizer,
            {"default": DecodeOptions(), "together": together},
            prompts,
            sampling,
            args.repeats,
        )
    figures = {}
    for name in chosen:
        figures[f"{name}_tokens_per_s"] = figure([r[name].tokens_per_s for r in rounds], "tok/s")
        figures[f"{name}_first_token_s"] = figure(
            [r[name].first_token_s for r in rounds], "s", "lower"
        )
        if name != "default":
            speedups = [r[name].tokens_per_s / r["default"].tokens_per_s for r in rounds]
            figures[f"{name}_speedup"] = figure(speedups, "x")
    figures["together_speedup"] = figure(
        [r["together"].tokens_per_s / r["default"].tokens_per_s for r in combined], "x"
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    details = {
        "model": f"devstral-shaped/{args.devstral_layers}" if args.devstral_layers else "tiny",
        "threads": THREADS,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "kernels_on_device": kernels,
        "together": together.as_dict(),
    }
    print(json.dumps(details))
    for name, f in figures.items():
        print(f"{name:32} {f.median:10.4g} {f.unit:6} [{min(f.runs):.4g} .. {max(f.runs):.4g}]")
    if args.out:
        write_figures(args.out, "decode_speed", figures, device, details)


if __name__ == "__main__":
    main()
