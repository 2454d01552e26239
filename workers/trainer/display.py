"""A rich progress display for `exforge train`: one bar over all stages, live metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from workers.trainer.recipe import Trainer


def describe(stage: int, metrics: dict[str, float]) -> str:
    return (
        f"stage {stage} · loss {metrics['loss']:.4f} · lr {metrics['lr']:.2e}"
        f" · |g| {metrics['grad_norm']:.3f} · {metrics['tokens_per_s']:,.0f} tok/s"
        f" · peak {metrics['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


@contextmanager
def training_progress(trainer: Trainer, enabled: bool = True) -> Iterator[None]:
    """Show progress on stderr (stdout stays clean for `--json`) while the block trains."""
    if not enabled or not trainer.dist.main:
        yield
        return
    total = sum(stage.steps for stage in trainer.config.stages)
    columns = (
        TextColumn(f"run {trainer.run_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("starting", total=total)

        def on_step(step: int, stage: int, metrics: dict[str, float]) -> None:
            progress.update(task, completed=step, description=describe(stage, metrics))

        trainer.on_step = on_step
        try:
            yield
        finally:
            trainer.on_step = None
