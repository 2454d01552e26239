"""Stage logic without a broker: sources, ingest, parse, instruct, shard, stats, DLQ."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP as TopicPartition
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core.db import FileOutcome, Package, engine_for
from exforge.core.dlq import DeadLetterEntry, select_letters
from exforge.core.settings import load_settings
from exforge.core.store import FileStore, ObjectStore, sha256_hex
from exforge.elixir.neardup import Held, bucket_partition
from schemas.catalogue import topic_name
from schemas.records import (
    DeadLetter,
    InstructionSample,
    ParsedFile,
    RawPackage,
    SourceRequest,
    TrainingShard,
)
from schemas.shards import decode_shard, encode_shard, shard_key, split_for
from streams import dedup, tables
from streams.dataset import stats
from streams.ingest import ChecksumMismatch, parse_request, raw_package, verify_archive
from streams.instruct import doc_to_code_samples, file_text
from streams.parse import (
    CorruptArchive,
    decode_source,
    elixir_members,
    parsed_file,
)
from streams.shard import (
    OLDEST_PENDING,
    histogram,
    mark_published,
    oldest_pending,
    pending_samples,
    seal,
    stage_sample,
    unpublished,
)
from streams.sources.local import (
    NotAProject,
    pack_directory,
    read_mix_project,
    upload_directory,
)
from streams.stage import BadMessage, Failure, Output
from tests.support.records import make_sample, train_samples

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "corpus"
UNSEEN = REPO / "tests" / "fixtures" / "unseen_project"

SMALL_MODULE = """defmodule Greeter do
  @moduledoc "Greets."

  @doc "Says hello to `name`."
  def hello(name), do: "Hello, #{name}"
