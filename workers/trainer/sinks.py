"""Where a training run's events go: one list of sinks, each told every `TrainingEvent`.

The recipe builds one `TrainingEvent` per happening (started, stage, progress, validation,
checkpoint, finished) and hands it to every sink in `Recipe.sinks`, then asks them all to
flush at the flush points (validation, checkpoint, the end). A sink takes what it needs:

- `History` (every rank): step losses and validations, for the run's summary and plots;
- `Prometheus` (rank 0): the `exforge_train_*` gauges from progress events;
- `Kafka` (rank 0, with a broker): the events on `training.events`, sent at flush points;
- a console display (`display.py`), attached while `exforge train` draws its progress bar.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from exforge.core import telemetry
from exforge.core.settings import Settings
from schemas.records import TrainingEvent


class Sink(Protocol):
    def emit(self, event: TrainingEvent) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class StepLog:
    step: int
    stage: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int


@dataclass
class History:
    """The run as this process saw it since it (re)started."""

    events: list[TrainingEvent] = field(default_factory=list)
    steps: list[StepLog] = field(default_factory=list)
    validations: list[TrainingEvent] = field(default_factory=list)

    def emit(self, event: TrainingEvent) -> None:
        self.events.append(event)
        if event.event == "progress" and event.stage is not None:
            m = event.metrics
            tokens = int(m["tokens"])
            log = StepLog(event.step, event.stage, m["loss"], m["lr"], m["grad_norm"], tokens)
            self.steps.append(log)
        elif event.event == "validation":
            self.validations.append(event)

    def flush(self) -> None:
        return None

    @property
    def losses(self) -> list[float]:
        return [entry.loss for entry in self.steps]

    def last_validation(self) -> dict[str, float]:
        """The validation losses per stage of the latest validation."""
        last = self.validations[-1].metrics if self.validations else {}
        return {k: v for k, v in last.items() if k.startswith("val_loss")}


@dataclass
class Prometheus:
    """Step metrics on the trainer's /metrics gauges."""

    run_id: str

    def emit(self, event: TrainingEvent) -> None:
        if event.event != "progress":
            return
        labels = {"run": self.run_id, "stage": str(event.stage)}
        m = event.metrics
        telemetry.TRAIN_LOSS.labels(**labels).set(m["loss"])
        telemetry.TRAIN_LR.labels(**labels).set(m["lr"])
        telemetry.TRAIN_GRAD_NORM.labels(**labels).set(m["grad_norm"])
        telemetry.TRAIN_TOKENS_PER_S.labels(**labels).set(m["tokens_per_s"])
        telemetry.TRAIN_PEAK_MEMORY.labels(run=self.run_id).set(m["peak_memory_bytes"])

    def flush(self) -> None:
        return None


@dataclass
class Kafka:
    """Events on `training.events`, keyed by run id, sent in order at each flush."""

    settings: Settings
    run_id: str
    pending: list[TrainingEvent] = field(default_factory=list)

    def emit(self, event: TrainingEvent) -> None:
        self.pending.append(event)

    def flush(self) -> None:
        if not self.pending:
            return
        from exforge.core.kafka import produce

        batch = [(self.run_id, event) for event in self.pending]
        asyncio.run(produce(self.settings, "training.events", batch))
        self.pending = []
