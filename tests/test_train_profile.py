"""Gradient-checkpointing profiler, `exforge train profile`, and the rank-selection helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MistralForCausalLM
from typer.testing import CliRunner

from exforge.cli import app
from exforge.llm.lora import LoraSettings, apply_lora
from exforge.llm.model import preset_config
from workers.trainer.profile import (
    ProfileResult,
    decoder_layers,
    profile,
    profile_batch,
    recommend,
)
from workers.trainer.rank import (
    effective_rank,
    effective_ranks,
    loss_after_budget,
    smallest_good_rank,
)


def four_layer_base() -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(preset_config("tiny", num_hidden_layers=4, vocab_size=512))


def test_checkpointing_every_kth_layer_trades_memory_for_time() -> None:
    model = apply_lora(four_layer_base(), LoraSettings(rank=4))
    batch = profile_batch(512, 2, 64)
    results = {r.every: r for r in profile(model, batch, every=[2, 9], steps=1)}
    assert sorted(results) == [0, 1, 2]  # 9 ≥ the layer count is skipped
    assert [results[k].layers for k in (0, 1, 2)] == [0, 4, 2]
    off, all_layers, half = results[0], results[1], results[2]
    assert off.activation_bytes > half.activation_bytes > all_layers.activation_bytes
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert recommend(list(results.values()), None) == min(
        results.values(), key=lambda r: r.step_seconds
    )
    assert recommend(list(results.values()), all_layers.peak_bytes) in (half, all_layers)
    assert recommend(list(results.values()), 1) is None


def test_recommend_takes_the_fastest_that_fits() -> None:
    results = [ProfileResult(0, 0, 1.0, 900, 1000), ProfileResult(1, 4, 1.5, 100, 400)]
    assert recommend(results, 500) == results[1]
    assert recommend(results, 1000) == results[0]


def test_profile_command_reports_and_recommends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXFORGE_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "profile",
            "--seq-len",
            "32",
            "--batch-size",
            "1",
            "--steps",
            "1",
            "--budget-gib",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["setting"] for r in report["results"]] == ["off", "every 1 layer(s)"]
    assert report["recommended"]["setting"] in {"off", "every 1 layer(s)"}


def test_rank_helpers_measure_what_the_update_uses() -> None:
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(32, 3, generator=generator) @ torch.randn(3, 24, generator=generator)
    assert effective_rank(low_rank, 0.999) == 3
    assert effective_rank(torch.zeros(4, 4)) == 0
    batch = profile_batch(512, 1, 16)
    losses = loss_after_budget(four_layer_base, [2, 8], [batch], steps=2, learning_rate=1e-2)
    assert set(losses) == {2, 8} and all(v > 0 for v in losses.values())
    assert smallest_good_rank({2: 1.0, 8: 0.99, 16: 0.98}, tolerance=0.05) == 2
    assert smallest_good_rank({2: 2.0, 8: 1.0}) == 8
    model = apply_lora(four_layer_base(), LoraSettings(rank=4))
    for module in model.modules():  # a trained adapter: B is no longer zero
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
    ranks = effective_ranks(model, 0.999)
    assert len(ranks) == 4 * 7 and all(1 <= r <= 4 for r in ranks.values())
