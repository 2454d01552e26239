"""End-to-end throughput of the real pipeline on the real corpus, and where time goes.

    python benchmarks/pipeline_throughput.py [--processes 1,2] [--repeat 1] [--copies 1]
        [--launch separate|processes] [--table-store memory|rocksdb] [--checkout DIR]
        [--baseline DIR] [--corpus DIR] [--work-dir DIR] [--set KEY=VALUE ...] [--json]

For each corpus size C of `--copies` and worker count N of `--processes` (and each
repetition), on a fresh embedded broker, file store and SQLite ledger: the ten libraries
of `../shared/corpus/` (C times, each copy with its own identifiers renamed:
`benchmarks/corpus.py`) are uploaded and requested like `exforge ingest dir` does, then
N worker processes run every stage until the pipeline is idle (`--launch separate`: N
`exforge worker --until-idle` commands; `processes`: one `exforge worker --until-idle
--processes N`), with their tables in `--table-store`.

While they run, every worker's `/metrics` is read twice a second and its memory from
`/proc`. Printed per run:

* files/s and samples/s end to end: files seen (kept and dropped) and samples staged,
  over the active time (first message consumed → last message finished), and over the
  whole wall time (process start → exit, so including start-up and the idle check);
* per stage: busy time (the sum of its handlers' time, over all processes), messages in
  and out, the time it waited (processes x active time - busy), its share of the
  active time, and when (after the active start) it consumed its first message and its
  last; the bottleneck is the stage busy for the largest share;
* CPU seconds of the workers, of their BEAM check VMs and of the embedded broker while
  the workers ran, all three together per file seen, each worker's peak RSS, and the
  size on disk of the workers' tables (RocksDB);
* the check pools' mishaps (`exforge_check_pool_events_total`): batch programs run again
  one candidate per program, check programs timed out, check VMs replaced. A run that
  keeps a sample fewer than another of the same input shows here why.

With several `--copies`, the peak RSS of the largest corpus over that of the smallest
(same worker count and repetition) shows whether a worker's memory grows with the data.

`--checkout DIR` runs the workers from another checkout of exforge (with this venv);
`--baseline DIR` runs a second checkout alternately with it, so that figures before and
after a change come from the same run of this script (and the ratios from runs next to
each other in time, on a machine whose load comes and goes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.corpus import CORPUS, REPO, derived_copies, unpack
from exforge.core import stack
from exforge.core.db import open_database
from exforge.core.kafka import produce
from exforge.core.settings import ENV_PREFIX, Settings, describe_settings
from exforge.core.store import open_store
from streams.dataset import stats
from streams.sources.local import upload_directory

POLL_S = 0.5
RUN_TIMEOUT_S = 3600
WORKER_STOP_S = 30.0


@dataclass
class Sample:
    """One reading of every worker's metrics."""

    at: float
    messages_in: dict[str, float] = field(default_factory=dict)
    messages_out: dict[str, float] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)
    check_events: dict[str, float] = field(default_factory=dict)  # the check pools' mishaps

    def total_in(self) -> float:
        return sum(self.messages_in.values())


# The samples a reading keeps: asked for by name, so a worker serializes these alone, not
# its whole registry (its process collector reads /proc on each scrape): at 300 hex-scale
# packages the full scrape twice a second cost 2.6 % of the workers' CPU.
SCRAPED = (
    "exforge_messages_in_total",
    "exforge_messages_out_total",
    "exforge_stage_latency_seconds_sum",
    "exforge_stage_wait_seconds_total",
    "exforge_check_pool_events_total",
)
SCRAPE_QUERY = urllib.parse.urlencode([("name[]", name) for name in SCRAPED])


def scrape(port: int, into: Sample) -> None:
    url = f"http://127.0.0.1:{port}/metrics?{SCRAPE_QUERY}"
    try:
        text = urllib.request.urlopen(url, timeout=2).read()
    except OSError:
        return  # not serving yet, or already gone
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "exforge_check_pool_events_total":
                event = sample.labels["event"]
                into.check_events[event] = into.check_events.get(event, 0) + sample.value
            stage = sample.labels.get("stage")
            if stage is None:
                continue
            if sample.name == "exforge_messages_in_total":
                into.messages_in[stage] = into.messages_in.get(stage, 0) + sample.value
            elif sample.name == "exforge_messages_out_total":
                into.messages_out[stage] = into.messages_out.get(stage, 0) + sample.value
            elif sample.name == "exforge_stage_latency_seconds_sum":
                into.busy[stage] = into.busy.get(stage, 0) + sample.value
            elif sample.name == "exforge_stage_wait_seconds_total":
                into.waited[stage] = into.waited.get(stage, 0) + sample.value


