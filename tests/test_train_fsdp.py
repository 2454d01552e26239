"""Distributed: 2-process FSDP (through accelerate) on the CPU (gloo) equals one process
with the doubled batch, its checkpoint loads into the sharded model and a plain one, and
rank 0 builds the SSR buffer alone. One 2-process launch serves every test here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel

from exforge.core.settings import load_settings
from exforge.core.stack import free_port
from exforge.core.store import FileStore
from exforge.llm.lora import LoraSettings, adapter_state, apply_lora, load_adapter_state
from exforge.llm.model import load_model
from tests.support.shards import synthetic_samples, write_split
from workers.trainer import checkpoint as ckpt
from workers.trainer.data import load_split
from workers.trainer.recipe import Recipe, StageConfig, TrainConfig
from workers.trainer.ssr import buffer_key

# the module's runs (two ranks, then one process) are set up once, for both tests
pytestmark = pytest.mark.timeout(900)

SEQ_LEN = 48  # every sample fills more than half a sequence: one sample per pack
STEPS = 3
Result = dict[str, Any]


def compared(world: int) -> TrainConfig:
    """Stage 3 only, 4 samples a step: one process, or two ranks with 2 each."""
    return TrainConfig(
        run_id=f"fsdp{world}",
        distributed="fsdp",
        seq_len=SEQ_LEN,
        batch_size=4 // world,
        validate_every=STEPS,
        fisher_samples=4,  # covers each rank's slice: the same samples as one process
        register_as=None,
        loss_chunk_tokens=None,  # the head loss FSDP runs, in the one process too
        lora={"rank": 4, "gradient_checkpointing": True},  # recomputes inside FSDP units
        stages=[StageConfig(stage=3, steps=STEPS, learning_rate=1e-2)],
    )


def rehearsing() -> TrainConfig:
    """Stages 1 and 2 with SSR: stage 1's end builds a buffer for stage 2."""
    return TrainConfig(
        run_id="fsdp-ssr",
        distributed="fsdp",
        seq_len=SEQ_LEN,
        batch_size=1,
        validate_every=0,
        fisher_samples=0,
        register_as=None,
        lora={"rank": 4},
        stages=[StageConfig(stage=s, steps=1, learning_rate=1e-2) for s in (1, 2)],
        ssr={"enabled": True, "budget": 2, "candidates": 2, "max_new_tokens": 2},
    )


def worker(rank: int, world: int, root: Path, port: int) -> None:
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",  # else accelerate gives each CPU rank all physical cores
        )
    torch.set_num_threads(1)
    settings, store = load_settings(data_dir=root / "data"), FileStore(root / "data" / "store")
    trainer = Recipe(compared(world), settings, store)
    summary = trainer.run()
    result: Result = {
        "sharded": isinstance(trainer.module, FullyShardedDataParallel),
        # outside a forward each rank holds only its shard of the frozen base
        "base_numel": sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad),
        "adapter": adapter_state(trainer.model),
        "losses": summary["losses"],
        "grad_norms": [entry.grad_norm for entry in trainer.history.steps],
        "validation": summary["final_validation"]["val_loss_stage3"],
    }
    if world > 1:
        torch.distributed.barrier()  # save() lets the others on before rank 0 writes
        # what a resume does: load the checkpoint's adapter into the sharded model
        validation = load_split(store, "elixir", 3, "validation", rank, world)
        saved = ckpt.load(store, trainer.run_id, STEPS, rank)
        zeros = {name: torch.zeros_like(tensor) for name, tensor in saved.adapter.items()}
        load_adapter_state(trainer.model, zeros)
        result["zeroed_validation"] = trainer.validation_loss(validation)
        load_adapter_state(trainer.model, saved.adapter)
        result["reloaded_validation"] = trainer.validation_loss(validation)
        ssr = Recipe(rehearsing(), settings, store)
        result["ssr_summary"] = ssr.run()
        result["ssr_reports"] = [
            e.metrics for e in ssr.history.events if "ssr_candidates" in e.metrics
        ]
        torch.distributed.destroy_process_group()
    torch.save(result, root / f"world{world}-rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result, Result, Result]:
    """Both configs on two FSDP ranks, the compared one also in one process."""
    root = tmp_path_factory.mktemp("fsdp")
    store = FileStore(root / "data" / "store")
    samples = synthetic_samples(3, 4)
    write_split(store, "elixir", 3, "train", samples, 1)  # 4 shards: 2 per rank
    # one validation sample: rank 1 has none and pads its forwards to keep FSDP in step
    write_split(store, "elixir", 3, "validation", samples[:1], 1)
    for stage in (1, 2):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, 4), 1)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 2, 1), 1)
    mp.spawn(worker, args=(2, root, free_port()), nprocs=2, join=True)
    worker(0, 1, root, 0)
    rank0, rank1, single = (
        torch.load(root / name)
        for name in ("world2-rank0.pt", "world2-rank1.pt", "world1-rank0.pt")
    )
    return root, rank0, rank1, single


