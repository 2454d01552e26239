"""A rich progress display for `exforge train`: one bar over all stages, live metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from schemas.records import TrainingEvent
from workers.trainer.recipe import Recipe


def describe(stage: int | None, metrics: dict[str, float]) -> str:
    return (
        f"stage {stage} · loss {metrics['loss']:.4f} · lr {metrics['lr']:.2e}"
        f" · |g| {metrics['grad_norm']:.3f} · {metrics['tokens_per_s']:,.0f} tok/s"
        f" · peak {metrics['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


@dataclass
class ConsoleSink:
    """Progress events move the bar and show the step's metrics."""

    progress: Progress
    task: TaskID

    def emit(self, event: TrainingEvent) -> None:
        if event.event == "progress":
            description = describe(event.stage, event.metrics)
            self.progress.update(self.task, completed=event.step, description=description)

    def flush(self) -> None:
        return None


@contextmanager
def training_progress(recipe: Recipe, enabled: bool = True) -> Iterator[None]:
    """Show progress on stderr (stdout stays clean for `--json`) while the block trains."""
    if not enabled or not recipe.dist.main:
        yield
        return
    total = sum(stage.steps for stage in recipe.config.stages)
    columns = (
        TextColumn(f"run {recipe.run_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        sink = ConsoleSink(progress, progress.add_task("starting", total=total))
        recipe.sinks.append(sink)
        try:
            yield
        finally:
            recipe.sinks.remove(sink)