end
"""


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture
def engine(database_url: str) -> Engine:
    return engine_for(database_url)


def package(source_id: str = "dir:greeter@1.0.0", license: str | None = "MIT") -> RawPackage:
    return RawPackage(
        source_id=source_id,
        kind="dir",
        name=source_id.split(":")[1].split("@")[0],
        version=source_id.split("@")[1],
        license=license,
        archive_key=f"raw/dir/x/1/{'0' * 64}.tar",
        sha256="0" * 64,
        size_bytes=0,
    )


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


# --- streams.sources.local -------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of a corpus project with build output, dependencies and git state added."""
    root = tmp_path / "kv_cache"
    shutil.copytree(CORPUS / "kv_cache", root)
    for junk in ("_build/dev/lib/kv_cache/ebin/x.beam", "deps/dep/mix.exs", ".git/HEAD"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk\n")
    (root / "lib" / "deps").mkdir()  # an excluded name deeper down is excluded too
    (root / "lib" / "deps" / "hidden.ex").write_text("defmodule Hidden do\nend\n")
    return root


def test_pack_directory_is_deterministic(project: Path, tmp_path: Path) -> None:
    first = pack_directory(project)
    assert pack_directory(project) == first
    for path in project.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert pack_directory(project) == first, "mtimes leak into the archive"
    elsewhere = tmp_path / "moved" / "other_name"
    shutil.copytree(project, elsewhere)
    assert pack_directory(elsewhere) == first, "the project's location leaks into the archive"
    (project / "lib" / "kv_cache.ex").write_text("changed\n")
    assert pack_directory(project) != first


def test_pack_directory_excludes_build_deps_and_git(project: Path) -> None:
    names = tar_names(pack_directory(project))
    assert "mix.exs" in names
    assert "lib/kv_cache.ex" in names
    assert "lib/kv_cache/server.ex" in names
    for name in names:
        parts = name.split("/")
        assert not {"_build", "deps", ".git"} & set(parts), name
    with tarfile.open(fileobj=io.BytesIO(pack_directory(project))) as tar:
        for member in tar:
            assert member.isreg()
            assert (member.mtime, member.mode, member.uname, member.uid) == (0, 0o644, "", 0)


@pytest.mark.parametrize(
    ("root", "name", "version", "licenses"),
    [
        (CORPUS / "kv_cache", "kv_cache", "0.3.1", ("MIT",)),  # version: @version
        (CORPUS / "pipe_router", "pipe_router", "0.1.4", ("Apache-2.0",)),
        (CORPUS / "text_tools", "text_tools", "1.2.0", ("MIT",)),  # version: @version
        (UNSEEN, "rate_limiter", "0.2.0", ("Apache-2.0",)),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_read_mix_project(root: Path, name: str, version: str, licenses: tuple[str, ...]) -> None:
    project = read_mix_project(root)
    assert (project.name, project.version, project.licenses) == (name, version, licenses)


def test_read_mix_project_needs_mix_exs(tmp_path: Path) -> None:
    with pytest.raises(NotAProject, match=r"mix\.exs"):
        read_mix_project(tmp_path)


def test_upload_directory_stores_content_addressed(file_store: FileStore) -> None:
    request = upload_directory(file_store, CORPUS / "text_tools")
    data = file_store.get(request.archive_key or "")
    assert request.sha256 == sha256_hex(data)
    assert request.archive_key == f"raw/dir/text_tools/1.2.0/{sha256_hex(data)}.tar"
    assert data == pack_directory(CORPUS / "text_tools")
    assert (request.source_id, request.kind, request.name, request.version) == (
        "dir:text_tools@1.2.0",
        "dir",
        "text_tools",
        "1.2.0",
    )
    assert request.license == "MIT"
    assert request.options["path"] == str((CORPUS / "text_tools").resolve())
    # the request is what an external producer could send: it survives the wire
    assert SourceRequest.from_bytes(request.to_bytes()) == request
    # uploading again is idempotent
    assert upload_directory(file_store, CORPUS / "text_tools").archive_key == request.archive_key
    assert list(file_store.list("raw/")) == [request.archive_key]


def test_upload_directory_overrides_and_errors(file_store: FileStore, tmp_path: Path) -> None:
    request = upload_directory(file_store, UNSEEN, name="limiter", version="9.9.9", license="X")
    assert request.source_id == "dir:limiter@9.9.9"
    assert request.archive_key is not None
    assert request.archive_key.startswith("raw/dir/limiter/9.9.9/")
    assert request.license == "X"
    with pytest.raises(NotAProject, match="is not a directory"):
        upload_directory(file_store, tmp_path / "missing")
    with pytest.raises(NotAProject):
        upload_directory(file_store, tmp_path)  # a directory, but no mix.exs


# --- streams.ingest --------------------------------------------------------------------


def test_verify_archive() -> None:
    data = b"some archive bytes"
    digest = hashlib.sha256(data).hexdigest()
    assert verify_archive(data, digest) == digest
    assert verify_archive(data, None) == digest
    with pytest.raises(ChecksumMismatch, match=digest):
        verify_archive(data, "0" * 64)
    assert issubclass(ChecksumMismatch, BadMessage)


@pytest.mark.parametrize(
    "value",
    [b"garbage", b"", b"\xff\xfe", b"[]", b'{"kind": "dir"}', b"null"],
)
def test_parse_request_rejects_garbage(value: bytes) -> None:
    with pytest.raises((ValidationError, BadMessage)):
        parse_request(value)


def test_parse_request_and_raw_package(file_store: FileStore) -> None:
    request = upload_directory(file_store, CORPUS / "pipe_router")
    parsed = parse_request(request.to_bytes())
    assert parsed == request
    raw = raw_package(parsed, parsed.archive_key or "", parsed.sha256 or "", 10)
    assert (raw.source_id, raw.license, raw.size_bytes) == (request.source_id, "Apache-2.0", 10)
    assert raw.metadata == request.options


# --- streams.parse ---------------------------------------------------------------------


def build_tar(members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in members:
            data = payloads.get(info.name)
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_elixir_members_yields_only_regular_elixir_files() -> None:
    payloads = {
        "lib/a.ex": b"defmodule A do\nend\n",
        "README.md": b"# readme\n",
        "./test/b_test.exs": b"ExUnit.start()\n",
        "lib/notes.ex.txt": b"not elixir\n",
    }
    archive = build_tar(
        [
            member("lib", tarfile.DIRTYPE),
            member("lib/dir.ex", tarfile.DIRTYPE),
            member("lib/a.ex"),
            member("README.md"),
            member("./test/b_test.exs"),
            member("lib/notes.ex.txt"),
        ],
        payloads,
    )
    found = list(elixir_members(archive))
    assert [(f.path, f.data) for f in found] == [
        ("lib/a.ex", payloads["lib/a.ex"]),
        ("test/b_test.exs", payloads["./test/b_test.exs"]),
    ]


def test_elixir_members_reads_gzipped_archives() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("lib/z.ex")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"1\n\n"))
    assert [f.path for f in elixir_members(buffer.getvalue())] == ["lib/z.ex"]


def test_elixir_members_raises_corrupt_archive() -> None:
    archive = build_tar([member("lib/a.ex")], {"lib/a.ex": b"x" * 5000})
    for broken in (archive[:1500], archive[:300], b"", b"garbage" * 100):
        with pytest.raises(CorruptArchive):
            list(elixir_members(broken))
    assert issubclass(CorruptArchive, BadMessage)


def test_decode_source() -> None:
    assert decode_source("défaut".encode()) == "défaut"
    with pytest.raises(UnicodeDecodeError, match="not UTF-8 at byte 1"):
        decode_source("défaut".encode("latin-1"))


def test_parsed_file_inline_under_the_threshold(file_store: FileStore) -> None:
    file = parsed_file(package(), "lib/greeter.ex", SMALL_MODULE, file_store, 64 * 1024)
    assert file is not None
    encoded = SMALL_MODULE.encode()
    assert (file.content, file.content_ref) == (SMALL_MODULE, None)
    assert file.sha256 == sha256_hex(encoded)
    assert (file.size_bytes, file.lines) == (len(encoded), SMALL_MODULE.count("\n"))
    assert (file.source_id, file.path, file.license) == (
        "dir:greeter@1.0.0",
        "lib/greeter.ex",
        "MIT",
    )
    assert [m.name for m in file.modules] == ["Greeter"]
    assert [(f.name, f.arity, f.doc) for f in file.functions] == [
        ("hello", 1, "Says hello to `name`.")
    ]
    assert file_text(file, file_store) == SMALL_MODULE
    assert list(file_store.list()) == [], "inline content is not stored"
    exact = parsed_file(package(), "p.ex", SMALL_MODULE, file_store, len(encoded))
    assert exact is not None and exact.content is not None, "the threshold itself is inline"


def test_parsed_file_by_reference_over_the_threshold(file_store: FileStore) -> None:
    file = parsed_file(package(), "lib/greeter.ex", SMALL_MODULE, file_store, 16)
    assert file is not None
    assert file.content is None
    assert file.content_ref == f"blobs/{file.sha256}"
    assert file_store.get(file.content_ref) == SMALL_MODULE.encode()
    assert file_text(file, file_store) == SMALL_MODULE
    again = ParsedFile.from_bytes(file.to_bytes())
    assert file_text(again, file_store) == SMALL_MODULE


def test_parsed_file_hashes_normalised_content(file_store: FileStore) -> None:
    clean = parsed_file(package(), "a.ex", SMALL_MODULE, file_store, 1 << 20)
    messy_text = "\ufeff\n\n" + SMALL_MODULE.replace("\n", "   \r\n") + "\r\n\r\n"
    messy = parsed_file(package(), "b.ex", messy_text, file_store, 1 << 20)
    assert clean is not None and messy is not None
    assert messy.sha256 == clean.sha256
    assert messy.content == SMALL_MODULE
    other = parsed_file(package(), "c.ex", SMALL_MODULE.replace("Hello", "Hi"), file_store, 1 << 20)
    assert other is not None and other.sha256 != clean.sha256


def test_parsed_file_is_none_on_a_syntax_error(file_store: FileStore) -> None:
    assert (
        parsed_file(package(), "bad.ex", "defmodule Broken do\n  def (\n", file_store, 100) is None
    )


# --- streams.instruct ------------------------------------------------------------------


def unseen_files(store: ObjectStore) -> list[ParsedFile]:
    """Every parsed .ex/.exs file of the unseen project, packed and read as the stages do."""
    source = package("dir:rate_limiter@0.2.0", license="Apache-2.0")
    files = []
    for found in elixir_members(pack_directory(UNSEEN)):
        file = parsed_file(source, found.path, decode_source(found.data), store, 64 * 1024)
        assert file is not None, found.path
        files.append(file)
    return files


def test_doc_to_code_on_the_unseen_project(file_store: FileStore) -> None:
    expected = json.loads((UNSEEN / "EXPECTED.json").read_text())
    files = unseen_files(file_store)
    unique = {f.sha256: f for f in files}
    assert len(files) == expected["ex_files"]  # .ex and .exs
    assert len(unique) == expected["unique_files"]

    samples = [s for f in unique.values() for s in doc_to_code_samples(f)]
    assert len(samples) == expected["documented_public_functions"]
    by_path = {f.sha256: f for f in unique.values()}
    for sample in samples:
        assert [t.from_ for t in sample.conversations] == ["human", "gpt"]
        human, gpt = (t.value for t in sample.conversations)
        assert human.startswith("Implement `RateLimiter")
        assert gpt.startswith("```elixir\n") and gpt.endswith("\n```")
        assert sample.meta.kind == "doc_to_code"
        assert sample.meta.license == "Apache-2.0"
        (ref,) = sample.meta.source_refs
        assert ref.source_id == "dir:rate_limiter@0.2.0"
        assert ref.sha256 in by_path and by_path[ref.sha256].path == ref.path
        assert ref.start_line is not None and ref.end_line is not None
        assert 1 <= ref.start_line <= ref.end_line <= by_path[ref.sha256].lines
        assert sample.sample_id == InstructionSample.content_id(sample.conversations, "doc_to_code")
        assert InstructionSample.from_bytes(sample.to_bytes()) == sample

    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == len(ids)
    again = [s.sample_id for f in unseen_files(file_store) for s in doc_to_code_samples(f)]
    assert set(again) == set(ids), "sample ids are stable across runs"


def test_doc_to_code_skips_private_and_undocumented(file_store: FileStore) -> None:
    text = """defmodule M do
  @doc "Public."
  def a, do: 1

  def b, do: 2

  @doc "   "
  def c, do: 3

  @doc false
  def d, do: 4

  defp e, do: 5
end
"""
    file = parsed_file(package(), "lib/m.ex", text, file_store, 1 << 20)
    assert file is not None
    samples = doc_to_code_samples(file)
    assert [s.conversations[0].value.splitlines()[0] for s in samples] == [
        "Implement `M.a/0` in Elixir."
    ]


# --- streams.shard ---------------------------------------------------------------------


def test_split_for_is_stable_and_about_two_percent() -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
    splits = [split_for(i) for i in ids]
    assert splits == [split_for(i) for i in ids]
    assert set(splits) == {"train", "validation"}
    fraction = splits.count("validation") / len(ids)
    assert 0.01 <= fraction <= 0.03, fraction
    assert all(split_for(i, 0.0) == "train" for i in ids[:200])
    assert all(split_for(i, 1.0) == "validation" for i in ids[:200])


def test_encode_decode_shard_round_trip_and_determinism() -> None:
    rows = [{"id": str(i), "text": "héllo\nworld", "n": i} for i in range(50)]
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
    data = encode_shard(lines)
    assert data == encode_shard(list(lines))
    assert decode_shard(data) == rows
    assert encode_shard(lines[:-1]) != data
    assert decode_shard(encode_shard([])) == []


def shard_objects(store: ObjectStore) -> dict[str, str]:
    return {k: sha256_hex(store.get(k)) for k in store.list("shards/")}


def test_stage_sample_refuses_repeats(engine: Engine) -> None:
    sample = make_sample(1)
    assert stage_sample(engine, "ds", sample) is True
    assert stage_sample(engine, "ds", sample) is False
    assert stage_sample(engine, "ds", make_sample(1)) is False, "same content, same id"
    assert pending_samples(engine) == 1


def test_the_oldest_pending_sample_is_read_from_an_index_alone(
    engine: Engine, file_store: FileStore
) -> None:
    """Each worker process asks every second when the oldest pending sample was staged;
    the plan reads the index only, never the rows (with their payloads) of the pending
    samples, which are all the samples of a run until it drains."""
    assert oldest_pending(engine) is None
    staged = []
    for sample in train_samples(3):
        stage_sample(engine, "ds", sample)
        staged.append(datetime.now(UTC))
    oldest = oldest_pending(engine)
    assert oldest is not None and oldest <= staged[0]
    with engine.connect() as connection:
        query = str(OLDEST_PENDING.compile(dialect=engine.dialect))
        if engine.dialect.name == "sqlite":
            plan = " ".join(
                str(row[-1]) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}")
            )
            assert "COVERING INDEX ix_samples_pending" in plan, plan
        else:  # at this size PostgreSQL would scan the table; asked for an index:
            connection.exec_driver_sql("SET enable_seqscan = off")
            connection.exec_driver_sql("SET enable_bitmapscan = off")
            plan = " ".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {query}"))
            assert "Index Only Scan using ix_samples_pending" in plan, plan
    seal(engine, file_store, "ds", 4, flush=True)
    assert oldest_pending(engine) is None


def test_seal_full_then_flush(engine: Engine, file_store: FileStore) -> None:
    samples = train_samples(10)
    assert all(stage_sample(engine, "ds", s) for s in samples)
    assert pending_samples(engine) == 10

    assert seal(engine, file_store, "ds", 4, flush=False) == 2
    assert pending_samples(engine) == 2
    assert seal(engine, file_store, "ds", 4, flush=False) == 0, "2 pending is no full shard"
    assert seal(engine, file_store, "ds", 4, flush=True) == 1
    assert pending_samples(engine) == 0
    assert seal(engine, file_store, "ds", 4, flush=True) == 0

    keys = [shard_key("ds", 1, "train", i) for i in range(3)]
    assert sorted(k for k in file_store.list("shards/") if k.endswith(".zst")) == keys
    assert keys[0] == "shards/ds/stage1/train/00000.jsonl.zst"
    contents = [[row["id"] for row in decode_shard(file_store.get(k))] for k in keys]
    assert [len(c) for c in contents] == [4, 4, 2]
    flat = [i for c in contents for i in c]
    assert len(set(flat)) == len(flat), "shards overlap"
    assert set(flat) == {s.sample_id for s in samples}
    assert flat == sorted(flat), "shards are filled in sample-id order"
    by_id = {s.sample_id: s for s in samples}
    first = decode_shard(file_store.get(keys[0]))[0]
    assert first == json.loads(json.dumps(by_id[first["id"]].sharegpt()))

    # redelivery after sealing: nothing is staged again, no shard changes
    before = shard_objects(file_store)
    assert not any(stage_sample(engine, "ds", s) for s in samples)
    assert seal(engine, file_store, "ds", 4, flush=True) == 0
    assert shard_objects(file_store) == before


def test_seal_keeps_stages_and_splits_apart(engine: Engine, file_store: FileStore) -> None:
    samples = [make_sample(i, stage=1 + i % 2) for i in range(12)]
    for sample in samples:
        stage_sample(engine, "ds", sample)
    seal(engine, file_store, "ds", 3, flush=True)
    assert pending_samples(engine) == 0
    seen: set[str] = set()
    for key in (k for k in file_store.list("shards/") if k.endswith(".zst")):
        rows = decode_shard(file_store.get(key))
        _, _, stage_part, split, _ = key.split("/")
        for row in rows:
            assert f"stage{row['meta']['stage']}" == stage_part
            assert split_for(row["id"]) == split
            seen.add(row["id"])
    assert seen == {s.sample_id for s in samples}


def test_manifest_and_publication(engine: Engine, file_store: FileStore) -> None:
    samples = train_samples(10, difficulties=3)
    for sample in samples:
        stage_sample(engine, "ds", sample)
    assert seal(engine, file_store, "ds", 4, flush=True) == 3

    manifest_key = "shards/ds/stage1/train/manifest.json"
    manifest = json.loads(file_store.get(manifest_key))
    assert (manifest["dataset"], manifest["stage"], manifest["split"]) == ("ds", 1, "train")
    assert manifest["samples"] == 10
    assert [e["index"] for e in manifest["shards"]] == [0, 1, 2]
    for entry in manifest["shards"]:
        data = file_store.get(entry["key"])
        assert entry["sha256"] == sha256_hex(data)
        rows = decode_shard(data)
        assert entry["samples"] == len(rows)
        # each shard's histograms are of its own samples
        assert entry["difficulty"] == histogram([r["meta"]["difficulty"] for r in rows])
        assert entry["kinds"] == {"test": len(rows)}
    assert manifest["difficulty"] == histogram([s.meta.difficulty for s in samples])

    events = unpublished(engine)
    assert [e.index for _, e in events] == [0, 1, 2]
    for (_, event), entry in zip(events, manifest["shards"], strict=True):
        assert isinstance(event, TrainingShard)
        assert (event.key, event.sha256, event.samples) == (
            entry["key"],
            entry["sha256"],
            entry["samples"],
        )
        assert event.manifest_key == manifest_key
        assert (event.dataset, event.stage, event.split) == ("ds", 1, "train")

    mark_published(engine, events[0][0])
    assert [e.index for _, e in unpublished(engine)] == [1, 2]
    mark_published(engine, events[0][0])  # idempotent
    for shard_id, _ in events[1:]:
        mark_published(engine, shard_id)
    assert unpublished(engine) == []


# --- streams.dataset -------------------------------------------------------------------


def test_dataset_stats(engine: Engine, file_store: FileStore) -> None:
    empty = stats(engine)
    assert empty["packages"] == 0 and empty["files"]["seen"] == 0 and empty["shards"]["total"] == 0

    with Session(engine) as session, session.begin():
        session.add(
            Package(
                source_id="dir:a@1",
                kind="dir",
                name="a",
                version="1",
                license="MIT",
                archive_key="raw/dir/a/1/x.tar",
                sha256="0" * 64,
                size_bytes=3,
            )
        )
        session.add_all(
            [
                FileOutcome(
                    source_id="dir:a@1",
                    path="lib/a.ex",
                    sha256="1" * 64,
                    kept=True,
                    redactions={"email": 2, "key": 1},
                ),
                FileOutcome(
                    source_id="dir:a@1", path="lib/b.ex", sha256="2" * 64, kept=True, redactions={}
                ),
                FileOutcome(source_id="dir:a@1", path="lib/c.ex", kept=False, reason="not_utf8"),
                FileOutcome(
                    source_id="dir:a@1", path="lib/d.ex", kept=False, reason="syntax_error"
                ),
                FileOutcome(
                    source_id="dir:a@1",
                    path="lib/e.ex",
                    sha256="1" * 64,
                    kept=False,
                    reason="exact_duplicate",
                    redactions={"email": 5},  # dropped: not in the kept data's counts
                ),
                FileOutcome(source_id="dir:a@1", path="lib/f.ex", kept=False, reason="not_utf8"),
            ]
        )
    for sample in train_samples(5):
        stage_sample(engine, "ds", sample)
    stage_sample(engine, "ds", make_sample(10_000, stage=2, kind="other"))
    seal(engine, file_store, "ds", 4, flush=False)

    data = stats(engine)
    assert data["packages"] == 1
    assert data["files"] == {
        "seen": 6,
        "kept": 2,
        "dropped": 4,
        "dropped_by_reason": {"exact_duplicate": 1, "not_utf8": 2, "syntax_error": 1},
        "redacted": 1,
        "redactions_by_kind": {"email": 2, "key": 1},
    }
    assert data["samples"]["total"] == 6
    assert data["samples"]["by_kind"] == {"other": 1, "test": 5}
    assert data["samples"]["by_stage"] == {"1": 5, "2": 1}
    assert sum(data["samples"]["by_split"].values()) == 6
    assert data["samples"]["pending"] == 2
    assert data["shards"] == {"total": 1, "samples": 4, "unpublished": 1}


def test_file_outcomes_are_recorded_once_a_position_the_last_standing(engine: Engine) -> None:
    """A redelivered file is recorded again at its position (source, path): one row, as
    the last delivery says, its first time kept."""
    first = dedup.Outcome("dir:a@1", "lib/a.ex", "1" * 64, None, {"email": 1})
    dropped = dedup.Outcome("dir:a@1", "lib/b.ex", None, "not_utf8")
    dedup.record_outcomes(engine, [first, dropped])
    with Session(engine) as session:
        recorded_at = session.get(FileOutcome, ("dir:a@1", "lib/a.ex")).recorded_at  # type: ignore[union-attr]
    again = dedup.Outcome("dir:a@1", "lib/a.ex", "1" * 64, "near_duplicate")
    dedup.record_outcomes(engine, [again, dropped])
    with Session(engine) as session:
        rows = {row.path: row for row in session.query(FileOutcome)}
    assert set(rows) == {"lib/a.ex", "lib/b.ex"}
    a, b = rows["lib/a.ex"], rows["lib/b.ex"]
    assert (a.kept, a.reason, a.redactions, a.recorded_at) == (
        False,
        "near_duplicate",
        None,
        recorded_at,
    )
    assert (b.kept, b.reason, b.sha256, b.redactions) == (False, "not_utf8", None, None)


# --- exforge.core.dlq -----------------------------------------------------------------------


STAGE_TOPICS = {"ingest": "exforge.sources.requests", "parse": "exforge.raw.packages"}


def letter(
    stage: str, error_class: str, offset: int, partition: int = 0, **detail: str
) -> DeadLetter:
    return DeadLetter(
        stage=stage,
        topic=STAGE_TOPICS[stage],
        partition=partition,
        offset=offset,
        key=f"k{offset}",
        error_class=error_class,
        error_message="boom",
        payload_ref=f"dlq/{offset}",
        payload_sha256="0" * 64,
        detail=detail,
    )


@pytest.fixture
def entries() -> list[DeadLetterEntry]:
    return [
        DeadLetterEntry("0:0", letter("ingest", "ChecksumMismatch", 5)),
        DeadLetterEntry("0:1", letter("parse", "UnicodeDecodeError", 7, path="lib/a.ex")),
        # the same original message failed for a second part
        DeadLetterEntry("1:0", letter("parse", "UnicodeDecodeError", 7, path="lib/b.ex")),
        DeadLetterEntry("1:1", letter("parse", "CorruptArchive", 8)),
        # same offset, other partition: another message
        DeadLetterEntry("1:2", letter("parse", "CorruptArchive", 8, partition=1)),
    ]


def test_select_letters_collapses_one_original_message(entries: list[DeadLetterEntry]) -> None:
    chosen = select_letters(entries)
    assert [e.offset for e in chosen] == ["0:0", "0:1", "1:1", "1:2"]


def test_select_letters_filters(entries: list[DeadLetterEntry]) -> None:
    assert [e.offset for e in select_letters(entries, ids=["1:1", "0:0"])] == ["0:0", "1:1"]
    assert [e.offset for e in select_letters(entries, ids=["1:0"])] == ["1:0"]
    assert [e.offset for e in select_letters(entries, stage="ingest")] == ["0:0"]
    assert [e.offset for e in select_letters(entries, error_class="UnicodeDecodeError")] == ["0:1"]
    assert [
        e.offset for e in select_letters(entries, stage="parse", error_class="CorruptArchive")
    ] == ["1:1", "1:2"]
    assert select_letters(entries, stage="instruct") == []
    assert select_letters(entries, ids=["9:9"]) == []
    assert select_letters(entries, stage="ingest", error_class="CorruptArchive") == []


# --- streams.stage ---------------------------------------------------------------------


def test_failure_from_validation_error() -> None:
    with pytest.raises(ValidationError) as caught:
        SourceRequest.model_validate({"source_id": "dir:x@1", "kind": "dir", "sha256": "bad"})
    failure = Failure.from_exception(caught.value, path="x")
    assert failure.error_class == "ValidationError"
    assert failure.message.startswith("schema validation failed")
    assert f"({caught.value.error_count()} errors)" in failure.message
    assert failure.detail == {"path": "x"}


def test_failure_from_other_exceptions() -> None:
    assert Failure.from_exception(ChecksumMismatch("bad sum")).message == "bad sum"
    assert Failure.from_exception(ChecksumMismatch("bad sum")).error_class == "ChecksumMismatch"
    assert Failure.from_exception(RuntimeError()).message == "RuntimeError"
    assert len(Failure.from_exception(ValueError("x" * 5000)).message) == 2000


# --- worker liveness ------------------------------------------------------------------------


def test_stall_watch_reports_a_partition_only_after_its_offset_stood_still() -> None:
    from exforge.core.kafka import LagRow
    from streams.worker import StallWatch

    def row(partition: int, committed: int | None, end: int) -> LagRow:
        return LagRow("g", "t.parsed.files", partition, committed, end)

    watch = StallWatch(after_s=30)
    assert watch.stalled([row(0, 5, 9), row(1, None, 4), row(2, 3, 3)], now=0) == []
    assert watch.stalled([row(0, 6, 9), row(1, None, 4)], now=29) == []
    # partition 1 has not moved for 30 s; partition 0 moved at 29 s
    assert [r.partition for r in watch.stalled([row(0, 6, 9), row(1, None, 4)], now=30)] == [1]
    # after a report the clock restarts, so the seek gets time to work
    assert watch.stalled([row(0, 6, 9), row(1, None, 4)], now=31) == []
    assert [r.partition for r in watch.stalled([row(0, 6, 9), row(1, None, 4)], now=59)] == [0]
    # caught up: forgotten
    assert watch.stalled([row(0, 9, 9), row(1, 4, 4)], now=120) == []
    assert watch.since == {}


def test_a_stage_at_work_keeps_its_worker_from_being_quiet() -> None:
    """The hex-scale run's instruct batches outlasted `stall_seconds`: the worker, quiet
    by its stages' last touches, fetched the batch's partition again and instruct
    processed ~5 % of its files twice. Work in progress is not quiet."""
    import time

    from streams.stage import Activity

    activity = Activity()
    start = time.monotonic()
    assert activity.quiet_for(start + 5, since=start) == 5  # nothing ran yet
    with activity.during("instruct"):
        later = time.monotonic() + 100
        assert activity.quiet_for(later, since=start) == 0
        with activity.during("shard"):
            pass
        assert activity.quiet_for(later, since=start) == 0  # instruct still works
    ended = activity.last["instruct"]
    assert activity.quiet_for(ended + 100, since=start) == 100


def test_stage_progress_sums_partitions_and_rates_the_group_over_the_window() -> None:
    from exforge.core.kafka import LagRow, eta_text, stage_progress
    from exforge.core.settings import Settings

    settings = Settings(topic_prefix="t.")
    group = settings.worker_group

    def rows(committed: tuple[int, int], other_group: int) -> list[LagRow]:
        return [
            LagRow(group, "t.parsed.files", 0, committed[0], 100),
            LagRow(group, "t.parsed.files", 1, committed[1], 60),
            LagRow(group, "t.raw.packages", 0, 7, 7),
            LagRow("t.other", "t.parsed.files", 0, other_group, 100),
            LagRow(group, "t.training.shards", 0, 0, 9),  # no stage reads it
        ]

    before, now = rows((10, 0), 0), rows((40, 10), 100)
    progress = {p.stage: p for p in stage_progress(settings, now, before, seconds=4.0)}
    assert sorted(progress) == ["instruct", "parse"]
    instruct = progress["instruct"]
    assert instruct.lag == (100 - 40) + (60 - 10)
    assert instruct.rate == (40 + 10 - 10) / 4.0  # the other group's commits do not count
    assert instruct.eta_s == 110 / 10.0
    assert progress["parse"].eta_s == 0.0
    single = {p.stage: p for p in stage_progress(settings, now)}
    assert single["instruct"].rate is None and single["instruct"].eta_s is None
    assert [eta_text(s) for s in (None, 0.4, 65, 3 * 3600 + 125)] == ["-", "0s", "1m05s", "3h02m"]


def test_progress_line_counts_items_since_the_last_line_and_the_backlog() -> None:
    from exforge.core.kafka import LagRow
    from exforge.core.settings import Settings
    from streams.worker import Progress

    settings = Settings(topic_prefix="t.")
    group = settings.worker_group
    progress = Progress(since=100.0)
    assert progress.line(settings, {}, 110.0) == "progress: idle | backlog: -"
    progress.observe([LagRow(group, "t.parsed.files", 0, 10, 50)], now=110.0)
    progress.observe([LagRow(group, "t.parsed.files", 0, 30, 50)], now=114.0)
    items = {("parse", "files"): 40, ("instruct", "files"): 8, ("instruct", "samples"): 30}
    line = progress.line(settings, items, 120.0)
    assert line == (
        "progress: parse 40 files (4.0/s); instruct 8 files (0.8/s), 30 samples (3.0/s)"
        " | backlog: instruct 20 (ETA 4s)"
    )
    items[("parse", "files")] = 50  # only what changed is shown
    assert progress.line(settings, items, 125.0).startswith("progress: parse 10 files (2.0/s) |")
    assert progress.line(settings, items, 126.0).startswith("progress: idle |")


def test_worker_processes_of_one_machine_never_share_a_tables_directory(tmp_path: Path) -> None:
    from exforge.core.settings import Settings
    from streams.app import worker_dir

    settings = Settings(data_dir=tmp_path)
    first = worker_dir(settings, 0)
    # a directory held by another process (here: another open lock) is passed over
    assert worker_dir(settings, 0) == tmp_path / "worker" / "1" != first
    assert worker_dir(settings, 3) == tmp_path / "worker" / "3"
    assert worker_dir(settings, 0) == tmp_path / "worker" / "2"


# Set up as Faust does on a worker's first start, in a process of its own (it configures
# the root logger), then asked which levels Faust's and aiokafka's loggers would record.
WORKER_LOGGING = """
import logging, sys
import faust
from exforge.core.settings import Settings
from streams.worker import faust_worker

worker = faust_worker(faust.App("levels"), Settings(log_level=sys.argv[1]))
worker._setup_logging()
names = ("aiokafka.producer.producer", "faust.topics", "exforge.worker")
print(*(logging.getLogger(n).getEffectiveLevel() for n in names), file=sys.__stderr__)
"""


@pytest.mark.parametrize(
    ("level", "number"), [("WARNING", logging.WARNING), ("INFO", logging.INFO)]
)
def test_a_worker_records_nothing_below_its_log_level(level: str, number: int) -> None:
    run = subprocess.run(
        [sys.executable, "-c", WORKER_LOGGING, level], capture_output=True, text=True, check=True
    )
    assert run.stderr.split()[-3:] == [str(number)] * 3, run.stderr


# --- near-duplicate decisions, message by message ---------------------------------------


class Unset(dict[str, str]):
    """A Faust table of the stage: a missing key reads as "" (and is not stored); the
    keys read (`reads`), as a probe of the store reads a RocksDB table would make; the
    keys set (`sets`), and the groups of keys written with one changelog record each
    (`writes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.sets: list[str] = []
        self.writes: list[str] = []

    def __getitem__(self, key: str) -> str:
        self.reads.append(key)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: str) -> None:
        self.sets.append(key)
        super().__setitem__(key, value)

    def write(self, group: str, values: Mapping[str, str | None]) -> None:
        """`streams.tables.BudgetedTable.write`."""
        if values:
            self.writes.append(group)
        for key, value in values.items():
            if value is None:
                self.pop(key, None)
            else:
                self[key] = value

    def __missing__(self, key: str) -> str:
        return ""


class NearDupBench:
    """The dedup stage's handlers on one partition, fed by hand: the messages each
    handler sends wait in `pending` until a step delivers them, so a test chooses the
    order in which the broker would have delivered them (any order is possible under
    load)."""

    def __init__(
        self, engine: Engine, monkeypatch: pytest.MonkeyPatch, partitions: int = 1
    ) -> None:
        settings = load_settings(topic_partitions=partitions, neardup_decide_chunk=2)
        topic = topic_name(settings.topic_prefix, "files.neardup")
        app = SimpleNamespace(
            assignor=SimpleNamespace(assigned_actives=lambda: {TopicPartition(topic, 0)}),
            in_recovery=False,
            rebalancing=False,
            rebalancing_count=0,
        )
        self.tables: dict[str, Unset] = {}
        self.ctx = SimpleNamespace(
            settings=settings,
            engine=engine,
            app=app,
            broker=None,
            table=lambda name: self.tables.setdefault(name, Unset()),
        )
        # files are held on partition 0; a `files.bands` message is handled on its own
        self.partition = 0
        monkeypatch.setattr(dedup, "_event_partition", lambda: self.partition)
        self.stage = dedup.NearDup(self.ctx)  # type: ignore[arg-type]
        self.pending: list[Output] = []
        self.kept: list[str] = []
        self.dropped: list[str] = []
        # the broker acknowledges outputs at once, or (False) when `acknowledge` says so
        self.acknowledging = True
        self.unacknowledged: list[Callable[[], None]] = []

    async def handle(self, handler: Any, output: Output) -> None:
        self.partition = (output.topic == "files.bands" and output.partition) or 0
        result = await handler(output.record.to_bytes(), output.key)
        self.unacknowledged += result.delivered
        if self.acknowledging:
            self.acknowledge()
        for out in result.outputs:
            if out.topic == "parsed.files":
                self.kept.append(out.key)
            else:
                self.pending.append(out)

    def acknowledge(self) -> None:
        while self.unacknowledged:
            self.unacknowledged.pop(0)()

    def restart(self) -> dedup.NearDup:
        """A worker restarted (or another one taking the partition over) on the same
        tables, with nothing in memory; the worker before it is returned."""
        before, self.stage = self.stage, dedup.NearDup(self.ctx)  # type: ignore[arg-type]
        return before

    async def candidate(self, file: ParsedFile) -> None:
        await self.handle(self.stage.on_candidate, Output("files.candidates", file.sha256, file))

    async def deliver(self, topic: str, key: str | None = None) -> None:
        """Deliver the pending messages of `topic` (for `key`), and those they cause."""
        handler = {"files.bands": self.stage.on_bands, "files.neardup": self.stage.on_neardup}
        while todo := [o for o in self.pending if o.topic == topic and key in (None, o.key)]:
            self.pending.remove(todo[0])
            await self.handle(handler[topic], todo[0])

    async def everything(self) -> None:
        while self.pending:
            await self.deliver(self.pending[0].topic)

    async def decide(self) -> None:
        """What the timer does when the max hold struck: ask the partition to decide,
        then each chunk asks for the next."""
        before = len(self.stage.settled)
        await self.handle(self.stage.on_neardup, dedup.decide_output(0))
        await self.deliver("files.neardup", "decide:0")
        decided = [sha for sha in list(self.stage.settled)[before:]]
        self.dropped.extend(sha for sha in decided if sha not in self.kept)


def near_dup_file(sha: str, *bands: str) -> ParsedFile:
    return ParsedFile(
        sha256=sha,
        source_id=f"dir:{sha[-4:]}@1.0.0",
        path="lib/a.ex",
        content="defmodule A do\nend\n",
        size_bytes=19,
        lines=2,
        near_dup={"bands": list(bands)},
    )


SMALL, LARGE, OTHER = "1" * 64, "2" * 64, "3" * 64


def test_a_file_decided_by_the_max_hold_before_its_bands_are_registered_waits(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The larger file of a pair is held, and the max hold strikes before its bands
    reach the bucket that the smaller file, kept in an earlier batch, is in: it must
    not be decided before it has heard of the smaller one."""
    bench = NearDupBench(engine, monkeypatch)

    async def run() -> None:
        await bench.candidate(near_dup_file(SMALL, "0:shared", "1:small"))
        await bench.everything()
        await bench.decide()
        await bench.candidate(near_dup_file(LARGE, "0:shared", "1:large"))
        await bench.decide()  # its `files.bands` message is not delivered yet
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, bench.dropped) == ([SMALL], [LARGE])
    assert bench.stage.settled[LARGE] == SMALL


