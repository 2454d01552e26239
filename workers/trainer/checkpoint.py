"""Checkpoints in the store: a `RecipeState`, complete enough that a resumed run repeats
the same losses.

`runs/<run-id>/checkpoints/<step>/` holds the adapter (safetensors), the EWC state, the
optimizer and scheduler state (mid-stage only: a stage starts with fresh ones), every
rank's RNG states, and the loop position with the data cursor (`state.json`, beside the
run's configuration); `runs/<run-id>/latest.json` names the newest complete one (written
last, so a crash mid-save leaves the previous checkpoint in charge).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from exforge.core.store import ObjectNotFound, ObjectStore
from workers.trainer.data import Cursor
from workers.trainer.ewc import EwcState


@dataclass
class RecipeState:
    """Exactly what a resume restores; the beginning of a run by default."""

    step: int = 0  # optimiser steps over all stages
    stage_index: int = 0  # the stage the loop is in (an index into the configured stages)
    stage_step: int = 0  # steps done in that stage; 0: it starts afresh
    cursor: Cursor | None = None  # the stage's data stream; None: from its start
    ewc: EwcState = field(default_factory=EwcState)
    adapter: dict[str, torch.Tensor] | None = None  # None: the adapters as initialised
    optimizer: dict[str, Any] | None = None  # optimizer and scheduler, mid-stage only
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None  # this rank's; None: continue from the seeds


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{run_prefix(run_id)}/checkpoints/{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes) -> Any:
    # Our own files: optimizer state and RNG tuples need full unpickling.
    return torch.load(io.BytesIO(data), weights_only=False)


def save_rank_rng(store: ObjectStore, run_id: str, step: int, rank: int) -> None:
    store.put(f"{checkpoint_prefix(run_id, step)}/rng-rank{rank}.pt", _torch_bytes(rng_state()))


def save(store: ObjectStore, run_id: str, state: RecipeState, config: dict[str, Any]) -> str:
    """Write a checkpoint (rank 0; other ranks add only their RNG first); return its prefix."""
    prefix = checkpoint_prefix(run_id, state.step)
    store.put(f"{prefix}/adapter.safetensors", save_safetensors(_contiguous(state.adapter or {})))
    store.put(f"{prefix}/ewc.safetensors", save_safetensors(_contiguous(state.ewc.tensors())))
    if state.optimizer is not None:
        trainer = {"optimizer": state.optimizer, "scheduler": state.scheduler}
        store.put(f"{prefix}/trainer.pt", _torch_bytes(trainer))
    position = {
        "step": state.step,
        "stage_index": state.stage_index,
        "stage_step": state.stage_step,
        "cursor": state.cursor.as_dict() if state.cursor else None,
        "ewc_stages": state.ewc.stages,
        "config": config,
    }
    store.put(f"{prefix}/state.json", json.dumps(position, indent=2).encode())
    store.put(f"{run_prefix(run_id)}/latest.json", json.dumps({"step": state.step}).encode())
    return prefix


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def latest_step(store: ObjectStore, run_id: str) -> int | None:
    try:
        return json.loads(store.get(f"{run_prefix(run_id)}/latest.json"))["step"]
    except ObjectNotFound:
        return None


def load(store: ObjectStore, run_id: str, step: int, rank: int = 0) -> RecipeState:
    prefix = checkpoint_prefix(run_id, step)
    position = json.loads(store.get(f"{prefix}/state.json"))
    trainer = _optional(store, f"{prefix}/trainer.pt") or {}
    return RecipeState(
        step=position["step"],
        stage_index=position["stage_index"],
        stage_step=position["stage_step"],
        cursor=Cursor(**position["cursor"]) if position["cursor"] else None,
        ewc=EwcState.from_tensors(
            load_safetensors(store.get(f"{prefix}/ewc.safetensors")), position["ewc_stages"]
        ),
        adapter=load_safetensors(store.get(f"{prefix}/adapter.safetensors")),
        optimizer=trainer.get("optimizer"),
        scheduler=trainer.get("scheduler"),
        rng=_optional(store, f"{prefix}/rng-rank{rank}.pt"),
    )


def _optional(store: ObjectStore, key: str) -> Any:
    """A torch file that may be missing: the optimizer of a stage-end checkpoint, or the
    RNG of a rank the run did not have (an elastic scale-up), which then continues from
    its seeds: correct, though no longer bit-exact."""
    try:
        return _torch_load(store.get(key))
    except ObjectNotFound:
        return None


def latest(store: ObjectStore, run_id: str, rank: int = 0) -> RecipeState | None:
    """The run's newest checkpoint, or None when it has none."""
    step = latest_step(store, run_id)
    return None if step is None else load(store, run_id, step, rank)


def saved_config(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """The configuration a run saved with its latest checkpoint (for `train resume`)."""
    step = latest_step(store, run_id)
    if step is None:
        return None
    return json.loads(store.get(f"{checkpoint_prefix(run_id, step)}/state.json"))["config"]
