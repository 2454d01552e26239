"""Sandboxed execution of Elixir candidates on a pool of warm BEAM workers.

Each worker is one long-lived `elixir sandbox_server.exs` VM, started in its own session
(so its own OS process group), its own temporary directory, a private network and PID
namespace where the kernel allows it (`unshare`), under `prlimit` limits (address space,
file size, no core dumps), with a scrubbed environment. The host sends it one program at
a time over a pipe pair and waits at most `timeout_s` for the reply.

A worker serves candidates one after another, each in fresh Erlang processes, its own
working directory and captured, truncated output; after each candidate it kills what the
candidate left running, unloads the candidate's modules and compares the VM's global
state with the state before. Any difference, a crash, `System.halt`, `:init.stop`, a
timeout or a garbled reply gets the worker's whole process group killed and a fresh
worker booted in its place; the other candidates never see it. `max_uses=1` gives the
strictest mode: every candidate gets a freshly booted VM of its own.

Threat model: generated code that is wrong, wasteful or destructive (loops, floods,
halts, stray processes, global state), not code written to attack this sandbox: a
candidate that hunted down the worker's reply port inside a reused VM could forge its
own result. `max_uses=1` bounds what it could affect to its own result.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "syntax_error", "runtime_error", "timeout", "memory"]
STATUSES: tuple[Status, ...] = (
    "passed",
    "failed",
    "syntax_error",
    "runtime_error",
    "timeout",
    "memory",
)
SERVER_SCRIPT = Path(__file__).with_name("sandbox_server.exs")
# One scheduler per VM, no busy waiting (the pool, not the VM, provides parallelism),
# a small process table, a literal area that fits under RLIMIT_AS, no break handler.
ERL_FLAGS = (
    "+S 1:1 +SDcpu 1:1 +SDio 1 +A 1 +sbwt none +sbwtdcpu none +sbwtdio none +P 32768 +MIscs 128 +Bd"
)
FILE_SIZE_LIMIT = 16 * 1024 * 1024
MEMORY_SIGNS = ("Cannot allocate", "bad_alloc", "Failed to create", "out of memory")
NAMESPACE_FLAGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("network+pid namespaces", ("--net", "--pid", "--fork", "--kill-child")),
    (
        "network+pid namespaces (user ns)",
        ("--map-root-user", "--net", "--pid", "--fork", "--kill-child"),
    ),
    ("network namespace", ("--net",)),
    ("network namespace (user ns)", ("--map-root-user", "--net")),
)


class SandboxError(RuntimeError):
    """The sandbox itself cannot work here (missing tool, a worker that cannot boot)."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 5.0
    memory_mb: int = 1024  # RLIMIT_AS of a whole VM; it needs ~600 MiB to boot
    workers: int = 2
    max_output: int = 8192
    max_uses: int = 0  # candidates per VM; 0: as many as stay clean
    boot_timeout_s: float = 60.0


@dataclass(frozen=True)
class Outcome:
    status: Status
    tests: int = 0
    failures: int = 0
    warnings: int = 0
    output: str = ""
    seconds: float = 0.0
    worker_replaced: bool = False


@dataclass(frozen=True)
class Isolation:
    description: str
    prefix: tuple[str, ...]

    @property
    def network_isolated(self) -> bool:
        return bool(self.prefix)