def test_two_fsdp_ranks_match_one_process_with_double_batch(
    runs: tuple[Path, Result, Result, Result],
) -> None:
    root, rank0, rank1, single = runs
    store = FileStore(root / "data" / "store")

    assert rank0["sharded"] and rank1["sharded"] and not single["sharded"]
    assert rank0["base_numel"] + rank1["base_numel"] == single["base_numel"]
    assert rank0["base_numel"] < single["base_numel"]

    assert rank0["losses"] == rank1["losses"]
    # the first step's loss is of the same weights on the same 4 samples; later ones come
    # after Adam steps on bf16 gradients that round differently at batch 2 and 4 (by more
    # on CPUs with bf16 matrix units: 1.7e-5 apart at step 3 with AMX)
    torch.testing.assert_close(rank0["losses"][0], single["losses"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rank0["losses"], single["losses"], rtol=1e-4, atol=0)
    # before clipping: a gradient summed instead of averaged over ranks shows here
    torch.testing.assert_close(rank0["grad_norms"], single["grad_norms"], rtol=1e-2, atol=0)
    assert rank0["validation"] == rank1["validation"]
    torch.testing.assert_close(rank0["validation"], single["validation"], rtol=1e-4, atol=0)
    near = 0
    for name, tensor in rank0["adapter"].items():
        assert torch.equal(tensor, rank1["adapter"][name]), name
        # bf16 kernels round differently at batch 2 and 4, and Adam's g/sqrt(v) turns that
        # into up to a step (lr) on near-zero gradients (lora_A's first ones): a few
        # elements differ by up to 1e-2, nearly all agree to 1e-4.
        torch.testing.assert_close(tensor, single["adapter"][name], rtol=0, atol=1e-2)
        near += int(((tensor - single["adapter"][name]).abs() <= 1e-4).sum())
    assert near >= 0.99 * sum(t.numel() for t in rank0["adapter"].values())

    # The checkpoint holds the whole adapter and the Fisher of all ranks' samples ...
    two, one = (ckpt.load(store, f"fsdp{world}", STEPS, 0) for world in (2, 1))
    assert two.adapter.keys() == single["adapter"].keys()
    for name, tensor in two.adapter.items():
        assert torch.equal(tensor, rank0["adapter"][name]), name
    two_ewc, one_ewc = two.ewc.tensors(), one.ewc.tensors()
    assert two_ewc.keys() == one_ewc.keys()
    for name, tensor in two_ewc.items():
        # squared gradients at those slightly different adapters: 0.5-2% apart; averaging
        # gradients over ranks before squaring, or not over ranks after, is tens of percent
        assert (tensor - one_ewc[name]).norm() <= 0.05 * one_ewc[name].norm(), name
    # ... loads back into the sharded model, whose forwards then use it ...
    assert rank0["reloaded_validation"] == rank0["validation"]
    assert rank0["zeroed_validation"] != rank0["validation"]
    # ... and into a plain one-process model (a resume at another world size).
    models = root / "data" / "models"
    plain = apply_lora(load_model("tiny", "nf4", models, fsdp=True), LoraSettings(rank=4), True)
    load_adapter_state(plain, two.adapter)
    for name, tensor in adapter_state(plain).items():
        assert torch.equal(tensor, rank0["adapter"][name]), name


def test_fsdp_rank0_rehearses_alone_on_an_unsharded_copy(
    runs: tuple[Path, Result, Result, Result],
) -> None:
    """SSR generates on rank 0 only, which an FSDP forward (all ranks) cannot do."""
    root, rank0, rank1, _ = runs
    assert rank0["ssr_summary"]["step"] == rank1["ssr_summary"]["step"] == 2
    assert rank0["ssr_summary"]["losses"] == rank1["ssr_summary"]["losses"]
    assert [report["ssr_candidates"] for report in rank0["ssr_reports"]] == [2]
    assert rank1["ssr_reports"] == []  # events come from rank 0 only
    assert FileStore(root / "data" / "store").exists(buffer_key("fsdp-ssr", 1))
