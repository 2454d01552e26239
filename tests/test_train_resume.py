"""The recipe end to end: stages, checkpoints, exact resume, registry, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exforge.core.db import engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore, ObjectStore
from tests.support.shards import synthetic_samples, write_split
from workers.trainer import checkpoint as ckpt
from workers.trainer.recipe import StageConfig, TrainConfig, Trainer


def write_corpus(store: ObjectStore, train: int = 24) -> None:
    for stage in (1, 2, 3):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, train), 8)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 4, 1), 8)


def config(run_id: str, **overrides: object) -> TrainConfig:
    stages = [StageConfig(stage=s, steps=3, learning_rate=1e-2, warmup_steps=1) for s in (1, 2, 3)]
    base = dict(
        run_id=run_id,
        seq_len=128,
        batch_size=2,
        validate_every=3,
        checkpoint_every=2,
        fisher_samples=4,
        stages=stages,
        lora={"rank": 4, "dropout": 0.1},
    )
    return TrainConfig.model_validate(base | overrides)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, FileStore]:
    settings = load_settings(data_dir=tmp_path / "data")
    store = FileStore(tmp_path / "data" / "store")
    write_corpus(store)
    return settings, store


def test_killed_run_resumes_with_identical_losses(setup: tuple[Settings, FileStore]) -> None:
    settings, store = setup
    engine = engine_for(settings.resolved_database_url)
    full = Trainer(config("full"), settings, store, engine).run()
    assert len(full["losses"]) == 9
    for stage in range(3):  # the loss falls within every stage
        losses = full["losses"][3 * stage : 3 * stage + 3]
        assert losses[-1] < losses[0]
    # Interrupt after step 5 (last checkpoint: step 4, mid stage 2; dropout draws RNG).
    halted = Trainer(config("cut", halt_after_step=5), settings, store, engine).run()
    assert halted["halted"] and halted["losses"] == full["losses"][:5]
    resumed = Trainer(config("cut"), settings, store, engine).run()
    assert resumed["losses"] == full["losses"][4:]
    assert resumed["final_validation"] == full["final_validation"]
    assert resumed["version"]["version"] == 2 and full["version"]["version"] == 1
    checkpoint = sorted(store.list("runs/cut/checkpoints/00000004/"))
    assert [key.rsplit("/", 1)[1] for key in checkpoint] == [
        "adapter.safetensors",
        "ewc.safetensors",
        "rng-rank0.pt",
        "state.json",
        "trainer.pt",
    ]
    state = json.loads(store.get("runs/cut/checkpoints/00000004/state.json"))
    assert state["cursor"]["stage"] == 2 and state["ewc_stages"] == [1]
    assert (settings.root / "runs" / "full" / "fisher-stage1.png").stat().st_size > 0


def test_a_rank_added_by_an_elastic_scale_up_resumes_without_rng(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    checkpoint = ckpt.Checkpoint(4, {"a": torch.zeros(2)}, {}, {"optimizer": {}}, {"step": 4})
    ckpt.save_rank_rng(store, "elastic", 4, 0)
    ckpt.save(store, "elastic", checkpoint)
    assert ckpt.load(store, "elastic", 4, rank=0).rng is not None
    assert ckpt.load(store, "elastic", 4, rank=1).rng is None