def test_a_newcomer_waits_for_the_answer_of_the_decided_file_it_displaced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The smaller file of a pair arrives after the larger one was kept: its bands are
    registered and every event for it delivered before the max hold strikes, but the
    larger file has not answered yet that it is decided."""
    bench = NearDupBench(engine, monkeypatch)

    async def run() -> None:
        await bench.candidate(near_dup_file(LARGE, "0:shared", "1:large"))
        await bench.everything()
        await bench.decide()
        await bench.candidate(near_dup_file(SMALL, "0:shared", "1:small"))
        await bench.deliver("files.bands")
        await bench.deliver("files.neardup", SMALL)
        await bench.decide()  # the larger file's answer is not delivered yet
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, bench.dropped) == ([LARGE], [SMALL])
    assert bench.stage.settled[SMALL] == LARGE


def test_redelivered_registrations_and_files_without_bands(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivered `files.bands` message says again what it said, which changes
    nothing (at-least-once); a file with no bands registers nowhere and is decided at
    once; one batch of a pair keeps the smaller file, in chunks."""
    bench = NearDupBench(engine, monkeypatch)

    async def run() -> None:
        for sha in (LARGE, SMALL):
            await bench.candidate(near_dup_file(sha, "0:shared", f"1:{sha[0]}"))
        await bench.candidate(near_dup_file(OTHER))
        bench.pending += [o for o in bench.pending if o.topic == "files.bands"]
        await bench.decide()
        assert bench.kept == [OTHER]
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, sorted(bench.dropped)) == ([OTHER, SMALL], [LARGE])


