"""`exforge serve export`: a registered version as a Triton model repository.

The cpu flavor is a python-backend model (`python_model/model.py`) with the merged
weights in `<name>/<version>/model/`; the trtllm flavor is the in-flight batching
ensemble with the merged checkpoint and `build_engine.sh`. Both go to a local
directory (the local Triton's repository) and to the store under `triton/<flavor>/`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.registry import get_version
from serving import modelconfig
from serving.trtllm_config import trtllm_configs

Flavor = Literal["cpu", "trtllm"]
HERE = Path(__file__).parent
MODEL_TEMPLATE = HERE / "python_model" / "model.py"
BUILD_SCRIPT = HERE / "trtllm" / "build_engine.sh"


class ExportError(RuntimeError):
    pass


@dataclass(frozen=True)
class Exported:
    name: str
    version: int
    flavor: Flavor
    repository: Path
    store_prefix: str
    files: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "repository": str(self.repository)}


def repository_dir(settings: Settings, flavor: Flavor) -> Path:
    return settings.root / "triton" / flavor


def model_card(row: dict[str, Any], flavor: Flavor) -> dict[str, Any]:
    return {
        "name": row["name"],
        "version": row["version"],
        "flavor": flavor,
        "base_model": row["base_model"],
        "adapter": row["adapter_key"],
        "training_run": row["run_id"],
        "data": "exforge instruction shards (see the run's configuration)",
        "metrics": row["metrics"],
        "registered_at": row["created_at"],
        "contract": "TensorRT-LLM ensemble: text_input, max_tokens, stop_words, top_k, top_p, "
        "temperature, seed, stream (+ perf and token-count flags) -> text_output",
    }


def existing_versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def export_cpu(
    settings: Settings, store: ObjectStore, row: dict[str, Any], root: Path, token_delay_s: float
) -> Path:
    from exforge.llm.generation import DecodeOptions  # torch: the [train] extra
    from exforge.llm.lora import merged_model

    model_dir = root / row["name"]
    version_dir = model_dir / str(row["version"])
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    merged_model(settings, store, row, version_dir / "model")
    shutil.copy(MODEL_TEMPLATE, version_dir / "model.py")
    options = DecodeOptions.from_settings(settings)
    decoding: dict[str, Any] = {"token_delay_s": token_delay_s} if token_delay_s else {}
    if options != DecodeOptions():
        decoding["options"] = options.as_dict()
    if decoding:
        (version_dir / "decoding.json").write_text(json.dumps(decoding))
    (version_dir / "card.json").write_text(json.dumps(model_card(row, "cpu"), indent=2))
    config = modelconfig.cpu_config(
        row["name"], existing_versions(model_dir), decoupled=settings.triton_decoupled
    )
    (model_dir / "config.pbtxt").write_text(modelconfig.render(config))
    return model_dir


def export_trtllm(settings: Settings, store: ObjectStore, row: dict[str, Any], root: Path) -> Path:
    """One complete repository per version: a TensorRT-LLM engine is built per version,
    and one Triton serves one engine (blue-green across Triton servers)."""
    from exforge.llm.lora import merged_model  # torch and peft: the [train] extra

    target = root / row["name"] / str(row["version"])
    if target.exists():
        shutil.rmtree(target)
    checkpoint = target / "checkpoint"
    merged_model(settings, store, row, checkpoint)
    configs = trtllm_configs(
        row["name"], row["version"], engine_dir="/models/engine", tokenizer_dir="/models/checkpoint"
    )
    for folder, config in configs.items():
        version = row["version"] if folder == row["name"] else 1
        (target / "repository" / folder / str(version)).mkdir(parents=True)
        (target / "repository" / folder / "config.pbtxt").write_text(modelconfig.render(config))
    shutil.copy(BUILD_SCRIPT, target / "build_engine.sh")
    (target / "card.json").write_text(json.dumps(model_card(row, "trtllm"), indent=2))
    return target


def upload(store: ObjectStore, local: Path, prefix: str) -> int:
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.put(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
            count += 1
    return count


def export(
    settings: Settings,
    store: ObjectStore,
    engine: Engine,
    name: str,
    version: int,
    flavor: Flavor = "cpu",
    root: Path | None = None,
    token_delay_s: float = 0.0,
) -> Exported:
    """Export one version; `token_delay_s` (cpu flavor) makes it decode slowly, a test
    model for watching streaming, deadlines and latency rollbacks."""
    row = get_version(engine, name, version)
    if row is None:
        raise ExportError(f"model {name} has no registered version {version}")
    root = root or repository_dir(settings, flavor)
    if flavor == "cpu":
        written = export_cpu(settings, store, row, root, token_delay_s)
        uploaded = written / str(version)
    else:
        written = uploaded = export_trtllm(settings, store, row, root)
    prefix = f"triton/{flavor}/{name}/{version}"
    files = upload(store, uploaded, prefix)
    if flavor == "cpu":
        store.put(f"triton/cpu/{name}/config.pbtxt", (written / "config.pbtxt").read_bytes())
    return Exported(name, version, flavor, root, prefix, files)
