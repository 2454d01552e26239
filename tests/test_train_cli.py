"""`exforge train --config`, `exforge train resume`, `exforge models list|show --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from tests.support.shards import synthetic_samples, write_split

EXFORGE = str(Path(sys.executable).parent / "exforge")


def test_train_halt_resume_and_models_commands(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(tmp_path / "data"), EXFORGE_CONFIG=str(tmp_path / "no.toml"))
    store = FileStore(load_settings(data_dir=tmp_path / "data").root / "store")
    for stage in (1, 2, 3):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, 8), 4)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 2, 1), 4)
    config = tmp_path / "train.toml"
    config.write_text(
        'run_id = "cli"\nseq_len = 96\nbatch_size = 1\nvalidate_every = 1\n'
        "fisher_samples = 2\nhalt_after_step = 2\n[lora]\nrank = 2\n"
        + "".join(f"[[stages]]\nstage = {s}\nsteps = 1\n" for s in (1, 2, 3))
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXFORGE, *args], env=env, capture_output=True, text=True, timeout=300, check=True
        )

    halted = json.loads(cli("train", "--config", str(config), "--json").stdout)
    assert halted["halted"] and halted["step"] == 2
    finished = json.loads(cli("train", "resume", "cli", "--json").stdout)
    assert finished["step"] == 3 and finished["version"]["version"] == 1
    versions = json.loads(cli("models", "list", "--json").stdout)
    assert [(v["name"], v["version"], v["run_id"]) for v in versions] == [
        ("exforge-elixir", 1, "cli")
    ]
    shown = json.loads(cli("models", "show", "exforge-elixir", "--json").stdout)
    assert store.exists(shown["adapter_key"])
    assert set(shown["metrics"]) == {"val_loss_stage1", "val_loss_stage2", "val_loss_stage3"}
