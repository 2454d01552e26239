"""FSDP through accelerate: the frozen base sharded over the ranks, the adapters replicated.

Each decoder layer is one FSDP unit whose (NF4) weights are split over the ranks and
gathered for its forward and backward only; that is where the memory goes. Every adapter
matrix is a unit of its own with `NO_SHARD`: a full copy on every rank, its gradient
all-reduced by FSDP like DDP's. They are well under 1% of the parameters, and replicated
they keep their names, shapes and optimizer state, so EWC, checkpoints (written by rank 0,
full adapter state) and resume work as without FSDP. `use_orig_params=True` keeps those
per-name parameters in place of FSDP's flattened ones.

QLoRA under FSDP needs the base loaded with `fsdp=True` (`model.load_model`,
`lora.apply_lora`): one dtype per unit, so the 4-bit weights are stored as the compute
dtype and the other frozen weights are not cast to fp32.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from peft import PeftModel
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer


def _unit(module: torch.nn.Module) -> bool | dict[str, ShardingStrategy]:
    """Which modules become FSDP units, and how each is sharded."""
    if isinstance(module, MistralDecoderLayer):
        return True
    weight = getattr(module, "weight", None)
    if next(module.children(), None) is None and weight is not None and weight.requires_grad:
        return {"sharding_strategy": ShardingStrategy.NO_SHARD}  # an adapter matrix
    return False


def shard(model: PeftModel) -> FullyShardedDataParallel:
    """Wrap the model for this process's rank (the process group must exist)."""
    cpu = not torch.cuda.is_available()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        reshard_after_forward=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=CustomPolicy(_unit),
        use_orig_params=True,
        # every rank loads the same weights (same files, same seed): nothing to broadcast
        sync_module_states=False,
        cpu_ram_efficient_loading=False,
    )
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=cpu)
    if cpu:
        # accelerate only shards on accelerators: CPU processes become MULTI_CPU (DDP)
        # and the plugin is dropped. torch's FSDP runs on gloo, so select it here; FSDP
        # also wants `device_id` to equal the parameters' device, "cpu" (not "cpu:0").
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.device = torch.device("cpu")
    wrapped = accelerator.prepare_model(model)
    if not isinstance(wrapped, FullyShardedDataParallel):
        raise RuntimeError(f"accelerate returned {type(wrapped).__name__}, not FSDP")
    return wrapped