def test_a_held_file_is_written_once_and_what_it_hears_rewrites_its_header_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each event a held file hears (`registered`, `displaced`, `answer`) changes its
    header; the file (~14 KB, the header ~300 bytes) is written when it is held, with
    its header in one changelog record, and deleted with it in one once decided."""
    bench = NearDupBench(engine, monkeypatch)
    held = bench.tables["neardup-held"]

    async def run() -> None:
        await bench.candidate(near_dup_file(LARGE, "0:shared", "1:large"))
        await bench.everything()
        await bench.candidate(near_dup_file(SMALL, "0:shared", "1:small"))
        await bench.everything()  # SMALL displaced LARGE, which answered it
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, bench.dropped) == ([SMALL], [LARGE])
    for sha in (SMALL, LARGE):
        assert held.sets.count(sha + dedup.FILE) == 1
        assert held.sets.count(sha) == 3  # held; registered; answer or displaced
    assert held.writes == [LARGE, SMALL, SMALL, LARGE]  # held; forgotten
    assert not held


def test_held_file_header_round_trips() -> None:
    bare = dedup.HeldFile(3, 1.5)
    full = dedup.HeldFile(
        0,
        1733300000.25,
        Held(SMALL, LARGE),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        frozenset({"0", "3", LARGE}),
        frozenset({"3", LARGE}),
        frozenset({OTHER}),
    )
    for held in (bare, full):
        assert dedup.HeldFile.loads(held.dumps()) == held
    assert not full.ready and bare.ready


def test_a_table_write_packs_its_values_as_they_are() -> None:
    """One changelog value for several keys (`BudgetedTable.write`): values that are
    JSON, or hold the separator, come back as they were; a held file is not escaped."""
    file = json.dumps({"content": 'x = "y"\nz'})
    values = {SMALL: "0 1.5 -", SMALL + dedup.FILE: file, "a": "1\n2", LARGE: None, "e": ""}
    packed = tables.pack(values)
    assert tables.unpack(packed) == values
    assert file in packed


def test_a_file_decided_earlier_reaches_newcomers_through_a_held_file(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bucket keeps its smallest file only: the first newcomer displaces the file kept
    in an earlier batch, a smaller one displaces the first before the kept file's answer
    reaches it. The smaller newcomer hears of the kept file through the first one."""
    bench = NearDupBench(engine, monkeypatch)

    async def run() -> None:
        await bench.candidate(near_dup_file(OTHER, "0:shared", "1:other"))
        await bench.everything()
        await bench.decide()
        await bench.candidate(near_dup_file(LARGE, "0:shared", "1:large"))
        await bench.deliver("files.bands")
        await bench.candidate(near_dup_file(SMALL, "0:shared", "1:small"))
        await bench.deliver("files.bands")
        for sha in (LARGE, SMALL, OTHER, LARGE, SMALL):
            await bench.deliver("files.neardup", sha)
        await bench.decide()

    asyncio.run(run())
    assert bench.kept == [OTHER]
    assert sorted(bench.dropped) == [SMALL, LARGE]


