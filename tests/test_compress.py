"""Compression on the tiny model: pruning removes what it measures as least useful, fusion
changes nothing but the matmuls, lineage lands in the registry, and the report has a row
for every variant; through `exforge compress run|report` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import MistralForCausalLM

from exforge.core.db import open_database
from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from exforge.llm.fusion import FusedAttention, FusedMLP, fuse_projections
from exforge.llm.model import load_model, preset_config
from exforge.llm.prune import (
    channel_importance,
    drop_layers,
    keep_channels,
    layer_distances,
    least_distant,
)
from exforge.llm.share import embeddings_tied, tie_embeddings
from tests.support.eval import register_tiny_version
from tests.support.shards import synthetic_samples, write_split
from workers.evaluator.compression import Row, lineage, pareto, served_size

EXFORGE = str(Path(sys.executable).parent / "exforge")


def small_model(layers: int = 4) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = preset_config("tiny", num_hidden_layers=layers, vocab_size=512)
    return MistralForCausalLM(config).eval()


def batches(count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(512, (2, 24), generator=generator),
            "position_ids": torch.arange(24).expand(2, -1),
        }
        for _ in range(count)
    ]


def logits(model: MistralForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def test_depth_pruning_drops_the_layer_that_changes_nothing() -> None:
    model = small_model()
    idle = model.model.layers[2]  # no attention or MLP output: its output is its input
    torch.nn.init.zeros_(idle.self_attn.o_proj.weight)
    torch.nn.init.zeros_(idle.mlp.down_proj.weight)
    distances = layer_distances(model, batches())
    assert distances[2] < 1e-6 < min(d for i, d in enumerate(distances) if i != 2)
    assert least_distant(distances, 1) == [2]
    expected = logits(model, batches()[0])
    drop_layers(model, [2])
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(logits(model, batches()[0]), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the renumbered layers fill their own KV-cache slots
        generated = model.generate(batches()[0]["input_ids"][:1], max_new_tokens=3)
    assert generated.shape[1] == 27


def test_width_pruning_keeps_the_most_active_channels() -> None:
    model = small_model(2)
    silent = torch.arange(0, 128, 2)  # every even channel never activates
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[silent] = 0
    importance = channel_importance(model, batches())
    assert all(bool((scores[silent] == 0).all()) for scores in importance)
    expected = logits(model, batches()[0])
    keep_channels(model, importance, 64)
    assert model.config.intermediate_size == 64
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (64, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 64)
    torch.testing.assert_close(logits(model, batches()[0]), expected, rtol=1e-4, atol=1e-4)


def test_fused_model_equals_the_unfused_one_and_loads_fused(tmp_path: Path) -> None:
    model = small_model(2)
    expected = logits(model, batches()[0])
    model.config.fused_projections = True
    model.save_pretrained(tmp_path / "fused")
    fused = fuse_projections(model)
    assert all(isinstance(layer.self_attn, FusedAttention) for layer in fused.model.layers)
    assert all(isinstance(layer.mlp, FusedMLP) for layer in fused.model.layers)
    assert float((logits(fused, batches()[0]) - expected).abs().max()) < 1e-3
    loaded = load_model(str(tmp_path / "fused"), "none", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].self_attn, FusedAttention)
    assert float((logits(loaded, batches()[0]) - expected).abs().max()) < 1e-3
    stored = load_model(str(tmp_path / "fused"), "none", dtype=torch.float32, fuse=False)
    assert not isinstance(stored.model.layers[0].self_attn, FusedAttention)


def test_shared_embeddings_are_stored_once_and_load_and_generate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(preset_config("tiny")).eval()  # 131,072 x 64, twice
    model.save_pretrained(tmp_path / "untied")
    head = model.lm_head.weight.detach().clone()
    assert not embeddings_tied(model)
    tie_embeddings(model)
    assert model.model.embed_tokens.weight is model.lm_head.weight and embeddings_tied(model)
    assert torch.equal(model.model.embed_tokens.weight, head)  # the output head's values
    assert len(list(model.parameters())) == len(list(model.state_dict())) - 1
    ids = torch.tensor([[5, 900, 131_071, 17, 42]])
    expected = logits(model, {"input_ids": ids})
    model.save_pretrained(tmp_path / "shared")

    with safe_open(tmp_path / "shared" / "model.safetensors", "pt") as stored:
        names = set(stored.keys())
    assert len(names & {"model.embed_tokens.weight", "lm_head.weight"}) == 1
    untied, shared = (served_size(tmp_path / name) for name in ("untied", "shared"))
    embedding_bytes = head.numel() * head.element_size()
    assert embedding_bytes <= untied - shared < embedding_bytes + 1024  # + its header entry
    assert 0.49 < shared / untied < 0.51  # the tiny model is ~99 % embeddings

    loaded = load_model(str(tmp_path / "shared"), "none", dtype=torch.float32)
    assert loaded.config.tie_word_embeddings and embeddings_tied(loaded)
    torch.testing.assert_close(logits(loaded, {"input_ids": ids}), expected)
    with torch.no_grad():
        generated = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)
    quantised = load_model(str(tmp_path / "shared"), "nf4", dtype=torch.bfloat16)
    assert embeddings_tied(quantised)  # the QLoRA heal run trains on the tied base


def test_lineage_and_pareto_front() -> None:
    versions = [
        {"version": 1, "parent_version": None},
        {"version": 2, "parent_version": 1},
        {"version": 3, "parent_version": None},
        {"version": 4, "parent_version": 2},
    ]
    assert [v["version"] for v in lineage(versions, 1)] == [1, 2, 4]
    assert [v["version"] for v in lineage(versions, None)] == [1, 2, 3, 4]
    rows = [
        Row(1, None, "base", {}, 100, 10.0, 0.1, 0.5, 0.0),
        Row(2, 1, "prune", {}, 80, 12.0, 0.1, 0.4, 0.0),  # smaller and faster: front
        Row(3, 2, "fuse", {}, 80, 11.0, 0.1, 0.4, 0.0),  # beaten by v2 everywhere
        Row(4, 1, "share", {}, 120, 9.0, 0.1, 0.6, 0.0),  # best pass@1: front
    ]
    pareto(rows)
    assert [row.pareto for row in rows] == [True, True, False, True]


@pytest.mark.timeout(900)  # four trained or merged versions and their report, on 2 cores
def test_compress_run_and_report_through_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(EXFORGE_DATA_DIR=str(tmp_path / "data"), EXFORGE_CONFIG=str(tmp_path / "no.toml"))
    settings = load_settings(data_dir=tmp_path / "data")
    store = FileStore(settings.root / "store")
    for stage in (1, 2):
        write_split(store, "elixir", stage, "train", synthetic_samples(stage, 12), 6)
        write_split(store, "elixir", stage, "validation", synthetic_samples(stage, 4, 1), 4)
    engine = open_database(settings)
    register_tiny_version(settings, store, engine, "m")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXFORGE, *args], env=env, capture_output=True, text=True)

    bad = cli("compress", "run", "--model", "m:1", "--methods", "prune,squash")
    assert bad.returncode == 2 and "squash" in bad.stderr
    missing = cli("compress", "run", "--model", "m:7", "--methods", "prune")
    assert missing.returncode == 2 and "m:7" in missing.stderr
    steps = ["--heal-steps", "2", "--distill-steps", "2", "--seq-len", "128"]
    run = cli(
        "compress",
        "run",
        "--model",
        "m:1",
        "--methods",
        "fuse,share,prune,distill",
        *steps,
        "--json",
    )
    assert run.returncode == 0, run.stderr
    made = json.loads(run.stdout)
    assert [(v["version"], v["method"], v["parent_version"]) for v in made] == [
        (2, "prune", 1),
        (3, "distill", 2),
        (4, "share", 3),
        (5, "fuse", 4),
    ]
    assert made[0]["parameters"]["dropped_layers"] in ([0], [1])
    assert made[0]["parameters"]["mlp_channels"] == "96/128"
    assert made[1]["parameters"]["teacher_version"] == 1
    assert made[2]["parameters"] == {"tied": "embed_tokens=lm_head", "heal_steps": 2}
    assert made[3]["adapter_key"] is None
    assert made[3]["parameters"]["max_abs_logit_difference"] < 1e-3
    shown = json.loads(cli("models", "show", "m", "3", "--json").stdout)
    assert (shown["method"], shown["parent_version"]) == ("distill", 2)
    shown = json.loads(cli("models", "show", "m", "4", "--json").stdout)
    assert (shown["method"], shown["parent_version"]) == ("share", 3)

    out = tmp_path / "report"
    args = ["--model", "m", "--json", "--out", str(out), "--limit", "2", "--rounds", "1"]
    done = cli("compress", "report", *args, "--prompts", "1", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    rows = {row["version"]: row for row in json.loads(done.stdout)["rows"]}
    methods = ["base", "prune", "distill", "share", "fuse"]
    assert [rows[v]["method"] for v in (1, 2, 3, 4, 5)] == methods
    assert all(rows[v]["size_bytes"] < rows[1]["size_bytes"] for v in (2, 3, 4, 5))
    # one embedding matrix fewer (131,072 x 64 in bf16); the fused version keeps the tie
    matrix = 131_072 * 64 * 2
    assert matrix <= rows[3]["size_bytes"] - rows[4]["size_bytes"] < matrix + 1024
    assert rows[5]["size_bytes"] == rows[4]["size_bytes"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and 0 <= row["pass_at_1"] <= 1
    # nothing is smaller than the tied versions: one of them is on the front
    assert rows[4]["pareto"] or rows[5]["pareto"]
    assert (out / "compression.png").stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["rows"] == list(rows.values())
