"""Gradient-checkpointing profiler and `exforge train profile`."""

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
