"""The streaming spine end to end: real broker, real worker processes, real store and DB."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import CLI_TIMEOUT_S, REPO, Pipeline

from exforge.core import stack
from exforge.core.db import open_database
from exforge.core.kafka import produce
from exforge.core.settings import Settings, load_settings
from exforge.core.stack import free_port
from exforge.core.store import ObjectStore, open_store, sha256_hex
from schemas.records import SourceRequest
from schemas.shards import decode_shard
from streams.sources.local import upload_directory
from streams.worker import STOP_INCOMPLETE
from tests.support.processes import pidfds, still_running, wait_for_text

pytestmark = pytest.mark.slow

UNSEEN = REPO / "tests" / "fixtures" / "unseen_project"
EXPECTED = json.loads((UNSEEN / "EXPECTED.json").read_text())


def shard_objects(store: ObjectStore) -> dict[str, str]:
    """Shard key → sha256 of its bytes."""
    return {
        key: sha256_hex(store.get(key))
        for key in store.list("shards/")
        if key.endswith(".jsonl.zst")
    }


def shard_samples(store: ObjectStore) -> list[dict[str, Any]]:
    return [row for key in shard_objects(store) for row in decode_shard(store.get(key))]


def send(pipeline: Pipeline, topic: str, items: list[tuple[str, Any]]) -> None:
    import asyncio

    asyncio.run(produce(pipeline.settings, topic, items))


Workers = list[tuple[subprocess.Popen[bytes], Path]]


def finish(workers: Workers, timeout_s: float = CLI_TIMEOUT_S) -> None:
    """Every worker exits 0 (any left are killed)."""
    try:
        for proc, log in workers:
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pytest.fail(f"workers did not finish:\n{log.read_text()[-4000:]}")
            assert code == 0, log.read_text()[-4000:]
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()


def request_projects(pipeline: Pipeline, projects: list[Path]) -> None:
    """Upload each project directory to the store and request it on `sources.requests`."""
    store = open_store(pipeline.settings)
    requests = [upload_directory(store, p) for p in projects]
    send(pipeline, "sources.requests", [(r.source_id, r) for r in requests])


def test_unseen_project_is_counted_exactly_and_reprocessing_changes_no_shard(
    pipeline: Pipeline,
) -> None:
    requested = pipeline.json("ingest", "dir", str(UNSEEN))
    assert requested["source_id"] == "dir:rate_limiter@0.2.0"
    pipeline.run_until_idle()

    stats = pipeline.json("dataset", "stats")
    assert stats["packages"] == 1
    assert stats["files"]["seen"] == EXPECTED["ex_files"]
    assert stats["files"]["kept"] == EXPECTED["kept_files"]
    assert stats["files"]["dropped_by_reason"] == EXPECTED["dropped_by_reason"]
    assert stats["samples"]["total"] == EXPECTED["documented_public_functions"]
    assert stats["shards"]["samples"] == EXPECTED["documented_public_functions"]

    store = open_store(pipeline.settings)
    samples = shard_samples(store)
    assert len(samples) == EXPECTED["documented_public_functions"]
    assert len({s["id"] for s in samples}) == len(samples)
    for sample in samples:
        roles = [turn["from"] for turn in sample["conversations"]]
        assert roles == ["human", "gpt"]
        assert sample["meta"]["kind"] == "doc_to_code"
        assert sample["meta"]["source_refs"][0]["source_id"] == "dir:rate_limiter@0.2.0"
    manifests = [k for k in store.list("shards/") if k.endswith("manifest.json")]
    listed = sum(json.loads(store.get(k))["samples"] for k in manifests)
    assert listed == len(samples)

    lag = pipeline.json("lag", "--window", "0.5")
    worker_rows = [r for r in lag["partitions"] if r["group"] == pipeline.settings.worker_group]
    assert worker_rows and all(r["lag"] == 0 for r in worker_rows)
    stages = {s["stage"]: s for s in lag["stages"]}
    assert stages["ingest"]["lag"] == 0 and stages["ingest"]["eta_s"] == 0
    assert stages["ingest"]["rate"] == 0  # nothing left to consume in the window
    assert any(r["topic"].endswith("sources.requests") and r["end"] == 1 for r in worker_rows)

    before = shard_objects(store)
    pipeline.json("ingest", "dir", str(UNSEEN))
    pipeline.run_until_idle()
    assert shard_objects(store) == before
    again = pipeline.json("dataset", "stats")
    assert again["samples"]["total"] == stats["samples"]["total"]
    assert again["shards"] == stats["shards"]


def write_project(root: Path, name: str, files: dict[str, str]) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "mix.exs").write_text(
        f"defmodule {name.title()}.MixProject do\n  use Mix.Project\n\n"
        f'  def project, do: [app: :{name}, version: "1.0.0"]\nend\n'
    )
    for path, text in files.items():
        (root / path).write_bytes(
            text.encode("latin-1") if path.endswith("latin1.ex") else text.encode()
        )
    return root


LATIN1_MODULE = '# café\ndefmodule Mixed.Latin do\n  @doc "é"\n  def f(x), do: x\nend\n'


def documented_module(module: str, functions: int) -> str:
    var = module.lower().replace(".", "_")  # module-specific names: not near-duplicates
    body = "".join(
        f'  @doc "Returns {i} added to `{var}` ({module})."\n'
        f"  def add_{i}({var}) when is_integer({var}), do: {var} + {i}\n\n"
        for i in range(functions)
    )
    return f"defmodule {module} do\n  @moduledoc false\n\n{body}end\n"


def test_bad_inputs_land_in_the_dlq_and_the_worker_keeps_going(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    settings = pipeline.settings
    store = open_store(settings)

    # 1. not JSON at all; 2. JSON that fails the schema.
    send(
        pipeline,
        "sources.requests",
        [("dir:junk@1", b"\x00not json"), ("dir:bad@1", b'{"kind": "dir", "name": "x"}')],
    )
    # 3. an archive whose checksum does not match the request.
    good = upload_directory(store, UNSEEN)
    tampered = good.model_copy(update={"source_id": "dir:tampered@1", "sha256": "0" * 64})
    # 4. a corrupt archive (stored with its true checksum, so ingest passes it on).
    garbage = b"this is not a tar archive" * 40
    corrupt_key = store.put_content_addressed("raw/dir/corrupt/1", garbage, ".tar")
    corrupt = SourceRequest(
        source_id="dir:corrupt@1",
        kind="dir",
        name="corrupt",
        version="1",
        archive_key=corrupt_key,
        sha256=sha256_hex(garbage),
    )
    # 5. a project with one non-UTF-8 file beside a good one.
    mixed_root = write_project(
        tmp_path / "mixed",
        "mixed",
        {
            "lib/good.ex": documented_module("Mixed.Good", 2),
            "lib/latin1.ex": LATIN1_MODULE,
        },
    )
    mixed = upload_directory(store, mixed_root)
    # 6. an archive that is not uploaded yet (replayed below once it is).
    late_root = write_project(
        tmp_path / "late", "late", {"lib/late.ex": documented_module("Late", 3)}
    )
    late = upload_directory(store, late_root)
    store.delete(late.archive_key or "")
    send(
        pipeline,
        "sources.requests",
        [(r.source_id, r) for r in (tampered, corrupt, mixed, late, good)],
    )

    pipeline.run_until_idle()

    letters = pipeline.json("dlq", "list")
    by_class: dict[str, list[dict[str, Any]]] = {}
    for letter in letters:
        by_class.setdefault(letter["error_class"], []).append(letter)
    assert sorted(by_class) == [
        "BadMessage",
        "ChecksumMismatch",
        "CorruptArchive",
        "UnicodeDecodeError",
        "ValidationError",
    ]
    assert len(by_class["ValidationError"]) == 2
    assert {d["key"] for d in by_class["ValidationError"]} == {"dir:junk@1", "dir:bad@1"}
    assert any(
        "schema validation failed" in d["error_message"] for d in by_class["ValidationError"]
    )
    assert "does not match" in by_class["ChecksumMismatch"][0]["error_message"]
    assert by_class["CorruptArchive"][0]["stage"] == "parse"
    (utf8,) = by_class["UnicodeDecodeError"]
    assert utf8["detail"] == {"path": "lib/latin1.ex"} and "not UTF-8" in utf8["error_message"]
    (missing,) = by_class["BadMessage"]
    assert "not in the store" in missing["error_message"]
    for letter in letters:  # every payload is kept, byte-exact, for replay
        assert sha256_hex(store.get(letter["payload_ref"])) == letter["payload_sha256"]

    stats = pipeline.json("dataset", "stats")
    # the good project and the good file of the mixed one went through
    assert stats["samples"]["total"] == EXPECTED["documented_public_functions"] + 2
    assert stats["files"]["dropped_by_reason"]["not_utf8"] == 1

    # Upload the missing archive, replay its dead letter: it now goes through.
    upload_directory(store, late_root)
    replay = pipeline.cli("dlq", "replay", missing["id"])
    assert "replayed 1" in replay.stdout
    pipeline.run_until_idle()
    assert pipeline.json("dataset", "stats")["samples"]["total"] == stats["samples"]["total"] + 3
    bad = pipeline.cli("dlq", "replay", "9:999", check=False)
    assert bad.returncode == 2 and "9:999" in bad.stderr


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.timeout(900)  # two runs of 480 samples, one with two worker processes, on 2 cores
def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(
    pipeline: Pipeline, tmp_path: Path, processes: int
) -> None:
    """SIGKILL a worker mid-run (with 2 processes: their supervisor, whose workers then
    stop too), run the pipeline again: every sample, each in one shard."""
    projects, modules, functions = 20, 3, 8  # 480 samples, the kill after a fifth is staged
    pipeline.env["EXFORGE_SHARD_SAMPLES"] = "25"
    # 60 files decided 8 at a time: the kill may come while the batch is being decided
    pipeline.env["EXFORGE_NEARDUP_DECIDE_CHUNK"] = "8"
    metrics_port = free_port()
    pipeline.env["EXFORGE_METRICS_PORT"] = str(metrics_port)
    settings = pipeline.settings
    store = open_store(settings)
    written = []
    for p in range(projects):
        files = {f"lib/m{m}.ex": documented_module(f"P{p}.M{m}", functions) for m in range(modules)}
        written.append(write_project(tmp_path / f"p{p}", f"p{p}", files))
    request_projects(pipeline, written)
    total = projects * modules * functions

    engine = open_database(settings)
    worker = pipeline.start_worker("--processes", str(processes), log=tmp_path / "worker.log")
    children: dict[int, int] = {}  # pidfd → pid, open before the kill (pids get reused)
    try:
        # progress: samples staged, or (starting, joining the group) lines logged
        progress, since = (0, 0), time.monotonic()
        staged = 0
        log = tmp_path / "worker.log"
        while staged < total // 5:
            assert worker.poll() is None, log.read_text()[-3000:]
            staged = count_samples(engine)
            if (staged, log.stat().st_size) != progress:
                progress, since = (staged, log.stat().st_size), time.monotonic()
            stuck_s = time.monotonic() - since
            assert stuck_s < CLI_TIMEOUT_S, (
                f"no progress for {stuck_s:.0f} s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.02)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        if processes > 1:  # its workers (and multiprocessing's resource tracker) go with it
            pids = [child.pid for child in psutil.Process(worker.pid).children()]
            children = pidfds(pids)
            assert len(children) >= processes, "a worker had ended before the kill"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        assert still_running(children, CLI_TIMEOUT_S) == [], "workers outlived their supervisor"
    finally:
        if worker.poll() is None:
            worker.kill()
        for pid in still_running(children, 0):
            os.kill(pid, signal.SIGKILL)
        for fd in children:
            os.close(fd)
    staged_at_kill = count_samples(engine)
    assert staged_at_kill < total, "the kill came after the run had finished"
    for name in (
        "exforge_messages_in_total",
        "exforge_stage_latency_seconds_bucket",
        "exforge_messages_out_total",
    ):
        assert name in metrics

    pipeline.run_until_idle()

    samples = shard_samples(store)
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids)), "a sample appears in two shards"
    produced = {
        (ref["source_id"], ref["path"], ref["start_line"])
        for s in samples
        for ref in s["meta"]["source_refs"]
    }
    assert len(samples) == total
    assert len(produced) == total
    stats = pipeline.json("dataset", "stats")
    assert stats["samples"]["pending"] == 0
    assert stats["shards"]["samples"] == total


def count_samples(engine: Any) -> int:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from exforge.core.db import Sample

    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Sample)) or 0


@pytest.mark.timeout(900)  # a one-process and a two-process deployment at once, on 2 cores
def test_two_worker_processes_on_rocksdb_tables_make_the_shards_one_makes(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """`exforge worker --processes 2` (tables in RocksDB) against one process (tables in
    memory): the same shards, byte for byte, and both processes did part of the work."""
    projects = [
        write_project(
            tmp_path / f"q{p}",
            f"q{p}",
            {f"lib/m{m}.ex": documented_module(f"Q{p}.M{m}", 4) for m in range(3)},
        )
        for p in range(4)
    ]
    two = Pipeline(
        {
            **pipeline.env,
            "EXFORGE_TOPIC_PREFIX": f"{pipeline.env['EXFORGE_TOPIC_PREFIX']}two.",
            "EXFORGE_DATA_DIR": str(tmp_path / "two"),
            "EXFORGE_TABLE_STORE": "rocksdb",
            "EXFORGE_PROGRESS_INTERVAL_S": "1",
            "EXFORGE_LOG_LEVEL": "WARNING",  # progress lines show all the same
        }
    )
    for run in (pipeline, two):
        request_projects(run, projects)
    log = tmp_path / "two.log"
    workers = [(two.start_worker("--until-idle", "--processes", "2", log=log), log)]
    try:
        pipeline.run_until_idle()  # meanwhile: the two deployments share nothing but the broker
    finally:
        finish(workers)

    expected = shard_objects(open_store(pipeline.settings))
    assert expected and shard_objects(open_store(two.settings)) == expected
    assert two.json("dataset", "stats")["samples"] == pipeline.json("dataset", "stats")["samples"]
    busy = {
        pid
        for pid, what in re.findall(r"\[(\d+)\] \[INFO\] progress: (.*) \|", log.read_text())
        if what != "idle"
    }
    assert len(busy) == 2, "both worker processes handled messages"
    assert list((tmp_path / "two" / "worker").glob("*/v1/tables/neardup-held-*.db"))


def test_a_worker_restarted_on_its_rocksdb_tables_recovers_them(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """A worker stopped and started again on the same RocksDB tables resumes from them.
    One handler's table writes reach a changelog in one record batch, and the embedded
    broker reports a partition's end as its last batch's base offset plus one: Faust
    found the store's last applied offset past that end and refused to start
    (`ConsistencyError`). After the restart the tables hold the first run's files: a
    renamed copy of its project is dropped file by file as exact duplicates."""
    modules = {f"lib/m{m}.ex": documented_module(f"R.M{m}", 4) for m in range(3)}
    original = write_project(tmp_path / "r", "r", modules)
    copy = write_project(tmp_path / "rcopy", "rcopy", modules)
    rocks = Pipeline(
        {
            **pipeline.env,
            "EXFORGE_TOPIC_PREFIX": f"{pipeline.env['EXFORGE_TOPIC_PREFIX']}rocks.",
            "EXFORGE_DATA_DIR": str(tmp_path / "rocks"),
            "EXFORGE_TABLE_STORE": "rocksdb",
        }
    )
    request_projects(rocks, [original])
    rocks.run_until_idle()
    first = rocks.json("dataset", "stats")

    request_projects(rocks, [copy])
    rocks.run_until_idle()

    second = rocks.json("dataset", "stats")
    assert first["files"]["kept"] == len(modules)
    assert second["files"]["dropped_by_reason"].get("exact_duplicate") == len(modules), second
    assert second["samples"]["total"] == first["samples"]["total"] > 0


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[Settings, int]]:
    """A broker of the test's own, to kill (the session's is shared); its settings, pid."""
    settings = load_settings(data_dir=tmp_path / "broker", embedded_kafka_port=free_port())
    pid = stack.start_broker(settings)
    try:
        yield settings, pid
    finally:
        stack.down(settings)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_whose_broker_is_gone_stops_within_its_stop_timeout(
    pipeline: Pipeline, own_broker: tuple[Settings, int], tmp_path: Path, processes: int
) -> None:
    """The broker is killed under a busy worker, then the worker gets SIGTERM. Its
    producer retried the outputs it still held until they expired (Faust's producer
    request timeout, 20 minutes) before the worker stopped; now it gives up after
    `worker_stop_timeout_s`, says why and what it left, and exits with status 75."""
    settings, broker_pid = own_broker
    run = Pipeline(
        {
            **pipeline.env,
            "EXFORGE_KAFKA_BOOTSTRAP": settings.bootstrap,
            "EXFORGE_WORKER_STOP_TIMEOUT_S": "5",
        }
    )
    # a backlog of bad requests: each becomes a dead letter, one produce per message
    send(run, "sources.requests", [(f"dir:junk{i}@1", b"\x00junk") for i in range(2000)])
    log = tmp_path / "worker.log"
    worker = run.start_worker("--stages", "ingest", "--processes", str(processes), log=log)
    try:
        wait_for_text(log, "dead letter", worker, CLI_TIMEOUT_S)  # at work on the backlog
        broker = pidfds([broker_pid])
        os.killpg(broker_pid, signal.SIGKILL)
        assert still_running(broker, CLI_TIMEOUT_S) == []
        killed_at = log.stat().st_size
        # the worker's producer now holds outputs the broker will never acknowledge
        wait_for_text(log, "error produce response", worker, CLI_TIMEOUT_S, killed_at)
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop:\n{log.read_text()[-3000:]}")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == STOP_INCOMPLETE, log.read_text()[-3000:]
    reports = [line for line in log.read_text().splitlines() if "stop not done" in line]
    assert reports, log.read_text()[-3000:]
    assert all("the broker is unreachable" in line for line in reports), reports
    assert any("input messages not acknowledged (ingest " in line for line in reports)


# Workers that stop themselves, as `--until-idle` does (argv: a name; when to stop: once
# assigned partitions ("one"), once the group shares them among "two" workers, or on the
# "rebalance" after that; how long a shutdown hook takes). A stop that meets a rebalance waits for
# the group's join before its consumer leaves: seconds.
SELF_STOP = """
import asyncio, sys
import faust
from exforge.core.settings import load_settings
from streams.worker import StopDeadline, faust_worker