def test_a_kept_file_is_produced_once_while_its_outputs_await_acknowledgement(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decided file is forgotten once its outputs are acknowledged, which under load
    takes a while. Meanwhile its candidate may be read again (a stalled partition fetched
    again) and a rebalance may leave the worker its partition, rebuilding the index from
    the table: neither has the worker decide it again, so in a run without crashes each
    kept file reaches `parsed.files` once (3679b27: 2,809 messages for 2,691 kept files
    in `benchmarks/hex_scale.py --packages 300`)."""
    bench = NearDupBench(engine, monkeypatch)
    bench.acknowledging = False
    files = [near_dup_file(sha) for sha in (SMALL, LARGE, OTHER)]

    async def run() -> None:
        for file in files:
            await bench.candidate(file)
        await bench.handle(bench.stage.on_neardup, dedup.decide_output(0))  # SMALL, LARGE
        await bench.candidate(files[2])  # read again before its chunk is decided
        await bench.deliver("files.neardup", "decide:0")  # OTHER
        await bench.decide()  # the timer's next batch
        bench.stage.reindex(frozenset({0}))  # a rebalance left the worker partition 0
        await bench.decide()
        bench.acknowledge()
        await bench.candidate(files[0])  # read again once forgotten
        await bench.decide()

    asyncio.run(run())
    assert bench.kept == [SMALL, LARGE, OTHER]
    assert not bench.stage.held and not bench.stage.deciding


def test_a_registration_goes_through_each_partition_of_its_buckets_and_tells_the_file_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's buckets on two partitions: one `files.bands` message goes to the first,
    which passes what the file heard on to the second; the file hears one `registered`
    (the smaller file it collides with, the files it displaced), not a message per
    partition and band."""
    bench = NearDupBench(engine, monkeypatch, partitions=2)
    band = {
        p: next(f"0:{i}" for i in range(99) if bucket_partition(f"0:{i}", 2) == p) for p in (0, 1)
    }
    smallest = "0" * 64

    def heard(sha: str) -> list[tuple[str, str | None, list[str]]]:
        events = [o.record for o in bench.pending if o.topic == "files.neardup" and o.key == sha]
        return [(e.kind, e.other, e.later) for e in events]  # type: ignore[attr-defined]

    async def run() -> None:
        await bench.candidate(near_dup_file(SMALL, band[0], band[1]))
        await bench.everything()
        await bench.decide()
        await bench.candidate(near_dup_file(LARGE, band[1], band[0], "1:large"))
        assert [(o.topic, o.partition) for o in bench.pending] == [("files.bands", 0)]
        await bench.deliver("files.bands")
        assert heard(LARGE) == [("registered", SMALL, [])]
        await bench.everything()
        await bench.decide()
        await bench.candidate(near_dup_file(smallest, band[0], band[1]))
        await bench.deliver("files.bands")
        assert heard(smallest) == [("registered", None, [SMALL])]
        assert heard(SMALL) == [("displaced", smallest, [])] * 2  # a bucket on each
        await bench.decide()  # not ready: SMALL has not answered
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, bench.dropped) == ([SMALL], [LARGE, smallest])
    assert bench.stage.settled[smallest] == SMALL
    # one changelog record a partition a file changed buckets on, however many it changed
    # there: LARGE changed one bucket (its own), the others one on each partition
    large = bucket_partition("1:large", 2)
    writes = [f"{SMALL}@0", f"{SMALL}@1", f"{LARGE}@{large}", f"{smallest}@0", f"{smallest}@1"]
    assert bench.tables["neardup-buckets"].writes == writes


