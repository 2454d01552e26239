"""`exforge compress run`: smaller versions of a registered model, each registered with
its lineage (parent version, method, parameters).

The methods run in a fixed order, each on the newest version of the chain, so
`prune,distill,fuse` gives three versions, each smaller than the one it started from:

- prune: the parent merged, then its least useful decoder layers dropped and its MLPs
  narrowed (`exforge.llm.prune`, measured on validation batches), stored as a new base,
  healed by a short QLoRA run of the recipe;
- distill: the chain's current model (a pruned student; pruned here when no prune ran) is
  trained by the recipe against the parent as teacher (softened logits, KL + CE);
- share: input and output embeddings tied (one matrix), healed like prune;
- fuse: the current version merged (no adapter any more) and marked fused, so loaders run
  Q/K/V and gate/up as single matmuls; registered only if the fused model's logits equal
  the unfused ones within `FUSE_TOLERANCE`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import Engine
from transformers import MistralForCausalLM

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore
from exforge.llm.chat import encode, load_tokenizer
from exforge.llm.fusion import fuse_projections
from exforge.llm.lora import LoraSettings, merged_version_dir
from exforge.llm.model import load_model, save_to_store
from exforge.llm.prune import (
    channel_importance,
    drop_layers,
    keep_channels,
    layer_distances,
    least_distant,
)
from exforge.llm.registry import Lineage, get_version, register_version
from exforge.llm.share import tie_embeddings
from workers.trainer.compress_options import CompressError, CompressOptions
from workers.trainer.data import load_split, stages_with_data
from workers.trainer.packing import collate, pack
from workers.trainer.recipe import DistillConfig, Recipe, StageConfig, TrainConfig

FUSE_TOLERANCE = 1e-3

Batch = dict[str, torch.Tensor]
Say = Callable[[str], None]


@dataclass
class Compressor:
    settings: Settings
    store: ObjectStore
    engine: Engine
    options: CompressOptions
    say: Say = lambda _: None

    @property
    def models(self) -> Path:
        return self.settings.root / "models"

    def version(self, name: str, version: int) -> dict[str, Any]:
        row = get_version(self.engine, name, version)
        if row is None:
            raise CompressError(f"the registry has no {name}:{version}")
        return row

    def merged(self, row: dict[str, Any]) -> MistralForCausalLM:
        """The version as one plain fp32 model (adapter folded in, stored layout)."""
        directory = merged_version_dir(self.settings, self.store, row)
        return load_model(str(directory), "none", dtype=torch.float32, fuse=False)

    def stages(self) -> list[int]:
        stages = stages_with_data(self.store, self.settings.dataset)
        if not stages:
            raise CompressError(f"no training shards of dataset {self.settings.dataset!r}")
        return stages

    def calibration(self) -> list[Batch]:
        """Packed batches of the validation splits (the training splits when there are
        none), the data pruning decisions are measured on."""
        tokenizer = load_tokenizer()
        samples = []
        for split in ("validation", "train"):
            for stage in self.stages():
                samples += load_split(self.store, self.settings.dataset, stage, split)
            if samples:
                break
        packs = pack((encode(tokenizer, s["conversations"]) for s in samples), self.options.seq_len)
        size = self.options.batch_size
        starts = range(0, len(packs), size)
        batches = [collate(packs[start : start + size]) for start in starts]
        return batches[: self.options.calibration_batches]

    # ---------------------------------------------------------------- the methods

    def prune_model(self, row: dict[str, Any]) -> tuple[MistralForCausalLM, dict[str, Any]]:
        model, batches = self.merged(row), self.calibration()
        layers = model.config.num_hidden_layers
        count = self.options.drop_layers or max(1, layers // 4)
        if count >= layers:
            raise CompressError(f"{row['name']}:{row['version']} has {layers} layer(s)")
        distances = layer_distances(model, batches)
        dropped = least_distant(distances, count)
        drop_layers(model, dropped)
        width = model.config.intermediate_size
        keep = max(1, round(width * self.options.mlp_keep))
        if keep < width:
            keep_channels(model, channel_importance(model, batches), keep)
        parameters = {
            "layer_distances": [round(d, 6) for d in distances],
            "dropped_layers": dropped,
            "layers": model.config.num_hidden_layers,
            "mlp_channels": f"{keep}/{width}",
        }
        return model, parameters

    def train(
        self,
        row: dict[str, Any],
        model: MistralForCausalLM,
        lineage: Lineage,
        steps: int,
        distill: DistillConfig | None = None,
    ) -> dict[str, Any]:
        """Store `model` as a base and register a QLoRA run of the recipe on it."""
        run_id = f"{lineage.method}-{uuid.uuid4().hex[:8]}"
        spec = save_to_store(model, self.store, f"models/{row['name']}/{run_id}/base")
        options = self.options
        config = TrainConfig(
            run_id=run_id,
            model=spec,
            stages=[
                StageConfig(stage=s, steps=steps, learning_rate=options.learning_rate)
                for s in self.stages()
            ],
            seq_len=options.seq_len,
            batch_size=options.batch_size,
            validate_every=steps,
            fisher_samples=0,
            lora=LoraSettings(rank=options.lora_rank, alpha=2.0 * options.lora_rank),
            register_as=row["name"],
            lineage=lineage,
            distill=distill,
        )
        self.say(f"{lineage.method}: training {run_id} ({steps} steps per stage)")
        summary = Recipe(config, self.settings, self.store, self.engine).run()
        return self.version(row["name"], summary["version"]["version"])

    def prune(self, parent: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        model, parameters = self.prune_model(current)
        parameters["heal_steps"] = self.options.heal_steps
        lineage = child_of(current, "prune", parameters)
        return self.train(current, model, lineage, self.options.heal_steps)

    def distill(self, parent: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Train the chain's current model (pruned here if nothing smaller exists yet)
        against the parent's softened outputs."""
        if current["version"] == parent["version"]:
            student, _ = self.prune_model(parent)
        else:
            student = self.merged(current)
        teacher = merged_version_dir(self.settings, self.store, parent)
        options = self.options
        distill = DistillConfig(
            teacher=str(teacher), temperature=options.temperature, alpha=options.alpha
        )
        parameters = {
            "teacher_version": parent["version"],
            "temperature": options.temperature,
            "alpha": options.alpha,
            "steps": options.distill_steps,
            "layers": student.config.num_hidden_layers,
        }
        lineage = Lineage(
            parent_version=current["version"], method="distill", parameters=parameters
        )
        return self.train(current, student, lineage, options.distill_steps, distill)

    def share(self, parent: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """One matrix for the input and output embeddings (the output head's)."""
        model = tie_embeddings(self.merged(current))
        parameters = {"tied": "embed_tokens=lm_head", "heal_steps": self.options.heal_steps}
        lineage = child_of(current, "share", parameters)
        return self.train(current, model, lineage, self.options.heal_steps)

    def fuse(self, parent: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        model = self.merged(current)
        fused = fuse_projections(self.merged(current))
        difference = max_logit_difference(model, fused, self.calibration()[:1])
        if difference > FUSE_TOLERANCE:
            raise CompressError(
                f"fused model differs from the unfused one by {difference:.2e} (> {FUSE_TOLERANCE})"
            )
        model.config.fused_projections = True
        run_id = f"fuse-{uuid.uuid4().hex[:8]}"
        prefix = f"models/{current['name']}/{run_id}/weights"
        spec = save_to_store(model.to(torch.bfloat16), self.store, prefix)
        parameters = {
            "fused": ["q_proj+k_proj+v_proj", "gate_proj+up_proj"],
            "adapter_merged": bool(current["adapter_key"]),
            "max_abs_logit_difference": difference,
        }
        lineage = child_of(current, "fuse", parameters)
        event = register_version(
            self.engine, current["name"], spec, None, run_id, current["metrics"], lineage
        )
        return self.version(current["name"], event.version)

    def run(self, name: str, version: int, methods: Sequence[str]) -> list[dict[str, Any]]:
        """Apply `methods` in order along one chain; the versions registered."""
        parent = current = self.version(name, version)
        made = []
        for method in methods:
            self.say(f"{method}: from {name}:{current['version']}")
            current = getattr(self, method)(parent, current)
            made.append(current)
        return made


def child_of(current: dict[str, Any], method: str, parameters: dict[str, Any]) -> Lineage:
    return Lineage(parent_version=current["version"], method=method, parameters=parameters)


@torch.no_grad()
def max_logit_difference(
    reference: MistralForCausalLM, other: MistralForCausalLM, batches: Sequence[Batch]
) -> float:
    """Largest absolute difference of the two models' logits over the batches (fp32)."""
    worst = 0.0
    for model in (reference, other):
        model.eval()
    for batch in batches:
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "use_cache": False,
        }
        difference = (reference(**inputs).logits - other(**inputs).logits).abs().max()
        worst = max(worst, float(difference))
    return worst
