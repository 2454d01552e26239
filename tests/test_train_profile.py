"""Gradient-checkpointing profiler and `exforge train profile`, checked against what the
operating system and the model's own layers show, not against the profiler's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exforge.cli import app
from tests.support.os_memory import LAYERS, profiled_batch, profiled_model
from workers.trainer.profile import (
    ProfileResult,
    decoder_layers,
    model_bytes,
    profile,
    recommend,
    set_checkpointing,
    train_step,
)

OS_MEMORY = str(Path(__file__).parent / "support" / "os_memory.py")
MIB = 2**20


def os_step_growth(settings: list[int]) -> dict[int, int]:
    done = subprocess.run(
        [sys.executable, OS_MEMORY, *map(str, settings)], capture_output=True, text=True, check=True
    )
    return {int(k): v for k, v in json.loads(done.stdout).items()}


def layer_forwards(model: torch.nn.Module, batch: dict[str, torch.Tensor], every: int) -> int:
    """Decoder-layer forward calls in one step: a checkpointed layer runs twice (counted as
    they start: a recomputation stops once it has what the backward needs)."""
    calls: Counter[int] = Counter()
    hooks = [
        layer.register_forward_pre_hook(lambda *_, i=i: calls.update([i]))
        for i, layer in enumerate(decoder_layers(model))
    ]
    set_checkpointing(model, every)
    train_step(model, batch)
    for hook in hooks:
        hook.remove()
    return sum(calls.values())


def test_recommendation_fits_the_memory_the_operating_system_measures() -> None:
    model, batch = profiled_model(), profiled_batch()
    results = {r.every: r for r in profile(model, batch, every=[2, 9], steps=1)}
    assert sorted(results) == [0, 1, 2]  # 9 ≥ the layer count is skipped
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))

    # What each setting recomputes, counted at the layers themselves.
    small = {name: tensor[:1, :16] for name, tensor in batch.items()}
    for every, result in results.items():
        assert layer_forwards(model, small, every) == LAYERS + result.layers
    assert [results[k].layers for k in (0, 1, 2)] == [0, LAYERS, LAYERS // 2]

    # The peak each setting reaches, as the kernel's high-water mark shows it.
    seen = os_step_growth([0, 1, 2])
    assert seen[0] > seen[2] > seen[1]
    params = model_bytes(model)
    for every, result in results.items():
        assert abs(result.peak_bytes - params - seen[every]) <= 0.1 * seen[every] + MIB, every

    # Budgets between the measured peaks: the advice must fit what was measured.
    def budget(low: int, high: int) -> int:
        return params + (seen[low] + seen[high]) // 2

    ranked = list(results.values())
    between_off_and_half = recommend(ranked, budget(2, 0))
    assert between_off_and_half is not None and between_off_and_half.every in (1, 2)
    assert recommend(ranked, budget(1, 2)) == results[1]
    assert recommend(ranked, params + seen[1] // 2) is None
    assert recommend(ranked, None) is not None


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
