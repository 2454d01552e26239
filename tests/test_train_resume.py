"""The recipe end to end through the CLI: stages, checkpoints, `exforge train resume`
after a SIGKILL, the registry (`exforge models list|show`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from exforge.core.settings import load_settings
from exforge.core.store import FileStore, ObjectStore
from tests.support.shards import synthetic_samples, write_split
from workers.trainer import checkpoint as ckpt
from workers.trainer.recipe import StageConfig, TrainConfig

EXFORGE = str(Path(sys.executable).parent / "exforge")
PAUSED_RUN = str(Path(__file__).parent / "support" / "paused_run.py")


def write_corpus(store: ObjectStore, train: int = 24) -> None:
    for stage in (1, 2, 3):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, train), 8)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 4, 1), 8)


def config_file(directory: Path, run_id: str) -> str:
    stages = [StageConfig(stage=s, steps=3, learning_rate=1e-2, warmup_steps=1) for s in (1, 2, 3)]
    config = TrainConfig(
        run_id=run_id,
        seq_len=128,
        batch_size=2,
        validate_every=3,
        checkpoint_every=2,
        fisher_samples=4,
        stages=stages,
        lora={"rank": 4, "dropout": 0.1},  # dropout: the RNG streams must resume too
    )
    path = directory / f"{run_id}.json"
    path.write_text(config.model_dump_json())
    return str(path)


@pytest.fixture
def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(tmp_path / "data"), EXFORGE_CONFIG=str(tmp_path / "no.toml"))
    write_corpus(FileStore(load_settings(data_dir=tmp_path / "data").root / "store"))
    return env


def summary(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run(
        [EXFORGE, *args, "--json"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def killed_after(env: dict[str, str], step: int, *args: str) -> list[float]:
    """Run the command until the progress event of `step`, SIGKILL it there; its losses."""
    child = subprocess.Popen(
        [sys.executable, PAUSED_RUN, str(step), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    losses = []
    for line in child.stdout:
        if line.strip() == "paused":
            break
        losses.append(json.loads(line)["loss"])
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    return losses


@pytest.mark.timeout(900)  # five training processes on a shared machine
def test_run_killed_mid_stage_resumes_with_identical_losses(
    tmp_path: Path, environment: dict[str, str]
) -> None:
    store = FileStore(tmp_path / "data" / "store")
    full = summary(environment, "train", "--config", config_file(tmp_path, "full"))
    losses = full["losses"]
    assert isinstance(losses, list) and len(losses) == 9
    for stage in range(3):  # the loss falls within every stage
        assert losses[3 * stage + 2] < losses[3 * stage]

    # SIGKILL after step 5: the last checkpoint is step 4, mid stage 2.
    cut = killed_after(environment, 5, "train", "--config", config_file(tmp_path, "cut"))
    assert cut == losses[:5]
    assert ckpt.latest_step(store, "cut") == 4 and not store.exists(
        ckpt.checkpoint_prefix("cut", 5) + "/state.json"
    )
    resumed = summary(environment, "train", "resume", "cut")
    assert resumed["losses"] == losses[4:]
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
    state = ckpt.load(store, "cut", 4)
    assert (state.stage_index, state.stage_step, state.ewc.stages) == (1, 1, [1])
    assert state.cursor is not None and state.cursor.stage == 2
    stage_end = ckpt.load(store, "cut", 3)  # a stage starts with a fresh optimiser
    assert (stage_end.stage_index, stage_end.stage_step, stage_end.optimizer) == (1, 0, None)
    assert (tmp_path / "data" / "runs" / "full" / "fisher-stage1.png").stat().st_size > 0

    versions = summary(environment, "models", "list")
    assert [(v["name"], v["version"], v["run_id"]) for v in versions] == [
        ("exforge-elixir", 1, "full"),
        ("exforge-elixir", 2, "cut"),
    ]
    shown = summary(environment, "models", "show", "exforge-elixir")
    assert store.exists(shown["adapter_key"])
    assert set(shown["metrics"]) == {"val_loss_stage1", "val_loss_stage2", "val_loss_stage3"}


def test_a_rank_added_by_an_elastic_scale_up_resumes_without_rng(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    state = ckpt.RecipeState(step=4, adapter={"a": torch.zeros(2)})
    ckpt.save_rank_rng(store, "elastic", 4, 0)
    ckpt.save(store, "elastic", state, {})
    assert ckpt.load(store, "elastic", 4, rank=0).rng is not None
    assert ckpt.load(store, "elastic", 4, rank=1).rng is None
