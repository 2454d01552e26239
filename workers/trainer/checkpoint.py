"""Checkpoints in the store, complete enough that a resumed run repeats the same losses.

`runs/<run-id>/checkpoints/<step>/` holds the adapter (safetensors), optimizer and
scheduler state, every rank's RNG states, the data cursor, the EWC state and the loop
position; `runs/<run-id>/latest.json` names the newest complete one (written last, so a
crash mid-save leaves the previous checkpoint in charge).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from exforge.core.store import ObjectNotFound, ObjectStore


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


@dataclass
class Checkpoint:
    step: int
    adapter: dict[str, torch.Tensor]
    ewc: dict[str, torch.Tensor]
    trainer: dict[str, Any]  # optimizer and scheduler state dicts
    state: dict[str, Any]  # loop position, data cursor, EWC stages, history (JSON)
    rng: dict[str, Any] | None = None  # this rank's


def save_rank_rng(store: ObjectStore, run_id: str, step: int, rank: int) -> None:
    store.put(f"{checkpoint_prefix(run_id, step)}/rng-rank{rank}.pt", _torch_bytes(rng_state()))


def save(store: ObjectStore, run_id: str, checkpoint: Checkpoint) -> str:
    """Write a checkpoint (rank 0; other ranks add only their RNG first); return its prefix."""
    prefix = checkpoint_prefix(run_id, checkpoint.step)
    store.put(f"{prefix}/adapter.safetensors", save_safetensors(_contiguous(checkpoint.adapter)))
    store.put(f"{prefix}/ewc.safetensors", save_safetensors(_contiguous(checkpoint.ewc)))
    store.put(f"{prefix}/trainer.pt", _torch_bytes(checkpoint.trainer))
    store.put(f"{prefix}/state.json", json.dumps(checkpoint.state, indent=2).encode())
    store.put(f"{run_prefix(run_id)}/latest.json", json.dumps({"step": checkpoint.step}).encode())
    return prefix


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def latest_step(store: ObjectStore, run_id: str) -> int | None:
    try:
        return json.loads(store.get(f"{run_prefix(run_id)}/latest.json"))["step"]
    except ObjectNotFound:
        return None


def load(store: ObjectStore, run_id: str, step: int, rank: int = 0) -> Checkpoint:
    prefix = checkpoint_prefix(run_id, step)
    return Checkpoint(
        step=step,
        adapter=load_safetensors(store.get(f"{prefix}/adapter.safetensors")),
        ewc=load_safetensors(store.get(f"{prefix}/ewc.safetensors")),
        trainer=_torch_load(store.get(f"{prefix}/trainer.pt")),
        state=json.loads(store.get(f"{prefix}/state.json")),
        rng=_rank_rng(store, prefix, rank),
    )


def _rank_rng(store: ObjectStore, prefix: str, rank: int) -> Any:
    """This rank's RNG state; None for a rank the run did not have (an elastic scale-up),
    which then continues from its seeds: correct, though no longer bit-exact."""
    try:
        return _torch_load(store.get(f"{prefix}/rng-rank{rank}.pt"))
    except ObjectNotFound:
        return None


def saved_config(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """The configuration a run saved with its latest checkpoint (for `train resume`)."""
    step = latest_step(store, run_id)
    if step is None:
        return None
    return json.loads(store.get(f"{checkpoint_prefix(run_id, step)}/state.json"))["config"]
