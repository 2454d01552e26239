"""The QLoRA training recipe: one readable loop, driven by a config file.

    load base (NF4) → adapters → for stage in 1, 2, 3:
        warm-up + cosine schedule; batches of packed conversations from the store;
        loss = assistant-token cross-entropy (+ λ/2·ΣF(θ-θ*)² once a stage is done);
        validation every N steps (adaptive pacing unlocks harder samples);
        checkpoint every N steps and at the stage end; Fisher at the stage end;
        SSR: a synthetic rehearsal buffer of the stage, mixed into the later stages
    → register a model version, announce it on `models.versions`

Everything a resume needs is in the checkpoint; on the CPU a resumed run repeats the
uninterrupted run's losses exactly. Under `torchrun` each rank reads its own shards
and DDP (gloo on CPU, NCCL on GPU) synchronises gradients; with `distributed = "fsdp"`
FSDP (through accelerate) shards the frozen base over the ranks instead (`fsdp.py`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import tomllib
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, Field, model_validator
from torch.distributed.fsdp import FullyShardedDataParallel

from exforge.core import tracing
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.chat import Encoded, encode, load_tokenizer
from exforge.llm.lora import LoraSettings, adapter_state, apply_lora, load_adapter_state
from exforge.llm.model import Quantisation, detect_device, load_model, resolve_spec
from exforge.llm.registry import (
    Lineage,
    finish_run,
    record_checkpoint,
    register_version,
    start_run,
)
from schemas.records import TrainingEvent
from schemas.shards import difficulty
from workers.trainer import checkpoint as ckpt
from workers.trainer.checkpoint import RecipeState
from workers.trainer.data import Cursor, epoch_order, load_split, mix
from workers.trainer.ewc import EwcState, consolidate, estimate_fisher, penalty, plot_importance
from workers.trainer.loss import DEFAULT_CHUNK, Distillation, forward_losses
from workers.trainer.packing import Pack, collate, pack, padding
from workers.trainer.sinks import History, Kafka, Prometheus, Sink
from workers.trainer.ssr import SsrConfig, build_buffer, load_buffers, store_buffer

# ----------------------------------------------------------------------------- config


class StageConfig(BaseModel):
    stage: int = Field(ge=1, le=3)
    steps: int = Field(gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    ewc_lambda: float = Field(0.0, ge=0, description="λ while training this stage.")


class DistillConfig(BaseModel):
    """Knowledge distillation: a frozen teacher's softened logits as a second target."""

    teacher: str = Field(description="Model spec of the teacher (preset, directory, store:…).")
    teacher_quantisation: Quantisation = "none"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha: CE.")


class TrainConfig(BaseModel):
    run_id: str | None = None
    model: str = "tiny"
    quantisation: Quantisation = "nf4"
    seed: int = 0
    dataset: str | None = Field(None, description="Default: EXFORGE_DATASET.")
    stages: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(stage=s, steps=20) for s in (1, 2, 3)]
    )
    batch_size: int = Field(2, gt=0, description="Packed sequences per rank and step.")
    seq_len: int = Field(512, gt=8)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    validate_every: int = Field(10, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="0: only at stage ends.")
    pacing_threshold: float | None = Field(
        None, description="Unlock the next difficulty once validation loss is below this."
    )
    fisher_samples: int = Field(32, ge=0)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    ssr: SsrConfig = Field(default_factory=SsrConfig)
    register_as: str | None = Field("exforge-elixir", description="Model name; None: skip.")
    lineage: Lineage | None = Field(None, description="Recorded with the registered version.")
    distill: DistillConfig | None = None
    loss_chunk_tokens: int | None = Field(
        DEFAULT_CHUNK,
        gt=0,
        description="Trained positions per chunk of the output-head loss; None: the whole "
        "logits at once (what FSDP does, the head's weight being sharded).",
    )
    fused_kernels: bool = Field(
        True,
        description="On CUDA: RMSNorm, SwiGLU and RoPE as fused Triton kernels "
        "(workers/trainer/kernels.py). The CPU always runs PyTorch's own ops.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: DDP (a whole model per rank) or FSDP through accelerate "
        "(the frozen base sharded over the ranks, the adapters replicated).",
    )

    @model_validator(mode="after")
    def _fsdp_needs_nf4_or_none(self) -> TrainConfig:
        if self.distributed == "fsdp" and self.quantisation == "int8":
            raise ValueError(
                "distributed = 'fsdp' shards NF4 or unquantised bases; bitsandbytes' INT8 "
                "weights cannot share a flattened FSDP unit with the other weights"
            )
        return self

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls.model_validate(data)


