"""EWC figure: how much stage-1 validation loss rises during stages 2-3, λ = 0 vs λ > 0.

Runs the real recipe on the tiny model (CPU) with the synthetic three-style corpus and
prints one JSON line per λ. Usage: python benchmarks/ewc_forgetting.py [λ ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from tests.support.shards import synthetic_samples, write_split
from workers.trainer.recipe import Recipe, StageConfig, TrainConfig

STEPS = 12


def forgetting(lam: float, root: Path) -> dict[str, float]:
    settings = load_settings(data_dir=root)
    store = FileStore(root / "store")
    for stage in (1, 2, 3):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, 48), 16)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 8, 1), 16)
    stages = [
        StageConfig(
            stage=s,
            steps=STEPS,
            learning_rate=1e-2,
            warmup_steps=2,
            ewc_lambda=0.0 if s == 1 else lam,
        )
        for s in (1, 2, 3)
    ]
    config = TrainConfig(
        run_id=f"ewc-{lam:g}",
        seq_len=128,
        batch_size=2,
        validate_every=STEPS,
        fisher_samples=32,
        stages=stages,
        register_as=None,
        lora={"rank": 8},
    )
    trainer = Recipe(config, settings, store)
    trainer.run()
    first, last = trainer.history.validations[0].metrics, trainer.history.validations[-1].metrics
    after_stage1, after_stage3 = first["val_loss_stage1"], last["val_loss_stage1"]
    return {
        "lambda": lam,
        "stage1_val_after_stage1": round(after_stage1, 4),
        "stage1_val_after_stage3": round(after_stage3, 4),
        "rise": round(after_stage3 - after_stage1, 4),
        "stage3_val_after_stage3": round(last["val_loss_stage3"], 4),
    }


def main() -> None:
    lambdas = [float(x) for x in sys.argv[1:]] or [0.0, 1e4]
    with tempfile.TemporaryDirectory() as tmp:
        for lam in lambdas:
            print(json.dumps(forgetting(lam, Path(tmp) / f"l{lam:g}")), flush=True)


if __name__ == "__main__":
    main()