def proc_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack_ = [], [pid]
    while stack_:
        current = stack_.pop()
        found.append(current)
        stack_.extend(children.get(current, []))
    return found


def proc_status(pid: int) -> tuple[str, int, float] | None:
    """(command name, peak RSS in bytes, CPU seconds) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = next(
        (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM")),
        0,
    )
    return name, peak, cpu


@dataclass
class Usage:
    """Peak RSS of each worker (Python) process; CPU of workers, their BEAM VMs and,
    given its pid, the broker (from the first reading on: what the workers cost it)."""

    peak_rss: dict[int, int] = field(default_factory=dict)
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)
    broker_pid: int | None = None
    broker_cpu: list[float] = field(default_factory=list)  # at the first and last reading

    def read(self, roots: list[int]) -> None:
        broker = None if self.broker_pid is None else proc_status(self.broker_pid)
        if broker is not None:
            self.broker_cpu[1:] = [broker[2]]
        for root in roots:
            for pid in proc_tree(root):
                status = proc_status(pid)
                if status is None:
                    continue
                name, peak, cpu = status
                self.cpu[pid] = (name, cpu)
                if name.startswith(("python", "exforge")):
                    self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), peak)

    def cpu_seconds(self) -> dict[str, float]:
        python = sum(c for n, c in self.cpu.values() if n.startswith(("python", "exforge")))
        beam = sum(c for n, c in self.cpu.values() if n.startswith("beam"))
        broker = self.broker_cpu[-1] - self.broker_cpu[0] if self.broker_cpu else 0.0
        return {"workers": round(python, 1), "beam": round(beam, 1), "broker": round(broker, 1)}


@contextmanager
def embedded_stack(root: Path) -> Iterator[Settings]:
    settings = Settings(data_dir=root, embedded_kafka_port=stack.free_port(), metrics_port=0)
    stack.start_broker(settings)
    try:
        yield settings
    finally:
        stack.down(settings)


# Settings the benchmark itself decides for its workers (`--set` may not).
OWN_SETTINGS = (
    "EXFORGE_DATA_DIR",
    "EXFORGE_TABLE_STORE",
    "EXFORGE_KAFKA_BOOTSTRAP",
    "EXFORGE_CONFIG",
    "EXFORGE_METRICS_PORT",
)


def setting_overrides(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` options as worker environment variables, checked against the
    settings exforge has (the `EXFORGE_` prefix is optional)."""
    known = {variable for variable, _, _ in describe_settings()}
    overrides = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        variable = key.strip().upper()
        variable = variable if variable.startswith(ENV_PREFIX) else ENV_PREFIX + variable
        if not equals:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if variable not in known:
            raise ValueError(f"--set {pair!r}: no setting {variable} (see `exforge settings`)")
        if variable in OWN_SETTINGS:
            raise ValueError(f"--set {pair!r}: {variable} is set by the benchmark itself")
        overrides[variable] = value
    return overrides


