"""`exforge worker`: run the stage agents, optionally until the pipeline is idle.

Idle means: every stage input has zero lag for the worker group, no stage has touched a
message for `idle_seconds`, the shard stage has nothing left to seal or publish, and the
group is not rebalancing. A worker stopping for idle stops as fully as on SIGTERM
(`Worker.stop_soon`), its consumer's thread stopped before the process exits.

Stalls: after a restart, an assigned partition with lag is now and then never consumed
again (seen on the embedded broker after a SIGKILL). A quiet worker (no stage at work,
`streams.stage.Activity`: a long instruct batch is work, not a stall) that sees an
assigned partition's committed offset stand still for `stall_seconds` while it has lag
logs it, counts it in `exforge_stalled_partitions`, and fetches it again from
its next unhandled offset (`streams.offsets` keeps commits safe across such seeks).

Progress: every `progress_interval_s` a worker logs one line: what its stages handled
since the last line (packages, files, samples, and their rates) and, for the whole
group, each stage's backlog with its consumption rate and ETA.

Memory: a worker caps its malloc arenas and gives freed heap back to the system every
`RELEASE_INTERVAL_S` (`exforge.core.memory`), so that its resident size follows its live
memory, which the corpus does not grow: archives are streamed, the tables are in RocksDB
within one budget (`streams.tables`), caches are bounded.

Stopping: a stopping worker (SIGTERM, SIGINT, `--until-idle`) waits for the broker to
acknowledge its outputs and to take its commits, which a broker that is gone never does:
aiokafka retries a produce until it expires (Faust's `producer_request_timeout`, 20
minutes) and Faust flushes the producer before it stops, so such a worker hung in
shutdown, retrying, for up to that long. `StopDeadline` bounds the stop: after
`worker_stop_timeout_s` the worker logs what it could not deliver or commit and why (is
the broker reachable?) and exits with status `STOP_INCOMPLETE` at once. Nothing is lost:
an input counts as handled only once its outputs are acknowledged, only handled offsets
are committed (`streams.offsets`), so every input not delivered is read again after a
restart, like after a SIGKILL.

Processes: `run_workers` starts N worker processes on this machine (`exforge worker
--processes N`), members of the same consumer group, each with its own tables
directory and metrics port; partitions are shared out among them like among machines.
The workers die with their supervisor, however it dies (SIGTERM from the kernel, then
their usual shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import faust
from faust.types import TP

from exforge.core import anomaly, memory, tracing
from exforge.core.kafka import LagRow, consumer_lag, create_topics, eta_text, stage_progress
from exforge.core.settings import Settings
from exforge.core.stack import port_open
from exforge.core.telemetry import CONSUMER_LAG, STALLED_PARTITIONS, serve_metrics
from schemas.catalogue import STAGE_INPUTS, topic_name
from streams import shard
from streams.app import build, check_stages
from streams.offsets import HandledOffsets
from streams.stage import StageContext

log = logging.getLogger("exforge.worker")
progress_log = logging.getLogger("exforge.progress")

# aiokafka lists every subscribed topic, in a table, at each rebalance: at INFO that
# buries a worker's log (and a failing test's tail of it)
TOPIC_LISTINGS = "aiokafka.consumer.subscription_state"
MALLOC_ARENAS = 2  # the event loop's, and one for every other thread
RELEASE_INTERVAL_S = 5.0
WATCH_INTERVAL_S = 2.0  # lag, idleness, stalls and anomalies
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
# exit status of a worker that stopped before delivering or committing everything
# (EX_TEMPFAIL: those inputs are consumed again by the next worker)
STOP_INCOMPLETE = 75


def show_progress_lines() -> None:
    """Progress lines go to stderr whatever the log level (Faust's handlers drop INFO
    records under EXFORGE_LOG_LEVEL=WARNING), in the worker's log format."""
    if progress_log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    )
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False


async def input_lag(ctx: StageContext) -> list[LagRow]:
    """The worker group's lag per stage-input partition (and update the gauge)."""
    settings = ctx.settings
    inputs = [topic_name(settings.topic_prefix, name) for name in STAGE_INPUTS.values()]
    rows = await consumer_lag(settings, [settings.worker_group], inputs, ctx.broker)
    for row in rows:
        CONSUMER_LAG.labels(row.group, row.topic, str(row.partition)).set(row.lag)
    return rows