# ------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if torch.cuda.is_available():  # NCCL works on the current device: this rank's GPU
        torch.cuda.set_device(detect_device().device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def all_sum(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value)
    return value


# ------------------------------------------------------------------------- schedule


def uses_fused_kernels(config: TrainConfig, device: torch.device) -> bool:
    """Whether the model runs the Triton kernels: asked for, and on a GPU."""
    return config.fused_kernels and device.type == "cuda"


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warm-up, then cosine down to `min_lr_ratio` at the stage's last step."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    span = max(stage.steps - stage.warmup_steps, 1)
    progress = min((step - stage.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cosine


# --------------------------------------------------------------------------- recipe


class Recipe:
    """One training run, from scratch or from the run's latest checkpoint (`run()`).

    `run` reads as the recipe: restore → for each remaining stage: `train_stage` (steps,
    validation, checkpoints, then `end_stage`: Fisher, consolidation, SSR) → `finish`
    (curriculum plot, registration). Every metric goes through `emit` to `sinks`.
    """

    def __init__(
        self,
        config: TrainConfig,
        settings: Settings,
        store: ObjectStore,
        engine: Any = None,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.engine = engine
        self.run_id = config.run_id or uuid.uuid4().hex[:12]
        self.dataset = config.dataset or settings.dataset
        self.tokenizer = load_tokenizer()
        self._encoded: dict[str, Encoded] = {}
        # Load before joining the group: save_pretrained writes weights on rank 0 only once
        # a group exists, and every rank may be the one materialising a preset.
        fsdp = config.distributed == "fsdp"
        models = settings.root / "models"
        self.base_spec = resolve_spec(config.model, store, models)
        base = load_model(self.base_spec, config.quantisation, models, config.seed, fsdp)
        if uses_fused_kernels(config, next(base.parameters()).device):
            from workers.trainer.kernels import use_fused_kernels

            use_fused_kernels(base)
        self.dist = init_distributed()
        if self.dist.world > 1:  # every rank must write under rank 0's run id
            shared = [self.run_id]
            dist.broadcast_object_list(shared, src=0)
            self.run_id = shared[0]
        self.history = History()
        self.sinks: list[Sink] = [self.history]
        if self.dist.main:
            self.sinks.append(Prometheus(self.run_id))
            if settings.kafka_bootstrap:
                self.sinks.append(Kafka(settings, self.run_id))
        self.sinks.extend(sinks)
        torch.manual_seed(config.seed)  # after loading: a first load initialises a preset
        self.model = apply_lora(base, config.lora, fsdp)
        self.module: torch.nn.Module = self.model
        if self.dist.world > 1 and fsdp:
            from workers.trainer.fsdp import shard

            self.module = shard(self.model)
        elif self.dist.world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(self.model)
        self.device = next(self.model.parameters()).device
        self.distillation = self.teacher(config.distill) if config.distill else None

    def teacher(self, distill: DistillConfig) -> Distillation:
        """The frozen teacher, on this rank's device, in eval mode."""
        models = self.settings.root / "models"
        spec = resolve_spec(distill.teacher, self.store, models)
        model = load_model(spec, distill.teacher_quantisation, models, self.config.seed)
        model.requires_grad_(False)
        return Distillation(model.eval(), distill.temperature, distill.alpha)

    # ------------------------------------------------------------------ metrics

    def emit(self, event: str, step: int, stage: int | None, **fields: Any) -> None:
        """The one place a run reports: every sink sees every event."""
        record = TrainingEvent(run_id=self.run_id, event=event, step=step, stage=stage, **fields)
        for sink in self.sinks:
            sink.emit(record)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    # ------------------------------------------------------------------ FSDP

    @property
    def sharded(self) -> bool:
        return isinstance(self.module, FullyShardedDataParallel)

    @property
    def runner(self) -> torch.nn.Module:
        """What forwards outside a train step go through. Under FSDP only the wrapper can
        run one (each layer gathers its shards from every rank); under DDP the plain
        model, which needs no other rank."""
        return self.module if self.sharded else self.model

    def lockstep(self, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Under FSDP every forward needs every rank, so each runs as many as the rank with
        the most batches: the others add padding-only batches, which weigh nothing."""
        if not self.sharded:
            return batches
        most = torch.tensor(len(batches), device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        filler = collate([padding(self.config.seq_len)])
        return batches + [filler] * (int(most) - len(batches))

    def local_gradients(self) -> AbstractContextManager[Any]:
        """Backward passes whose gradients stay on this rank (per-sample Fisher)."""
        if self.sharded:
            return self.module.no_sync()  # type: ignore[operator]
        return nullcontext()  # the plain model under DDP never synchronises

    def unsharded(self) -> torch.nn.Module:
        """A model rank 0 can run alone (SSR generation). An FSDP forward needs every rank,
        so under FSDP this loads a second, whole base with the current adapters."""
        if not self.sharded:
            return self.model
        config = self.config
        cuda = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # adapter init: keep this rank's streams
            models = self.settings.root / "models"
            base = load_model(self.base_spec, config.quantisation, models, config.seed, fsdp=True)
            copy = apply_lora(base, config.lora, fsdp=True)
        load_adapter_state(copy, adapter_state(self.model))
        return copy

    # ------------------------------------------------------------------ data

    def encoded(self, sample: dict[str, Any]) -> Encoded:
        if sample["id"] not in self._encoded:
            self._encoded[sample["id"]] = encode(self.tokenizer, sample["conversations"])
        return self._encoded[sample["id"]]

    def epoch_packs(self, samples: list[dict[str, Any]], cursor: Cursor) -> list[Pack]:
        order = epoch_order(samples, self.config.seed, cursor, self.dist.rank)
        return pack((self.encoded(s) for s in order), self.config.seq_len)

    def next_batch(
        self, samples: list[dict[str, Any]], cursor: Cursor
    ) -> tuple[list[Pack], Cursor]:
        """The next `batch_size` packs; a short tail starts the next epoch."""
        for _ in range(2):
            packs = self.epoch_packs(samples, cursor)
            end = cursor.position + self.config.batch_size
            if end <= len(packs):
                return packs[cursor.position : end], Cursor(
                    cursor.stage, cursor.epoch, end, cursor.level
                )
            cursor = Cursor(cursor.stage, cursor.epoch + 1, 0, cursor.level)
        raise ValueError(
            f"stage {cursor.stage}: rank {self.dist.rank} has fewer than "
            f"{self.config.batch_size} packed sequences of data"
        )

    def stage_data(self, index: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The stage's real training samples, and those plus earlier stages' rehearsal."""
        stages = self.config.stages
        real = load_split(
            self.store, self.dataset, stages[index].stage, "train", self.dist.rank, self.dist.world
        )
        return real, self.with_rehearsal(real, [s.stage for s in stages[:index]])

    def validation_sets(self) -> dict[int, list[dict[str, Any]]]:
        return {
            s.stage: load_split(
                self.store, self.dataset, s.stage, "validation", self.dist.rank, self.dist.world
            )
            for s in self.config.stages
        }

    # ------------------------------------------------------------------ steps

    def train_step(
        self, packs: list[Pack], optimizer: torch.optim.Optimizer, ewc: EwcState, lam: float
    ) -> tuple[float, float, int]:
        """One optimiser step; the loss is the mean over the trained tokens of all ranks."""
        self.module.train()
        batch = collate(packs)
        tokens = (batch["targets"] != -100).sum()
        total = all_sum(tokens.clone().float().to(self.device), self.dist.world)
        losses = forward_losses(
            self.module, batch, self.distillation, self.config.loss_chunk_tokens
        )
        # DDP averages gradients over ranks: scale so the average is the global token mean.
        data_loss = losses.sum() / total * self.dist.world
        loss = data_loss + penalty(self.model, ewc, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sharded:  # norms over all ranks' shards
            grad_norm = self.module.clip_grad_norm_(self.config.max_grad_norm)  # type: ignore[operator]
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        global_loss = all_sum(losses.sum().detach(), self.dist.world) / total
        return float(global_loss), float(grad_norm), int(tokens)

    @torch.no_grad()
    def validation_loss(self, samples: list[dict[str, Any]], level: int = 5) -> float | None:
        """Mean token loss over this rank's validation samples up to `level`, all ranks."""
        chosen = [s for s in samples if difficulty(s) <= level]
        runner = self.runner
        runner.eval()
        total = torch.zeros(2, device=self.device)
        packs = pack((self.encoded(s) for s in chosen), self.config.seq_len)
        size = self.config.batch_size
        batches = [collate(packs[start : start + size]) for start in range(0, len(packs), size)]
        for batch in self.lockstep(batches):
            losses = forward_losses(runner, batch, chunk=self.config.loss_chunk_tokens)
            total += torch.stack([losses.sum(), (batch["targets"] != -100).sum().float()])
        all_sum(total, self.dist.world)
        return float(total[0] / total[1]) if total[1] > 0 else None

    def fisher(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Per-sample Fisher over up to `fisher_samples` of the stage's data."""
        chosen = samples[: self.config.fisher_samples]
        packs = (pack([self.encoded(s)], self.config.seq_len) for s in chosen)
        # a sample whose trained tokens all fall past seq_len packs to nothing: skip it
        batches = self.lockstep([collate(p) for p in packs if p])
        runner = self.runner
        runner.train()
        with self.local_gradients():
            fisher = estimate_fisher(runner, batches)
        for tensor in fisher.values():
            all_sum(tensor, self.dist.world)
            tensor /= self.dist.world
        return fisher

    # ------------------------------------------------------------------ the loop

    @tracing.traced("train run")
    def run(self) -> dict[str, Any]:
        state = self.restore()
        if self.engine is not None and self.dist.main:
            config = self.config
            start_run(self.engine, self.run_id, config.model, config.model_dump(mode="json"))
        self.emit("started", state.step, None, message=f"model {self.config.model}")
        validation = self.validation_sets()
        for index in range(state.stage_index, len(self.config.stages)):
            state = self.train_stage(index, state, validation)
        return self.finish(state.step)

    def optimiser(
        self, stage: StageConfig, state: RecipeState
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW with the stage's schedule; resumed mid-stage, with its saved state."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=stage.learning_rate, weight_decay=self.config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s, stage=stage: lr_factor(s, stage)
        )
        if state.optimizer is not None and state.scheduler is not None:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        return optimizer, scheduler

    def train_stage(
        self, index: int, state: RecipeState, validation: dict[int, list[dict[str, Any]]]
    ) -> RecipeState:
        """Train one stage from where `state` stands; returns the state at its end."""
        config, stage = self.config, self.config.stages[index]
        real, samples = self.stage_data(index)
        optimizer, scheduler = self.optimiser(stage, state)
        # Without pacing every difficulty is unlocked from the start.
        level = 1 if config.pacing_threshold is not None else 5
        cursor = state.cursor or Cursor(stage.stage, level=level)
        step, stage_step, ewc = state.step, state.stage_step, state.ewc
        if stage_step == 0:
            self.emit("stage", step, stage.stage, message="stage started")
        while stage_step < stage.steps:
            packs, cursor = self.next_batch(samples, cursor)
            step, stage_step = step + 1, stage_step + 1
            self.optimise(step, stage, packs, optimizer, scheduler, ewc)
            if config.validate_every and stage_step % config.validate_every == 0:
                cursor = self.validate(step, stage.stage, cursor, validation)
            if stage_step == stage.steps:
                ewc = self.end_stage(step, index, samples, real, ewc)
                self.checkpoint(RecipeState(step, index + 1, 0, ewc=ewc), stage.stage)
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                mid = RecipeState(
                    step,
                    index,
                    stage_step,
                    cursor,
                    ewc,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                )
                self.checkpoint(mid, stage.stage)
        return RecipeState(step, index + 1, 0, ewc=ewc)

    def optimise(
        self,
        step: int,
        stage: StageConfig,
        packs: list[Pack],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ewc: EwcState,
    ) -> None:
        """One optimiser step and its progress event."""
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss, grad_norm, tokens = self.train_step(packs, optimizer, ewc, stage.ewc_lambda)
        scheduler.step()
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": float(tokens),
            "tokens_per_s": tokens * self.dist.world / (time.perf_counter() - started),
            "peak_memory_bytes": float(peak_memory()),
        }
        self.emit("progress", step, stage.stage, metrics=metrics)

    def end_stage(
        self,
        step: int,
        index: int,
        samples: list[dict[str, Any]],
        real: list[dict[str, Any]],
        ewc: EwcState,
    ) -> EwcState:
        """Fisher and consolidation (EWC), the importance map, the SSR buffer."""
        stage = self.config.stages[index].stage
        fisher = self.fisher(samples)
        ewc = consolidate(ewc, self.model, fisher, stage)
        if self.dist.main:
            path = self.run_dir / f"fisher-stage{stage}.png"
            plot_importance(fisher, path, f"stage {stage} parameter importance")
        self.emit("stage", step, stage, message="stage finished")
        if self.config.ssr.enabled and index + 1 < len(self.config.stages):
            self.rehearse(step, stage, real)
        return ewc

    @property
    def run_dir(self) -> Path:
        return self.settings.root / "runs" / self.run_id

    # ------------------------------------------------------------------ rehearsal

    def with_rehearsal(
        self, real: list[dict[str, Any]], earlier: list[int]
    ) -> list[dict[str, Any]]:
        """Real samples plus this rank's part of the earlier stages' SSR buffers."""
        if not self.config.ssr.enabled or not earlier:
            return real
        buffers = load_buffers(self.store, self.run_id, earlier)[self.dist.rank :: self.dist.world]
        return mix(real, buffers, self.config.ssr.ratio, self.config.seed + earlier[-1])

    @tracing.traced("train rehearsal")
    def rehearse(self, step: int, stage: int, real: list[dict[str, Any]]) -> None:
        """Build and store the stage's SSR buffer (rank 0; the others wait for it)."""
        if self.dist.main:
            ssr = self.config.ssr
            buffer = build_buffer(
                self.unsharded(),
                self.tokenizer,
                real,
                stage,
                ssr,
                self.config.seed + stage,
                ssr.limit(self.config.seq_len),
            )
            key = store_buffer(self.store, self.run_id, stage, buffer.samples)
            self.emit("stage", step, stage, message=f"ssr buffer {key}", metrics=buffer.metrics())
        if self.dist.world > 1:
            dist.barrier()

    @tracing.traced("train validation")
    def validate(
        self, step: int, stage: int, cursor: Cursor, validation: dict[int, list[dict[str, Any]]]
    ) -> Cursor:
        """Validation loss of every stage seen so far; unlock harder data when due."""
        losses = {
            f"val_loss_stage{s}": loss
            for s, samples in validation.items()
            if s <= stage and (loss := self.validation_loss(samples)) is not None
        }
        current = self.validation_loss(validation[stage], cursor.level)
        unlocked = {"unlocked_level": float(cursor.level)}
        if current is not None:
            unlocked["unlocked_loss"] = current
        self.emit("validation", step, stage, metrics=losses | unlocked)
        self.flush()
        threshold = self.config.pacing_threshold
        if (
            threshold is not None
            and current is not None
            and current < threshold
            and cursor.level < 5
        ):
            return Cursor(cursor.stage, cursor.epoch + 1, 0, cursor.level + 1)
        return cursor

    # ------------------------------------------------------------------ checkpoints

    @tracing.traced("train checkpoint")
    def checkpoint(self, state: RecipeState, stage: int) -> None:
        """Save `state` with the current adapters and every rank's RNG (rank 0 writes)."""
        ckpt.save_rank_rng(self.store, self.run_id, state.step, self.dist.rank)
        if self.dist.world > 1:
            dist.barrier()
        if not self.dist.main:
            return
        state.adapter = adapter_state(self.model)
        key = ckpt.save(self.store, self.run_id, state, self.config.model_dump(mode="json"))
        if self.engine is not None:
            steps = self.history.steps
            metrics = {"loss": steps[-1].loss} if steps else {}
            record_checkpoint(self.engine, self.run_id, state.step, stage, key, metrics)
        self.emit("checkpoint", state.step, stage, checkpoint_key=key)
        self.flush()

    def restore(self) -> RecipeState:
        """The run's latest checkpoint, its adapters and RNG loaded; else the beginning."""
        saved = ckpt.latest(self.store, self.run_id, self.dist.rank)
        if saved is None:
            return RecipeState()
        if saved.adapter is not None:
            load_adapter_state(self.model, saved.adapter)
        if saved.rng is not None:
            ckpt.set_rng_state(saved.rng)
        return saved

    # ------------------------------------------------------------------ the end

    def finish(self, step: int) -> dict[str, Any]:
        summary = self.summary(step)
        if self.dist.main:
            self.plot_curriculum()
            summary["version"] = self.register(summary["final_validation"])
            self.emit("finished", step, None, metrics=summary["final_validation"])
            self.flush()
        return summary

    def register(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """Store the adapter under models/<name>/<run-id>/ and register a version."""
        name = self.config.register_as
        if name is None or self.engine is None:
            return None
        from safetensors.torch import save as save_safetensors

        key = f"models/{name}/{self.run_id}/adapter.safetensors"
        self.store.put(key, save_safetensors(adapter_state(self.model)))
        config = self.model.peft_config["default"].to_dict()
        self.store.put(
            f"models/{name}/{self.run_id}/adapter_config.json",
            json.dumps(config, default=sorted).encode(),
        )
        event = register_version(
            self.engine, name, self.config.model, key, self.run_id, metrics, self.config.lineage
        )
        steps = self.history.steps
        finish_run(self.engine, self.run_id, "finished", steps[-1].step if steps else 0)
        if self.settings.kafka_bootstrap:
            from exforge.core.kafka import produce

            asyncio.run(produce(self.settings, "models.versions", [(name, event)]))
        return event.model_dump(mode="json")

    def summary(self, step: int) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step": step,
            "losses": self.history.losses,
            "final_validation": self.history.last_validation(),
        }

    def plot_curriculum(self) -> Path | None:
        """Difficulty level and validation loss against step, as a PNG beside the run."""
        points = [v for v in self.history.validations if "unlocked_loss" in v.metrics]
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [v.step for v in points]
        fig, loss_axis = plt.subplots(figsize=(7, 3.5))
        loss_axis.plot(steps, [v.metrics["unlocked_loss"] for v in points], color="tab:blue")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("validation loss (unlocked)", color="tab:blue")
        level_axis = loss_axis.twinx()
        levels = [v.metrics["unlocked_level"] for v in points]
        level_axis.step(steps, levels, color="tab:red", where="post")
        level_axis.set_ylabel("difficulty unlocked", color="tab:red")
        fig.tight_layout()
        path = self.run_dir / "curriculum.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