name, when, hook_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
settings = load_settings()
(settings.root / name).mkdir(parents=True, exist_ok=True)
app = faust.App(
    settings.worker_group,
    broker=f"kafka://{settings.bootstrap}",
    datadir=str(settings.root / name),
    store="memory://",
    web_enabled=False,
    topic_partitions=4,
    broker_session_timeout=settings.kafka_session_timeout_s,
    broker_heartbeat_interval=settings.kafka_session_timeout_s / 10,
)
topic = app.topic(settings.topic_prefix + "self-stop", value_serializer="raw")

@app.agent(topic)
async def consume(stream):
    async for _ in stream:
        pass

worker = faust_worker(app, settings, StopDeadline(20.0, lambda: "a stop"))
shared = []

@app.on_before_shutdown.connect
async def hook(app, **kwargs):
    await asyncio.sleep(hook_s)
    print("shutdown hook done", file=sys.__stderr__, flush=True)

@app.timer(interval=0.05)
async def stop_itself():
    mine = [tp for tp in app.consumer.assignment() if tp.topic == topic.get_topic_name()]
    if mine and not app.rebalancing:
        shared.append(len(mine) < 4)
    if (when == "one" and shared) or (when == "two" and shared and shared[-1]):
        worker.stop_soon()
    elif when == "rebalance" and any(shared) and app.rebalancing:
        print("stopping in a rebalance", file=sys.__stderr__, flush=True)
        worker.stop_soon()