@dataclass
class StallWatch:
    """Which partitions with lag have not committed anything for `after_s` seconds."""

    after_s: float
    since: dict[tuple[str, int], tuple[int | None, float]] = field(default_factory=dict)

    def stalled(self, rows: Iterable[LagRow], now: float) -> list[LagRow]:
        found = []
        for row in rows:
            key = (row.topic, row.partition)
            if row.lag == 0:
                self.since.pop(key, None)
                continue
            committed, since = self.since.get(key, (None, now))
            if key not in self.since or committed != row.committed:
                self.since[key] = (row.committed, now)
            elif now - since >= self.after_s:
                found.append(row)
                self.since[key] = (row.committed, now)  # give the seek time to work
        return found


async def rescue_stalls(app: faust.App, rows: Iterable[LagRow]) -> None:
    """Log stalled partitions this worker owns, count them in the gauge, and seek each
    back to its next unhandled offset (commits follow handled offsets only, so the seek
    can redeliver but never skip; effects are idempotent)."""
    consumer = app.consumer
    assigned = consumer.assignment()
    owned = [row for row in rows if TP(row.topic, row.partition) in assigned]
    STALLED_PARTITIONS.set(len(owned))
    for row in owned:
        tp = TP(row.topic, row.partition)
        base = consumer.progress.committable(tp)
        if base is None:  # nothing handled since assignment: the committed offset holds
            base = row.committed or 0  # (0 before any commit: reset to the log start)
        log.warning(
            "partition %s:%d stalled at offset %s with lag %d; fetching again from %s",
            row.topic,
            row.partition,
            row.committed,
            row.lag,
            base,
        )
        if not app.in_recovery:
            await consumer.seek(tp, base)
            consumer.resume_partitions([tp])


async def is_idle(ctx: StageContext, started: float, lag: list[LagRow]) -> bool:
    """Whether the pipeline is idle (module docstring). Not while the group rebalances
    (until this worker's tables are recovered): what it owns is changing, and so is what
    its stages hold back (`ctx.busy`: near-dup files of partitions it takes over); and a
    consumer stopping then leaves in the middle of the group's join, which only prolongs
    it for the other members."""
    settings = ctx.settings
    if ctx.app.rebalancing or ctx.app.in_recovery:
        return False
    if ctx.activity.quiet_for(time.monotonic(), started) < settings.idle_seconds:
        return False
    if any(check() for check in ctx.busy) or ctx.busy_delivering():
        return False
    if any(row.lag > 0 for row in lag):
        return False
    pending = await asyncio.to_thread(shard.pending_samples, ctx.engine)
    unpublished = await asyncio.to_thread(shard.unpublished, ctx.engine)
    return pending == 0 and not unpublished


@dataclass
class Progress:
    """The worker's one-line progress summaries: its items since the last line and the
    group's backlog per stage (from the last two lag readings)."""

    since: float
    counted: dict[tuple[str, str], int] = field(default_factory=dict)
    readings: list[tuple[float, list[LagRow]]] = field(default_factory=list)

    def observe(self, lag: list[LagRow], now: float) -> None:
        self.readings = [*self.readings[-1:], (now, lag)]

    def line(self, settings: Settings, items: dict[tuple[str, str], int], now: float) -> str:
        seconds = max(now - self.since, 1e-9)
        handled = []
        for stage in STAGE_INPUTS:
            changes = [
                (unit, n - self.counted.get((s, unit), 0))
                for (s, unit), n in items.items()
                if s == stage and n != self.counted.get((s, unit), 0)
            ]
            if changes:
                counts = ", ".join(f"{n} {unit} ({n / seconds:.1f}/s)" for unit, n in changes)
                handled.append(f"{stage} {counts}")
        self.since, self.counted = now, dict(items)
        backlog = "-"
        if self.readings:
            (then, before), (at, rows) = self.readings[0], self.readings[-1]
            waiting = [
                f"{p.stage} {p.lag} (ETA {eta_text(p.eta_s)})"
                for p in stage_progress(settings, rows, before if then < at else (), at - then)
                if p.lag
            ]
            backlog = ", ".join(waiting) or "none"
        return f"progress: {'; '.join(handled) or 'idle'} | backlog: {backlog}"


def broker_state(bootstrap: str) -> str:
    """Whether the broker at `bootstrap` accepts TCP connections, in words."""
    addresses = [address.strip() for address in bootstrap.split(",")]
    for address in addresses:
        host, _, port = address.rpartition(":")
        with contextlib.suppress(OSError, ValueError):  # unresolvable host, no port
            if port_open(host, int(port)):
                return f"the broker ({address}) accepts connections"
    return f"the broker is unreachable (no connection to {', '.join(addresses)})"


