"""Self-Synthesized Rehearsal on the tiny model: buffer stored, valid, mixed at the ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from exforge.llm.chat import encode, load_tokenizer
from schemas.shards import decode_shard
from schemas.sharegpt import Problem, sharegpt_problems, validate_sharegpt
from tests.support.shards import synthetic_samples, write_split
from workers.trainer.display import training_progress
from workers.trainer.recipe import Recipe, StageConfig, TrainConfig
from workers.trainer.ssr import buffer_key, kmeans, nearest_to_centres, select


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def test_validator_accepts_sharegpt_and_names_each_problem() -> None:
    good = {
        "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hello")]
    }
    assert validate_sharegpt(good)
    assert sharegpt_problems({"conversations": [turn("human", "Hi")]})
    assert sharegpt_problems({"conversations": [turn("human", "Hi"), turn("gpt", "  ")]}) == [
        Problem("invalid_sharegpt", "turn 1 is blank")
    ]
    swapped = {"conversations": [turn("gpt", "Hello"), turn("human", "Hi")]}
    assert any("alternate" in p.message for p in sharegpt_problems(swapped))
    assert not validate_sharegpt({**good, "meta": {"stage": 9, "kind": "x"}})
    tokenizer = load_tokenizer()

    def count(turns: list[dict[str, str]]) -> int:
        return len(encode(tokenizer, turns).input_ids)

    assert validate_sharegpt(good, count, 64)
    (too_long,) = sharegpt_problems(good, count, 5)
    assert too_long.reason == "too_many_tokens" and "exceed" in too_long.message


def test_kmeans_selection_keeps_one_representative_per_cluster() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat(
        [
            c + 0.1 * torch.randn(5, 2, generator=torch.Generator().manual_seed(i))
            for i, c in enumerate(centres)
        ]
    )
    chosen = nearest_to_centres(points, kmeans(points, 3, seed=0))
    assert sorted(i // 5 for i in chosen) == [0, 1, 2]
    samples = [{"id": str(i)} for i in range(15)]
    assert len(select(samples, 3, "random", 0, None)) == 3
    assert select(samples[:2], 3, "kmeans", 0, points[:2]) == samples[:2]


def test_ssr_buffer_is_stored_valid_and_mixed_into_the_next_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also: the progress display and the Prometheus gauges follow the run."""
    settings = load_settings(data_dir=tmp_path / "data")
    store = FileStore(tmp_path / "data" / "store")
    real = {stage: synthetic_samples(stage, 24) for stage in (1, 2)}
    for stage in (1, 2):
        write_split(store, "elixir", stage, "train", real[stage], 8)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 4, 1), 8)
    ratio, budget = 0.125, 4
    config = TrainConfig.model_validate(
        {
            "run_id": "ssr",
            "seq_len": 256,
            "validate_every": 0,
            "fisher_samples": 2,
            "register_as": None,
            "stages": [StageConfig(stage=s, steps=2, learning_rate=1e-2) for s in (1, 2)],
            "lora": {"rank": 4},
            "ssr": {
                "enabled": True,
                "budget": budget,
                "ratio": ratio,
                "candidates": 4,
                "max_new_tokens": 8,
                "selection": "kmeans",
            },
        }
    )
    trainer = Recipe(config, settings, store)
    with training_progress(trainer):
        trainer.run()
    shown = capsys.readouterr().err
    assert "stage 2 · loss" in shown and "tok/s" in shown
    last = trainer.history.steps[-1]
    assert (
        REGISTRY.get_sample_value("exforge_train_loss", {"run": "ssr", "stage": "2"}) == last.loss
    )
    assert REGISTRY.get_sample_value("exforge_train_peak_memory_bytes", {"run": "ssr"}) > 0

    buffer = decode_shard(store.get(buffer_key("ssr", 1)))
    assert 0 < len(buffer) <= budget
    tokenizer = load_tokenizer()
    for sample in buffer:  # the same validation real samples pass, token limit included
        assert (
            sharegpt_problems(
                sample, lambda turns: len(encode(tokenizer, turns).input_ids), config.seq_len
            )
            == []
        )
        assert sample["meta"]["kind"] == "synthetic_stage1" and sample["meta"]["stage"] == 1
    assert not store.exists(buffer_key("ssr", 2))  # no later stage to rehearse for
    report = next(e for e in trainer.history.events if e.metrics.get("ssr_kept") is not None)
    assert report.metrics["ssr_candidates"] == 4
    assert report.metrics["ssr_kept"] == len(buffer) <= report.metrics["ssr_valid"] <= 4
    # Stage 2 trained on its 24 real samples plus round(ratio · 24) = 3 rehearsal samples.
    trained = set(trainer._encoded)
    rehearsed = [s for s in buffer if s["id"] in trained]
    assert len(rehearsed) == min(len(buffer), round(ratio * len(real[2])))
    mixed = trainer.with_rehearsal(real[2], [1])
    assert len(mixed) == len(real[2]) + len(rehearsed)
