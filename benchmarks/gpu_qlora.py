"""QLoRA on one GPU: tokens/s and peak memory of a Devstral-shaped model, against the
QLoRA paper's memory arithmetic, with a bf16 LoRA run of the same model as baseline.

Needs only PyTorch, transformers, peft and bitsandbytes (no network, no exforge): the
model is Mistral's architecture with Devstral Small's real layer shapes (hidden 5120,
intermediate 32768, 32 heads, 8 KV heads, head dim 128, vocabulary 131,072) and fewer
layers, randomly initialised and saved locally, then loaded the way a real fine-tune
loads its base: quantised to NF4 with double quantisation and bf16 compute.

    python benchmarks/gpu_qlora.py                      # H100-class GPU, ~2.4B params
    python benchmarks/gpu_qlora.py --layers 1 --steps 5 # quicker
    python benchmarks/gpu_qlora.py --tiny --device cpu  # smoke test of the code path

The arithmetic (Dettmers et al., 2023): NF4 stores 4 bits per weight; double
quantisation brings the block constants from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127
bits per weight, so a quantised weight costs (4 + 0.127) / 8 ≈ 0.516 bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, MistralConfig, MistralForCausalLM

NF4_DQ_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RunResult:
    mode: str
    tokens_per_s: float
    step_s: float
    peak_gib: float
    weights_gib: float
    trainable_params: int
    losses: list[float]


def devstral_shaped(layers: int, tiny: bool) -> MistralConfig:
    if tiny:
        return MistralConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            rope_theta=1e9,
            sliding_window=None,
        )
    return MistralConfig(
        vocab_size=131072,
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=1e9,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def save_random_model(config: MistralConfig, directory: Path, device: str) -> int:
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, safe_serialization=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def quantised_linear_params(config: MistralConfig) -> int:
    """Parameters in the decoder's Linear layers (what bitsandbytes quantises)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * inter
    return per_layer * config.num_hidden_layers


def memory_now(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def train(directory: Path, quantised: bool, args: argparse.Namespace) -> RunResult:
    device = args.device
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = memory_now(device)
    kwargs: dict[str, object] = {"dtype": torch.bfloat16, "device_map": {"": device}}
    if quantised:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = MistralForCausalLM.from_pretrained(directory, **kwargs)
    weights = memory_now(device) - before
    if quantised and args.upcast:
        # peft's helper also casts every non-quantised weight (embeddings, lm_head) to fp32
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    losses: list[float] = []
    timings: list[float] = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timings.append(time.perf_counter() - started)
            losses.append(round(loss.item(), 4))
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
    step_s = sum(timings) / len(timings)
    result = RunResult(
        mode=("qlora-nf4-dq" + ("-fp32-upcast" if args.upcast else ""))
        if quantised
        else "lora-bf16",
        tokens_per_s=args.batch * args.seq / step_s,
        step_s=step_s,
        peak_gib=peak / 2**30,
        weights_gib=weights / 2**30,
        trainable_params=trainable,
        losses=losses,
    )
    del model, optimizer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small dimensions (smoke test)")
    parser.add_argument(
        "--upcast",
        action="store_true",
        help="prepare with peft's prepare_model_for_kbit_training (fp32 non-quantised weights)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bf16 LoRA run")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()

    config = devstral_shaped(args.layers, args.tiny)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        total = save_random_model(config, Path(tmp), args.device)
        runs = [train(Path(tmp), quantised=True, args=args)]
        if not args.no_baseline:
            runs.append(train(Path(tmp), quantised=False, args=args))

    linear = quantised_linear_params(config)
    other = total - linear  # embeddings, lm_head, norms stay bf16
    expected_weights = linear * NF4_DQ_BYTES_PER_PARAM + other * 2
    qlora = runs[0]
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "params_total": total,
        "params_quantised": linear,
        "shape": {"layers": args.layers, "seq": args.seq, "batch": args.batch, "rank": args.rank},
        "paper_bytes_per_quantised_param": round(NF4_DQ_BYTES_PER_PARAM, 4),
        "expected_weights_gib": round(expected_weights / 2**30, 3),
        "measured_bytes_per_quantised_param": round(
            (qlora.weights_gib * 2**30 - other * 2) / linear, 4
        )
        if args.device == "cuda"
        else None,
        "runs": [asdict(run) for run in runs],
    }
    if len(runs) == 2:
        report["qlora_vs_bf16"] = {
            "peak_memory_ratio": round(runs[0].peak_gib / runs[1].peak_gib, 3)
            if runs[1].peak_gib
            else None,
            "throughput_ratio": round(runs[0].tokens_per_s / runs[1].tokens_per_s, 3),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