def pending_work(ctx: StageContext) -> str:
    """What a stopping worker has not delivered or committed, and why, in words. Reads
    the loop's structures from another thread: copies only, no iteration of live ones."""
    parts = [broker_state(ctx.settings.bootstrap)]
    waiting = {stage: len(tasks) for stage, tasks in list(ctx.in_flight.items()) if tasks}
    if waiting:
        by_stage = ", ".join(f"{stage} {n}" for stage, n in sorted(waiting.items()))
        parts.append(
            f"outputs of {sum(waiting.values())} input messages not acknowledged ({by_stage})"
        )
    else:
        parts.append("no outputs awaiting acknowledgement")
    # the consumer if the app made one (`app.consumer` would make one, on the wrong thread)
    progress = getattr(ctx.app._consumer, "progress", None)
    uncommitted = progress.uncommitted() if isinstance(progress, HandledOffsets) else {}
    if uncommitted:
        counts = []
        for tp, (committed, handled) in sorted(uncommitted.items()):
            since = f" past offset {committed}" if committed is not None else ""
            counts.append(f"{tp.topic}[{tp.partition}] {handled}{since}")
        parts.append(f"handled messages not committed: {', '.join(counts)}")
    else:
        parts.append("no handled offset left uncommitted")
    return "; ".join(parts)


@dataclass
class StopDeadline:
    """Ends a stopping worker that is not done `timeout_s` after the stop began: logs
    `report()` (what it could not deliver or commit) and exits with `STOP_INCOMPLETE`.
    A thread's timer, so that a loop busy retrying a broker that is gone cannot hold it
    up; the exit skips the rest of the shutdown, which holds no state a restart needs
    (like a SIGKILL: every input not delivered is uncommitted and read again)."""

    timeout_s: float
    report: Callable[[], str]
    timer: threading.Timer | None = None

    def arm(self) -> None:
        if self.timer is None:
            self.timer = threading.Timer(self.timeout_s, self.expire)
            self.timer.daemon = True
            self.timer.start()

    def expire(self) -> None:
        try:
            what = self.report()
        except Exception as exc:  # no report must keep the process alive
            what = f"what was left is unknown ({exc!r})"
        log.error(
            "stop not done after %g s (worker_stop_timeout_s): %s; exiting with status %d, "
            "inputs not committed are read again when a worker restarts",
            self.timeout_s,
            what,
            STOP_INCOMPLETE,
        )
        for handler in [*logging.getLogger().handlers, *log.handlers]:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOP_INCOMPLETE)


class Worker(faust.Worker):
    """Faust's worker, whose stop is bounded by a `StopDeadline`, and which can stop
    itself (`stop_soon`: the pipeline is idle) as fully as a signal stops it.

    Mode's worker awaits the whole stop only when a signal began it: once a stop begins,
    the worker's start returns, and its shutdown gathers the loop's tasks for at most a
    second before it cancels them and closes the loop. A stop begun by a task of ours was
    one of them: one that took longer (the consumer leaving a group in the middle of a
    rebalance, waiting for its join) was cut short before it stopped the consumer's
    thread, which is not a daemon and went on alone (joining the group, then handing its
    assignment to the closed loop), and the process, done, waited for it at exit until
    the `StopDeadline` ended it with `STOP_INCOMPLETE`."""

    def __init__(self, app: faust.App, deadline: StopDeadline | None, **kwargs: object) -> None:
        super().__init__(app, **kwargs)
        self.deadline = deadline
        self.stopping: asyncio.Future[None] | None = None

    async def stop(self) -> None:
        if self.deadline is not None:
            self.deadline.arm()
        await super().stop()

    def stop_soon(self) -> None:
        """Begin the stop (once) from the loop, without waiting for it: the shutdown
        awaits it to its end (`stop_and_shutdown`), as it awaits a signal's."""
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(self.stop(), loop=self.loop)

    def stop_and_shutdown(self) -> None:
        if self.stopping is not None and not self.stopping.done():
            self.loop.run_until_complete(self.stopping)
        super().stop_and_shutdown()


def faust_worker(
    app: faust.App, settings: Settings, deadline: StopDeadline | None = None
) -> faust.Worker:
    """The Faust worker of `app`, logging at the settings' level, its stop bounded by
    `deadline`. Without Faust's start-up spinner, which sets the root logger to DEBUG
    (for a handler that spins on every record) and leaves it so: every debug call of
    Faust and aiokafka, one per message produced and fetched, would build a record that
    nothing prints."""
    worker = Worker(app, deadline, loglevel=settings.log_level, quiet=True)
    worker.spinner = None
    return worker