worker.execute_from_commandline()
"""


def self_stopping(pipeline: Pipeline, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", SELF_STOP, *args],
            env=pipeline.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def test_a_worker_that_stops_itself_stops_in_full_and_exits(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The stop a worker begins itself (the pipeline is idle) runs to its end, its
    consumer's thread stopped, and the process exits 0 once it is done: Mode's shutdown
    used to cancel such a stop after a second, the consumer's thread (not a daemon) went
    on alone, and the process waited for it at exit until its stop deadline ended it with
    status 75. Here a shutdown hook makes the stop take 3 s."""
    log = tmp_path / "worker.log"
    finish([(self_stopping(pipeline, log, "w0", "one", "3"), log)])
    text = log.read_text()
    assert "shutdown hook done" in text, text[-3000:]
    assert "stop not done" not in text, text[-3000:]


def test_a_worker_that_stops_itself_in_a_rebalance_exits_once_stopped(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Two workers of a group stop themselves: the second in the rebalance the first's
    leaving begins (as `--until-idle` workers do, idle at about the same time). Its stop
    waits for the group's join, and it exits 0 once stopped, not 75 at its deadline."""
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    finish(
        [
            (self_stopping(pipeline, logs[0], "w0", "two", "0"), logs[0]),
            (self_stopping(pipeline, logs[1], "w1", "rebalance", "0"), logs[1]),
        ]
    )
    text = logs[1].read_text()
    assert "stopping in a rebalance" in text, text[-3000:]
    assert "stop not done" not in text, text[-3000:]