def worker_env(
    settings: Settings,
    checkout: Path,
    table_store: str = "memory",
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """The workers' environment: this one's without its EXFORGE_* variables (a run's
    settings are its own), the run's own settings, then `overrides` (which may not name
    `OWN_SETTINGS`, but may change the log level)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        EXFORGE_DATA_DIR=str(settings.root),
        EXFORGE_TABLE_STORE=table_store,
        EXFORGE_KAFKA_BOOTSTRAP=settings.bootstrap,
        EXFORGE_CONFIG=str(settings.root / "absent.toml"),
        EXFORGE_LOG_LEVEL=os.environ.get("EXFORGE_LOG_LEVEL", "WARNING"),
        PYTHONPATH=str(checkout),
    )
    env.update(overrides or {})
    return env


def start_workers(
    settings: Settings,
    checkout: Path,
    processes: int,
    launch: str,
    log: Path,
    table_store: str = "memory",
    overrides: dict[str, str] | None = None,
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """The worker commands, and the metrics port of every worker process."""
    command = [sys.executable, "-m", "exforge", "worker", "--until-idle"]
    env = worker_env(settings, checkout, table_store, overrides)
    ports = [stack.free_port() for _ in range(processes)]
    procs = []
    with log.open("ab") as handle:
        if launch == "processes":
            env["EXFORGE_METRICS_PORT"] = str(ports[0])
            ports = [ports[0] + i for i in range(processes)]
            procs.append(
                subprocess.Popen(
                    [*command, "--processes", str(processes)],
                    env=env,
                    cwd=checkout,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
        else:
            for port in ports:
                procs.append(
                    subprocess.Popen(
                        command,
                        env={**env, "EXFORGE_METRICS_PORT": str(port)},
                        cwd=checkout,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    )
                )
    return procs, ports


def request_all(settings: Settings, projects: list[Path]) -> int:
    store = open_store(settings)
    requests = [upload_directory(store, project) for project in projects]
    asyncio.run(produce(settings, "sources.requests", [(r.source_id, r) for r in requests]))
    return len(requests)


def watch(
    procs: list[subprocess.Popen[bytes]], ports: list[int], usage: Usage, log: Path
) -> list[Sample]:
    samples: list[Sample] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(proc.poll() is None for proc in procs):
        if time.monotonic() > deadline:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            raise TimeoutError(f"workers still running after {RUN_TIMEOUT_S} s; see {log}")
        reading = Sample(time.monotonic())
        for port in ports:
            scrape(port, reading)
        samples.append(reading)
        usage.read([proc.pid for proc in procs])
        time.sleep(POLL_S)
    failed = [proc.returncode for proc in procs if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"worker exited with {failed}; see {log}:\n{log.read_text()[-3000:]}")
    return samples


def last_reading(samples: list[Sample]) -> Sample:
    """Each stage's largest totals (readings after a worker's exit are empty)."""
    best = Sample(samples[-1].at)
    for reading in samples:
        for attr in ("messages_in", "messages_out", "busy", "waited", "check_events"):
            target = getattr(best, attr)
            for stage, value in getattr(reading, attr).items():
                target[stage] = max(target.get(stage, 0), value)
    return best


def active_window(samples: list[Sample], final: Sample) -> tuple[float, float]:
    """(first reading with a message consumed, first reading with the final totals)."""
    started = [s.at for s in samples if s.total_in() > 0]
    if not started:
        raise RuntimeError("no worker consumed anything")
    done_in, done_busy = final.total_in(), sum(final.busy.values())
    settled = next(
        s.at
        for s in samples
        if s.total_in() >= done_in and sum(s.busy.values()) >= done_busy - 1e-6
    )
    return started[0] - POLL_S / 2, settled


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Processed:
    """What one run of the workers did and used."""

    samples: list[Sample]
    usage: Usage
    started: float  # when the workers were launched (monotonic)
    wall_s: float
    totals: dict[str, Any]
    tables_bytes: int


def process(
    settings: Settings,
    checkout: Path,
    processes: int,
    launch: str,
    table_store: str,
    log: Path,
    overrides: dict[str, str] | None = None,
) -> Processed:
    """Run the workers until the pipeline is idle, watching them (and the embedded
    broker's CPU)."""
    usage = Usage(broker_pid=stack.running_pid(stack.broker_pid_file(settings)))
    usage.read([])
    started = time.monotonic()
    procs, ports = start_workers(settings, checkout, processes, launch, log, table_store, overrides)
    try:
        samples = watch(procs, ports, usage, log)
    finally:
        for proc in procs:
            stop_worker(proc)
    wall = time.monotonic() - started
    tables = settings.root / "worker"
    return Processed(
        samples,
        usage,
        started,
        wall,
        stats(open_database(settings)),
        tree_bytes(tables) if tables.is_dir() else 0,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """End a worker command still running (the benchmark failed or was stopped): SIGTERM
    first, which a supervisor passes on to its worker processes (SIGKILL would leave them
    to end on their own while the broker goes away), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stage_span(samples: list[Sample], stage: str, final: Sample, first: float) -> list[float]:
    """When (s after the active start) `stage` first consumed a message and when it had
    consumed all of them: where a stage's span starts late, it waited on one upstream."""
    total = final.messages_in.get(stage, 0)
    began = next(s.at for s in samples if s.messages_in.get(stage, 0) > 0)
    ended = next(s.at for s in samples if s.messages_in.get(stage, 0) >= total)
    return [round(began - first, 1), round(ended - first, 1)]


def summary(processed: Processed, processes: int) -> dict[str, Any]:
    """Throughput, stage breakdown, CPU and memory of a run."""
    samples, usage, wall, totals = (
        processed.samples,
        processed.usage,
        processed.wall_s,
        processed.totals,
    )
    final = last_reading(samples)
    first, last = active_window(samples, final)
    active = max(last - first, POLL_S)
    stage_rows = {}
    for stage in sorted(final.messages_in, key=lambda s: -final.busy.get(s, 0.0)):
        busy = final.busy.get(stage, 0.0)
        stage_rows[stage] = {
            "busy_s": round(busy, 2),
            "messages_in": int(final.messages_in.get(stage, 0)),
            "messages_out": int(final.messages_out.get(stage, 0)),
            # measured where the worker reports it, else what the busy time leaves
            "waited_s": round(final.waited.get(stage, max(processes * active - busy, 0.0)), 2),
            "busy_share": round(busy / (processes * active), 3),
            "span_s": stage_span(samples, stage, final, first),
        }
    files = totals["files"]["seen"]
    samples_total = totals["samples"]["total"]
    peaks = sorted(usage.peak_rss.values(), reverse=True)[:processes]
    cpu = usage.cpu_seconds()
    return {
        "processes": processes,
        "files": files,
        "files_kept": totals["files"]["kept"],
        "samples": samples_total,
        "shards": totals["shards"]["total"],
        "wall_s": round(wall, 1),
        "startup_s": round(first - processed.started, 1),
        "active_s": round(active, 1),
        "files_per_s": round(files / active, 2),
        "samples_per_s": round(samples_total / active, 2),
        "files_per_s_wall": round(files / wall, 2),
        "samples_per_s_wall": round(samples_total / wall, 2),
        "stages": stage_rows,
        "bottleneck": max(stage_rows, key=lambda s: stage_rows[s]["busy_share"]),
        "cpu_s": cpu,
        "cpu_ms_per_file": round(sum(cpu.values()) * 1000 / max(files, 1), 1),
        "peak_rss_mb": [round(p / 2**20) for p in peaks],
        "tables_mb": round(processed.tables_bytes / 2**20, 1),
        # the check pools': batch programs run again one candidate per program, check
        # programs timed out, check VMs replaced (a checkout without the counter: none)
        "check_events": {
            event: int(final.check_events.get(event, 0))
            for event in ("batch_rerun", "timeout", "vm_replaced")
        },
    }


def one_run(
    projects: list[Path],
    processes: int,
    launch: str,
    checkout: Path,
    root: Path,
    table_store: str = "memory",
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    root.mkdir(parents=True)
    with embedded_stack(root) as settings:
        packages = request_all(settings, projects)
        processed = process(
            settings, checkout, processes, launch, table_store, root / "workers.log", overrides
        )
    return {
        "launch": launch,
        "table_store": table_store,
        "settings": overrides or {},
        "packages": packages,
        **summary(processed, processes),
    }


def show(run: dict[str, Any]) -> None:
    print(
        f"\n{run['processes']} worker process(es) ({run['launch']}, {run['table_store']} "
        f"tables), corpus x{run['copies']}: {run['packages']} packages, "
        f"{run['files']} files ({run['files_kept']} kept), {run['samples']} samples"
    )
    if run["settings"]:
        print("  settings: " + " ".join(f"{k}={v}" for k, v in run["settings"].items()))
    print(
        f"  active {run['active_s']} s: {run['files_per_s']} files/s, "
        f"{run['samples_per_s']} samples/s   |   wall {run['wall_s']} s "
        f"(start-up {run['startup_s']} s): {run['files_per_s_wall']} files/s, "
        f"{run['samples_per_s_wall']} samples/s"
    )
    print(
        f"  {'stage':15} {'busy s':>8} {'share':>6} {'in':>8} {'out':>8} {'waited s':>9}"
        f"  {'consumed from → to s':>20}"
    )
    for stage, row in run["stages"].items():
        began, ended = row["span_s"]
        print(
            f"  {stage:15} {row['busy_s']:8.1f} {row['busy_share']:6.2f} "
            f"{row['messages_in']:8d} {row['messages_out']:8d} {row['waited_s']:9.1f}"
            f"  {began:9.1f} → {ended:8.1f}"
        )
    print(
        f"  bottleneck: {run['bottleneck']}   CPU s: workers {run['cpu_s']['workers']}, "
        f"BEAM {run['cpu_s']['beam']}, broker {run['cpu_s']['broker']} "
        f"({run['cpu_ms_per_file']} ms a file)   peak RSS MB: {run['peak_rss_mb']}   "
        f"tables on disk MB: {run['tables_mb']}"
    )
    events = run["check_events"]
    print(
        f"  check pool: {events['batch_rerun']} batch programs run again, "
        f"{events['timeout']} programs timed out, {events['vm_replaced']} VMs replaced"
    )


def ratios(
    runs: list[dict[str, Any]], key: str, base: Any, other: Any, of: str = "files_per_s"
) -> list[float]:
    """`of` (files/s) of the runs with `key == other` over those with `key == base`,
    repetition by repetition."""

    def value(run: dict[str, Any]) -> float:
        return max(run[of]) if isinstance(run[of], list) else run[of]

    pairs = zip(
        [r for r in runs if r[key] == base], [r for r in runs if r[key] == other], strict=True
    )
    return [round(value(b) / value(a), 2) for a, b in pairs]


def report_of(
    runs: list[dict[str, Any]], checkouts: list[Path], counts: list[int], copies: list[int]
) -> dict[str, Any]:
    """The runs with the ratios between them: N processes over the first count, this
    checkout over the baseline, and the peak RSS of the largest corpus over the smallest."""
    report: dict[str, Any] = {"runs": runs}
    for checkout in checkouts:
        for size in copies:
            mine = [r for r in runs if r["checkout"] == str(checkout) and r["copies"] == size]
            for n in counts[1:]:
                name = f"{checkout} x{size}: {n}/{counts[0]}"
                report.setdefault("speedup", {})[name] = ratios(mine, "processes", counts[0], n)
    if len(checkouts) > 1:
        for n in counts:
            mine = [r for r in runs if r["processes"] == n]
            report.setdefault("vs_baseline", {})[f"{n} process(es)"] = ratios(
                mine, "checkout", str(checkouts[0]), str(checkouts[1])
            )
    if len(copies) > 1:
        for checkout in checkouts:
            for n in counts:
                mine = [r for r in runs if r["checkout"] == str(checkout) and r["processes"] == n]
                name = f"{checkout} {n} process(es): x{copies[-1]}/x{copies[0]}"
                report.setdefault("rss_growth", {})[name] = ratios(
                    mine, "copies", copies[0], copies[-1], of="peak_rss_mb"
                )
    return report


def unwind_on_stop_signals() -> None:
    """Have SIGTERM and SIGINT unwind the benchmark through the `finally` blocks that stop
    its workers and embedded broker: by default SIGTERM ends the process on the spot,
    and the broker (in a session of its own) and the workers run on. SIGINT is set too
    because a process started in the background by a non-interactive shell inherits it
    ignored, and then `kill -INT` would not stop the run at all."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # the exit status a shell reports for the signal

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def parse_common(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options every pipeline benchmark shares, parsed (the work dir created); from
    here on SIGTERM or SIGINT stops the benchmark cleanly (`unwind_on_stop_signals`)."""
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--work-dir", type=Path, default=None, help="Parent of temp dirs.")
    parser.add_argument("--keep", action="store_true", help="Keep the run directories.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A setting for the workers, e.g. CHECK_WORKERS=3 (EXFORGE_ optional); repeatable.",
    )
    args = parser.parse_args()
    try:
        args.overrides = setting_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    unwind_on_stop_signals()
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="Worker counts, comma-separated.")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--copies", default="1", help="Corpus size multiples, comma-separated (e.g. 1,10)."
    )
    parser.add_argument("--launch", choices=("separate", "processes"), default="separate")
    parser.add_argument("--table-store", choices=("memory", "rocksdb"), default="memory")
    parser.add_argument("--checkout", type=Path, default=REPO, help="exforge to run.")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="Another checkout, run alternately."
    )
    args = parse_common(parser)
    work = Path(tempfile.mkdtemp(prefix="pipeline-throughput-", dir=args.work_dir))
    checkouts = [args.checkout.resolve()]
    if args.baseline is not None:
        checkouts.insert(0, args.baseline.resolve())
    counts = [int(n) for n in args.processes.split(",")]
    copies = [int(n) for n in args.copies.split(",")]
    try:
        corpus = unpack(args.corpus, work / "corpus")
        runs = []
        for repeat in range(args.repeat):
            for size in copies:
                projects = derived_copies(corpus, size, work / f"copies-{size}")
                for index, checkout in enumerate(checkouts):
                    for processes in counts:
                        run = one_run(
                            projects,
                            processes,
                            args.launch,
                            checkout,
                            work / f"run-{repeat}-{size}-{index}-{processes}",
                            args.table_store,
                            args.overrides,
                        )
                        run.update(checkout=str(checkout), copies=size, repeat=repeat)
                        runs.append(run)
                        if not args.json:
                            print(f"\n[{checkout}]", end="")
                            show(run)
                shutil.rmtree(work / f"copies-{size}", ignore_errors=True)
        report = report_of(runs, checkouts, counts, copies)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name in ("speedup", "vs_baseline", "rss_growth"):
                if name in report:
                    print(f"\n{name} (same repetition): {report[name]}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
