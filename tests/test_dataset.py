"""Shards, manifests, statistics, curriculum order and export of the corpus' samples,
on a real SQLite ledger and file store; exports read back with Hugging Face `datasets`."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine
from test_generators import corpus_files
from typer.testing import CliRunner

from exforge.cli import app
from exforge.core.db import engine_for
from exforge.core.store import FileStore, sha256_hex
from schemas.records import InstructionSample
from schemas.shards import curriculum, decode_shard, parquet_key, split_for
from streams.dataset import export, stats
from streams.generators import generate
from streams.generators.tokens import token_counter
from streams.instruct import record_drops
from streams.shard import seal, stage_sample

SHARD_SAMPLES = 40
SHARD_TOKENS = 12_000


@pytest.fixture(scope="module")
def samples() -> list[InstructionSample]:
    return [c.sample for f in corpus_files() for c in generate(f, f.content or "")]


@pytest.fixture(scope="module")
def tokens(samples: list[InstructionSample]) -> dict[str, int]:
    count = token_counter()
    return {s.sample_id: count(s.sharegpt()["conversations"]) for s in samples}


def staged(
    engine: Engine, samples: list[InstructionSample], tokens: dict[str, int], fraction: float
) -> list[bool]:
    return [stage_sample(engine, "ds", s, tokens[s.sample_id], fraction) for s in samples]


def sealed(engine: Engine, store: FileStore) -> int:
    return seal(engine, store, "ds", SHARD_SAMPLES, True, SHARD_TOKENS, parquet=True)


def shard_objects(store: FileStore) -> dict[str, str]:
    return {k: sha256_hex(store.get(k)) for k in store.list("shards/")}


@pytest.fixture
def ledger(
    tmp_path: Path, database_url: str, samples: list[InstructionSample], tokens: dict[str, int]
) -> tuple[Engine, FileStore]:
    engine = engine_for(database_url)
    store = FileStore(tmp_path / "store")
    assert all(staged(engine, samples, tokens, 0.1))
    assert sealed(engine, store) > 0
    return engine, store


def test_manifests_match_shard_contents(
    ledger: tuple[Engine, FileStore], samples: list[InstructionSample], tokens: dict[str, int]
) -> None:
    _, store = ledger
    seen: list[str] = []
    manifests = [k for k in store.list("shards/") if k.endswith("manifest.json")]
    assert {k.split("/")[2] for k in manifests} == {"stage1", "stage2"}
    for key in manifests:
        manifest = json.loads(store.get(key))
        assert manifest["samples"] == sum(e["samples"] for e in manifest["shards"])
        for entry in manifest["shards"]:
            data = store.get(entry["key"])
            rows = decode_shard(data)
            assert entry["sha256"] == sha256_hex(data)
            assert entry["samples"] == len(rows) <= SHARD_SAMPLES
            counts = [tokens[r["id"]] for r in rows]
            assert entry["tokens"] == sum(counts)
            # closed at N samples or T tokens: only the last sample may cross T
            assert sum(counts[:-1]) < SHARD_TOKENS
            assert entry["difficulty"] == dict(Counter(str(r["meta"]["difficulty"]) for r in rows))
            assert entry["kinds"] == dict(Counter(r["meta"]["kind"] for r in rows))
            levels = [r["meta"]["difficulty"] for r in rows]
            assert levels == sorted(levels), "easy to hard inside a shard"
            copy = pq.read_table(io.BytesIO(store.get(parquet_key(entry["key"]))))
            assert copy.column("id").to_pylist() == [r["id"] for r in rows]
            for row in rows:
                assert split_for(row["id"], 0.1) == manifest["split"]
            seen += [r["id"] for r in rows]
    assert sorted(seen) == sorted(s.sample_id for s in samples), "each sample exactly once"
    assert any(
        json.loads(store.get(k))["shards"][0]["tokens"] >= SHARD_TOKENS for k in manifests
    ), "some shard closed on tokens"


def test_reprocessing_the_same_samples_changes_no_shard(
    ledger: tuple[Engine, FileStore], samples: list[InstructionSample], tokens: dict[str, int]
) -> None:
    engine, store = ledger
    before = shard_objects(store)
    assert not any(staged(engine, samples, tokens, 0.1))
    assert sealed(engine, store) == 0
    assert shard_objects(store) == before


def test_stats_by_kind_stage_difficulty_license_source_and_drops(
    ledger: tuple[Engine, FileStore], samples: list[InstructionSample], tokens: dict[str, int]
) -> None:
    engine, _ = ledger
    record_drops(engine, [(samples[0], "parse_failed"), (samples[1], "too_many_tokens")])
    # redelivered, twice in one batch: counted once, with the last reason given
    record_drops(engine, [(samples[0], "tests_failed"), (samples[0], "compile_failed")])
    data = stats(engine)["samples"]
    assert data["total"] == len(samples)
    assert data["by_kind"] == dict(sorted(Counter(s.meta.kind for s in samples).items()))
    assert data["by_difficulty"] == {
        str(d): n for d, n in sorted(Counter(s.meta.difficulty for s in samples).items())
    }
    assert data["by_license"] == {"MIT": len(samples)}
    assert data["by_source"] == {"dir:corpus@1": len(samples)}
    assert stats(engine)["tokens"]["samples"] == sum(tokens.values())
    assert data["dropped_by_reason"] == {"compile_failed": 1, "too_many_tokens": 1}
    assert stats(engine)["tokens"]["in_shards"] == sum(tokens.values())


def test_curriculum_is_stage_then_easy_to_hard_then_position_then_id() -> None:
    def row(i: int, level: int, stage: int = 2, position: int | None = None) -> dict:
        meta = {"kind": "k", "stage": stage, "difficulty": level}
        return {"id": f"{i:04d}", "meta": meta | ({"position": position} if position else {})}

    rows = [row(i, 1 + i % 3) for i in range(9)] + [row(999, 1, stage=1)]
    rows += [row(50, 2, position=2), row(60, 2, position=1)]
    ordered = curriculum(reversed(rows))
    assert ordered[0]["id"] == "0999", "stage 1 first"
    levels = [r["meta"]["difficulty"] for r in ordered[1:]]
    assert levels == sorted(levels)
    second = [r["id"] for r in ordered if r["meta"]["stage"] == 2 and r["meta"]["difficulty"] == 2]
    assert second == ["0001", "0004", "0007", "0060", "0050"], "unset position first, then by it"


def test_export_loads_with_datasets(
    ledger: tuple[Engine, FileStore], samples: list[InstructionSample], tmp_path: Path
) -> None:
    engine, _ = ledger
    for fmt, builder in (("sharegpt", "json"), ("parquet", "parquet")):
        out = tmp_path / fmt
        written = export(engine, "ds", out, fmt)  # type: ignore[arg-type]
        assert sum(written.values()) == len(samples)
        files = {name.split(".")[0]: str(out / name) for name in written}
        loaded = datasets.load_dataset(builder, data_files=files, cache_dir=str(tmp_path / "hf"))
        assert {split: loaded[split].num_rows for split in loaded} == {
            name.split(".")[0]: n for name, n in written.items()
        }
        first = loaded["train"][0]
        assert [t["from"] for t in first["conversations"]][-1] == "gpt"
        meta = first["meta"] if fmt == "sharegpt" else json.loads(first["meta"])
        assert meta["stage"] == 1 and meta["difficulty"] >= 1


def test_cli_stats_sample_and_export(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    samples: list[InstructionSample],
    tokens: dict[str, int],
) -> None:
    monkeypatch.setenv("EXFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EXFORGE_DATABASE_URL", database_url)
    monkeypatch.setenv("EXFORGE_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("EXFORGE_DATASET", "ds")
    engine = engine_for(database_url)
    staged(engine, samples, tokens, 0.02)
    runner = CliRunner()
    result = runner.invoke(app, ["dataset", "stats", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"]["total"] == len(samples)
    result = runner.invoke(app, ["dataset", "stats"])
    assert result.exit_code == 0 and "difficulty" in result.output, result.output
    result = runner.invoke(app, ["dataset", "sample", "--kind", "refactor_pipes", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("refactor_pipes · stage 2") == 2
    out = tmp_path / "export"
    result = runner.invoke(app, ["dataset", "export", "--format", "parquet", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert sum(json.loads(result.output)["files"].values()) == len(samples)