@cache
def isolation() -> Isolation:
    """The strongest namespace isolation this kernel grants, probed once per process."""
    unshare = shutil.which("unshare")
    for description, flags in NAMESPACE_FLAGS if unshare else ():
        command = (unshare, *flags)
        probe = subprocess.run([*command, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return Isolation(description, command)
    return Isolation("none: this kernel refused a private network namespace", ())


def _required_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SandboxError(f"`{name}` is not installed (needed by the evaluation sandbox)")
    return path


def _worker_env(work_dir: Path) -> dict[str, str]:
    """A scrubbed environment: nothing of the host's (no credentials) reaches candidates."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work_dir),
        "TMPDIR": str(work_dir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "ERL_CRASH_DUMP_SECONDS": "0",
    }


def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from `fd`; None at end of file; TimeoutError past `deadline`."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            raise TimeoutError
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float) -> bytes | None:
    header = _read_exact(fd, 4, deadline)
    if header is None:
        return None
    return _read_exact(fd, int.from_bytes(header, "big"), deadline) if header != bytes(4) else b""


def write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(len(payload).to_bytes(4, "big") + payload)
    while view:
        view = view[os.write(fd, view) :]


def parse_reply(frame: bytes) -> tuple[Outcome, bool]:
    """The worker's reply as an outcome and whether the worker stayed clean."""
    header, _, output = frame.partition(b"\n")
    status, tests, failures, warnings, dirty = header.decode().split(" ")
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    outcome = Outcome(
        status=status,  # type: ignore[arg-type]
        tests=int(tests),
        failures=int(failures),
        warnings=int(warnings),
        output=output.decode(errors="replace"),
    )
    return outcome, dirty == "0"


def classify_death(stderr_tail: str, returncode: int | None) -> Status:
    """Status of a candidate whose worker died under it. Under RLIMIT_AS the VM either
    reports the failed allocation or, from JIT or thread-stack allocations, segfaults."""
    if returncode == -signal.SIGSEGV or any(sign in stderr_tail for sign in MEMORY_SIGNS):
        return "memory"
    return "runtime_error"


class BeamWorker:
    """One warm VM in its own process group and temporary directory."""

    def __init__(self, config: SandboxConfig, root: Path) -> None:
        self.config = config
        self.uses = 0
        self.dir = Path(tempfile.mkdtemp(prefix="beam-", dir=root))
        self._ready = False
        self._killed = False
        request_r, self._request_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        limits = [
            _required_tool("prlimit"),
            f"--as={config.memory_mb * 1024 * 1024}",
            f"--fsize={FILE_SIZE_LIMIT}",
            "--core=0",
            "--",
        ]
        server = [
            _required_tool("elixir"),
            "--erl",
            ERL_FLAGS,
            str(SERVER_SCRIPT),
            str(request_r),
            str(reply_w),
            str(int(config.timeout_s * 1000)),
            str(config.max_output),
            str(self.dir),
        ]
        with (self.dir / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(
                [*limits, *isolation().prefix, *server],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=(request_r, reply_w),
                start_new_session=True,
                cwd=self.dir,
                env=_worker_env(self.dir),
            )
        os.close(request_r)
        os.close(reply_w)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.config.boot_timeout_s
        try:
            frame = read_frame(self._reply_r, deadline)
        except TimeoutError:
            frame = None
        if frame != b"READY":
            self.kill()
            raise SandboxError(f"a sandbox worker did not boot: {self._stderr_tail()}")
        self._ready = True

    def run(self, program: str) -> tuple[Outcome, bool]:
        """Run one candidate; the outcome and whether this worker may serve another."""
        if not self._ready:
            self._await_ready()
        self.uses += 1
        started = time.monotonic()
        deadline = started + self.config.timeout_s
        try:
            write_frame(self._request_w, program.encode())
            frame = read_frame(self._reply_r, deadline)
        except TimeoutError:
            return Outcome(
                "timeout", output="wall-clock timeout", seconds=self.config.timeout_s
            ), False
        except BrokenPipeError:
            frame = None
        seconds = time.monotonic() - started
        if frame is None:
            self.kill()
            tail = self._stderr_tail()
            code = self.process.returncode
            output = f"worker died (exit status {code}): {tail}"
            return Outcome(classify_death(tail, code), output=output, seconds=seconds), False
        try:
            outcome, clean = parse_reply(frame)
        except ValueError as exc:
            return Outcome("runtime_error", output=f"garbled reply: {exc}", seconds=seconds), False
        reusable = clean and (self.config.max_uses == 0 or self.uses < self.config.max_uses)
        return replace(outcome, seconds=seconds), reusable

    def _stderr_tail(self) -> str:
        with suppress(OSError):
            data = (self.dir / "stderr.log").read_bytes()
            return data[-self.config.max_output :].decode(errors="replace").strip()
        return ""

    def kill(self) -> None:
        """Kill the worker's whole process group (once) and close its pipes."""
        if self._killed:
            return
        self._killed = True
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for fd in (self._request_w, self._reply_r):
            with suppress(OSError):
                os.close(fd)


class SandboxPool:
    """`workers` warm VMs; `run` is thread-safe, `map` runs many candidates in parallel."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.isolation = isolation()
        self.replaced = 0
        self._root = Path(tempfile.mkdtemp(prefix="exforge-sandbox-"))
        self._idle: queue.Queue[BeamWorker] = queue.Queue()
        self._all: set[BeamWorker] = set()

    def __enter__(self) -> SandboxPool:
        for _ in range(self.config.workers):
            self._spawn()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        worker = BeamWorker(self.config, self._root)
        self._all.add(worker)
        self._idle.put(worker)

    def _retire(self, worker: BeamWorker) -> None:
        worker.kill()
        shutil.rmtree(worker.dir, ignore_errors=True)
        self._all.discard(worker)
        self.replaced += 1
        self._spawn()

    def run(self, program: str) -> Outcome:
        worker = self._idle.get()
        try:
            outcome, reusable = worker.run(program)
        except BaseException:
            self._retire(worker)
            raise
        if reusable:
            self._idle.put(worker)
            return outcome
        self._retire(worker)
        return replace(outcome, worker_replaced=True)

    def map(
        self, programs: Iterable[str], on_done: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        """Outcomes in the order of `programs`; `on_done(index, outcome)` as each ends."""
        items = list(programs)

        def one(index: int) -> Outcome:
            outcome = self.run(items[index])
            if on_done is not None:
                on_done(index, outcome)
            return outcome

        with ThreadPoolExecutor(self.config.workers) as executor:
            return list(executor.map(one, range(len(items))))

    def close(self) -> None:
        for worker in list(self._all):
            worker.kill()
        self._all.clear()
        shutil.rmtree(self._root, ignore_errors=True)