def test_a_registration_redelivered_after_its_outputs_were_lost_tells_each_party_again(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `files.bands` message whose bucket writes persisted but whose outputs were lost
    (a crash before they were acknowledged) is delivered again: the bucket is as the
    first delivery left it, and the files it displaced must still hear `displaced`, and
    the newcomer `later`, or the displaced files would be kept beside it. So too once an
    even smaller file displaced the newcomer before the redelivery."""
    bench = NearDupBench(engine, monkeypatch)
    smallest = "0" * 64

    def registration(sha: str) -> Output:
        (bands,) = [o for o in bench.pending if o.topic == "files.bands" and o.key == sha]
        return bands

    async def register_and_lose(sha: str) -> Output:
        """Register `sha`'s bands and lose what that sent; the message, to deliver again."""
        bands = registration(sha)
        await bench.deliver("files.bands", sha)
        bench.pending = [o for o in bench.pending if o.topic == "files.bands"]
        return bands

    async def run() -> None:
        await bench.candidate(near_dup_file(OTHER, "0:shared", "1:other"))
        await bench.everything()
        await bench.candidate(near_dup_file(LARGE, "0:shared", "1:large"))
        again = await register_and_lose(LARGE)  # LARGE displaced OTHER
        bench.pending.append(again)
        await bench.everything()
        await bench.candidate(near_dup_file(SMALL, "0:shared", "1:small"))
        await bench.candidate(near_dup_file(smallest, "0:shared", "1:smallest"))
        again = await register_and_lose(SMALL)  # SMALL displaced LARGE
        await bench.deliver("files.bands", smallest)  # the smallest displaced SMALL
        bench.pending.append(again)
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert (bench.kept, sorted(bench.dropped)) == ([smallest], [SMALL, LARGE, OTHER])
    assert not bench.stage.held
    # a redelivery found its buckets as the first delivery left them: no write again
    writes = bench.tables["neardup-buckets"].writes
    assert len(set(writes)) == len(writes) == 4


def test_the_decision_reads_no_held_file_that_is_not_ready(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer, and each `decide`, know which held files are ready without reading
    `neardup-held` (a RocksDB store under load): a file whose registration has not gone
    through is not read however many batches are decided meanwhile (each batch read
    every waiting file's header before: the neardup stage's busy time under load)."""
    bench = NearDupBench(engine, monkeypatch)
    unready = [f"{i:064x}" for i in range(10, 16)]
    held = bench.tables["neardup-held"]

    async def run() -> None:
        for sha in unready:
            await bench.candidate(near_dup_file(sha, "0:shared", f"1:{sha}"))
        await bench.candidate(near_dup_file(OTHER))  # no bands: ready at once
        held.reads.clear()
        for _ in range(3):
            await bench.decide()
        assert held.reads == [OTHER, OTHER + dedup.FILE]  # the one file decided
        assert bench.stage.busy() and not bench.stage.owned_ready()  # nothing to ask for
        await bench.everything()
        await bench.decide()

    asyncio.run(run())
    assert bench.kept == [OTHER, unready[0]]
    assert sorted(bench.dropped) == unready[1:]


def test_readiness_is_rebuilt_from_the_table_after_a_restart_or_rebalance(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted worker knows from the table which held files are ready (and decides
    those alone); a worker that gets its partition back after a rebalance rebuilds what
    it knew, though it owns the same partitions: the worker that had the partition
    meanwhile decided its files."""
    bench = NearDupBench(engine, monkeypatch)

    async def run() -> None:
        for sha in (LARGE, SMALL):
            await bench.candidate(near_dup_file(sha, "0:shared", f"1:{sha[0]}"))
        await bench.candidate(near_dup_file(OTHER))
        await bench.deliver("files.bands")
        assert bench.stage.busy() and bench.stage.owned_ready().keys() == {0}
        first = bench.restart()
        assert bench.stage.busy() and bench.stage.owned_ready().keys() == {0}
        await bench.decide()
        assert bench.kept == [OTHER]
        await bench.everything()
        await bench.decide()
        assert first.busy()  # what it knew before the partition left it
        bench.ctx.app.rebalancing_count += 1  # it comes back
        assert not first.busy() and not first.owned_ready()

    asyncio.run(run())
    assert (bench.kept, bench.dropped) == ([OTHER, SMALL], [LARGE])


def test_the_near_dup_drain_look_waits_only_for_the_stages_upstream_of_the_decision(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stage upstream of the decision holds input in this process (at work on
    it, or delivering its outputs), the decide timer's drain watch counts the inputs as
    not drained without asking the broker; a stage downstream at work (instruct, shard)
    does not hold the decision back."""
    from streams.stage import StageContext

    bench = NearDupBench(engine, monkeypatch)
    none: Any = None  # what holding input does not use
    ctx = StageContext(bench.ctx.settings, none, engine, none, none)
    bench.ctx.holding_input = ctx.holding_input
    holding = bench.stage.drain.holding
    seen = [holding()]
    with ctx.activity.during("instruct"), ctx.activity.during("shard"):
        seen.append(holding())
    for stage in dedup.UPSTREAM:
        with ctx.activity.during(stage):
            seen.append(holding())
    ctx.in_flight["instruct"] = {none}
    seen.append(holding())
    ctx.in_flight["neardup-bands"] = {none}
    seen.append(holding())
    assert seen == [False, False, *[True] * len(dedup.UPSTREAM), False, True]


def test_a_worker_is_not_idle_while_its_group_rebalances(tmp_path: Path) -> None:
    """All else idle (no lag, nothing held or to seal), a worker waits for the end of a
    rebalance (and of its tables' recovery) before it stops for idle."""
    from exforge.core.settings import Settings
    from streams.stage import Activity
    from streams.worker import is_idle

    settings = Settings(data_dir=tmp_path, idle_seconds=1)
    engine = engine_for(f"sqlite:///{tmp_path / 'db.sqlite'}")  # migrated, empty
    app = SimpleNamespace(rebalancing=False, in_recovery=False)
    ctx: Any = SimpleNamespace(
        settings=settings,
        activity=Activity(),
        busy=[],
        busy_delivering=lambda: False,
        engine=engine,
        app=app,
    )
    long_ago = -1e9  # started: quiet since then
    assert asyncio.run(is_idle(ctx, long_ago, []))
    app.rebalancing = True
    assert not asyncio.run(is_idle(ctx, long_ago, []))
    app.rebalancing, app.in_recovery = False, True
    assert not asyncio.run(is_idle(ctx, long_ago, []))