def run_worker(settings: Settings, stages: Sequence[str], until_idle: bool, index: int = 0) -> int:
    """Run a Faust worker (process `index` of this machine) here; return its exit code."""
    memory.limit_arenas(MALLOC_ARENAS)  # before any thread starts
    tracing.setup("exforge-worker")
    asyncio.run(create_topics(settings))
    ctx = build(settings, stages, index)
    # What start-up made (modules, the tokenizer, the benchmark index: over 200,000
    # objects) lives as long as the process: out of the collector's sight, a full
    # collection (and Faust's at each rebalance) no longer walks it.
    gc.freeze()
    serve_metrics(settings.metrics_port)
    started = time.monotonic()
    deadline = StopDeadline(settings.worker_stop_timeout_s, lambda: pending_work(ctx))
    worker = faust_worker(ctx.app, settings, deadline)
    logging.getLogger(TOPIC_LISTINGS).setLevel(logging.WARNING)

    stalls = StallWatch(settings.stall_seconds)
    anomalies = anomaly.StageWatch(anomaly.Monitor(ctx.engine))
    stage_of_topic = {topic_name(settings.topic_prefix, t): s for s, t in STAGE_INPUTS.items()}

    progress = Progress(time.monotonic())
    if settings.progress_interval_s:
        show_progress_lines()

        @ctx.app.timer(interval=settings.progress_interval_s, name="progress-log")
        async def report() -> None:
            progress_log.info("%s", progress.line(settings, ctx.items, time.monotonic()))

    @ctx.app.timer(interval=RELEASE_INTERVAL_S, name="release-free-memory")
    async def release() -> None:
        memory.release_free_memory()

    # looks at least as often as the idle time it waits for (tests use 1 s)
    @ctx.app.timer(interval=min(WATCH_INTERVAL_S, settings.idle_seconds), name="lag-and-idle-watch")
    async def watch() -> None:
        if worker.stopping is not None:
            return
        try:
            lag = await input_lag(ctx)
            progress.observe(lag, time.monotonic())
            backlog = anomaly.lag_by_stage(lag, stage_of_topic)
            for change in await asyncio.to_thread(
                anomalies.tick, backlog, time.monotonic(), anomaly.utcnow()
            ):
                log.warning("anomaly: %s", change)
            if until_idle and await is_idle(ctx, started, lag):
                log.info("pipeline idle: stopping the worker")
                worker.stop_soon()
                return
            quiet_for = ctx.activity.quiet_for(time.monotonic(), started)
            stalled = stalls.stalled(lag, time.monotonic())
            if quiet_for >= settings.stall_seconds:
                await rescue_stalls(ctx.app, stalled)
        except Exception as exc:  # lag is advisory; the broker may be restarting
            log.warning("lag check failed: %s", exc)

    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def process_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker process `index`: its own metrics port."""
    port = settings.metrics_port + index if settings.metrics_port else 0
    return settings.model_copy(update={"metrics_port": port})


def _die_with(supervisor: int) -> bool:
    """Have the kernel send this worker SIGTERM when its supervisor (pid `supervisor`)
    dies, however it dies: a supervisor killed with SIGKILL passes nothing on, and its
    workers would go on consuming unsupervised (Linux's parent-death signal; elsewhere
    only the check below). Whether the supervisor is still this process's parent: if it
    died before the request, the signal will never come."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == supervisor


def _run_child(
    settings: Settings, stages: Sequence[str], until_idle: bool, index: int, supervisor: int
) -> None:
    if not _die_with(supervisor):
        log.warning("worker %d: its supervisor %d is gone; not starting", index, supervisor)
        sys.exit(0)
    sys.exit(run_worker(settings, stages, until_idle, index))


def run_workers(
    settings: Settings, stages: Sequence[str], until_idle: bool, processes: int = 1
) -> int:
    """Run `processes` workers, each in its own process; the exit code is the first
    non-zero one of theirs. SIGTERM and SIGINT are passed on to every worker; a worker
    whose supervisor dies otherwise (SIGKILL) gets SIGTERM from the kernel."""
    check_stages(stages)
    if processes == 1:
        return run_worker(settings, stages, until_idle)
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_run_child,
            args=(process_settings(settings, index), list(stages), until_idle, index, os.getpid()),
            name=f"exforge-worker-{index}",
        )
        for index in range(processes)
    ]
    for child in children:
        child.start()

    def pass_on(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [child.exitcode or 0 for child in children]
    # a worker killed by a signal exits like a shell reports it: 128 + the signal
    return next((code if code > 0 else 128 - code for code in codes if code), 0)
