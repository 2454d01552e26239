"""What `exforge compress run` is asked to do: its methods and options, checked without
loading torch, so that bad arguments fail at once."""

from __future__ import annotations

from pydantic import BaseModel, Field

METHODS = ("prune", "distill", "share", "fuse")


class CompressError(RuntimeError):
    """A compression that cannot run (unknown version or method, no data, a bad check)."""


class CompressOptions(BaseModel):
    drop_layers: int | None = Field(
        None, ge=1, description="Decoder layers to remove; default: a quarter (at least one)."
    )
    mlp_keep: float = Field(0.75, gt=0, le=1, description="Share of MLP channels kept.")
    heal_steps: int = Field(8, ge=1, description="QLoRA steps per stage after prune/share.")
    distill_steps: int = Field(8, ge=1, description="Distillation steps per stage.")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    seq_len: int = Field(512, gt=8)
    batch_size: int = Field(2, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    lora_rank: int = Field(16, gt=0)
    calibration_batches: int = Field(8, ge=1)


def parse_methods(text: str) -> list[str]:
    """`prune,distill,fuse` → the methods in the order they run."""
    asked = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(asked) - set(METHODS))
    if unknown or not asked:
        raise CompressError(f"unknown method(s) {unknown or text!r}; known: {', '.join(METHODS)}")
    return [m for m in METHODS if m in asked]
