"""Sandboxed execution of Elixir candidates on a pool of warm BEAM workers.

Each worker is one long-lived VM running sandbox_server.ex inside a bubblewrap (`bwrap`)
sandbox: its own user, mount, network, PID, IPC and UTS namespaces, running as an
unprivileged user (exforge running as root first drops to `nobody`), with a read-only view
of the system directories and the Elixir installation and nothing else of the host's file
system but a small private home; under `prlimit` limits (address space, file size, no core
dumps, and OS processes, counted in the sandbox's own user namespace), with a scrubbed
environment, in its own session (so its own OS process group). The host sends it one
program at a time over a pipe pair and waits at most `timeout_s` (or the program's own
limit) for the reply.

Where the kernel refuses the namespaces (or bubblewrap is missing), `isolation()` says so
and a pool refuses to start unless its config allows unisolated workers: those run with
the same limits, session and environment, in a temporary directory, but see the host's
network, files and processes.

A worker serves candidates one after another, each in fresh Erlang processes, its own
working directory and captured, truncated output; after each candidate it kills what the
candidate left running, unloads the candidate's modules and compares the VM's global
state (and, isolated, the OS processes of its PID namespace and the files in its home)
with the baseline it took once at boot, so a change made between candidates counts too;
every loaded module is compared by checksum, and only Erlang's and Elixir's own may load
from object files on first use. Any difference, a crash, `System.halt`, `:init.stop`, a timeout or
a garbled reply gets the worker's whole process group killed and a fresh worker booted in
its place; the other candidates never see it. `max_uses=1` gives the strictest mode:
every candidate gets a freshly booted VM of its own.

Threat model: generated code that is wrong, wasteful or destructive (loops, floods,
halts, stray processes, global state, reaching for the network, files or processes of the
host), not code written to attack this sandbox from inside the VM: a candidate that
hunted down the worker's reply port inside a reused VM could forge its own result.
`max_uses=1` bounds what it could affect to its own result.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
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
SERVER_SOURCE = Path(__file__).with_name("sandbox_server.ex")
# What a VM runs: the server's modules (`server_modules()`, the first argument) loaded,
# then its main function with the other arguments.
SERVER_MAIN = (
    "[modules | args] = System.argv(); "
    "for {module, binary} <- :erlang.binary_to_term(File.read!(modules)), "
    "do: {:module, ^module} = :code.load_binary(module, String.to_charlist(modules), binary); "
    "Exforge.Sandbox.Server.main(args)"
)
# Compiles SERVER_SOURCE (the first argument) and writes its modules to the second.
SERVER_COMPILE = (
    "[source, out] = System.argv(); "
    "File.write!(out, :erlang.term_to_binary(Code.compile_file(source)))"
)
# One scheduler per VM, no busy waiting (the pool, not the VM, provides parallelism),
# a small process table, a literal area that fits under RLIMIT_AS, no break handler.
ERL_FLAGS = (
    "+S 1:1 +SDcpu 1:1 +SDio 1 +A 1 +sbwt none +sbwtdcpu none +sbwtdio none +P 32768 +MIscs 128 +Bd"
)
FILE_SIZE_LIMIT = 16 * 1024 * 1024
MEMORY_SIGNS = ("Cannot allocate", "bad_alloc", "Failed to create", "out of memory")
# OS processes and threads of one isolated VM (RLIMIT_NPROC; the VM itself has ~12).
PROCESS_LIMIT = 256
HOME_BYTES = 64 * 1024 * 1024  # the private home (tmpfs) of an isolated VM
UNPRIVILEGED_ID = 65534  # `nobody`: the uid and gid candidates run as
SANDBOX_HOME = "/sandbox"
SANDBOX_MODULES = "/exforge/sandbox_server.beams"
# Every namespace (bwrap brings up the sandbox's own loopback), the sandbox's uid and gid
# inside, a /proc of its PID namespace, a minimal /dev. Not --die-with-parent: its
# parent-death signal fires when the *thread* that started bwrap exits, and pool threads
# come and go; the host kills the worker's process group, which holds the namespace's init.
NAMESPACES = (
    "--unshare-all",
    "--unshare-user",
    "--uid",
    str(UNPRIVILEGED_ID),
    "--gid",
    str(UNPRIVILEGED_ID),
    "--proc",
    "/proc",
    "--dev",
    "/dev",
)
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/alternatives")
READ_ONLY_ONCE_MOUNTED = ("/", "/dev")  # the sandbox's own root and /dev, made read-only


class SandboxError(RuntimeError):
    """The sandbox itself cannot work here (missing tool, a worker that cannot boot)."""


class UnisolatedError(SandboxError):
    """The kernel refused the sandbox's namespaces and the caller did not allow running
    candidates without them."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 5.0
    memory_mb: int = 1024  # RLIMIT_AS of a whole VM; it needs ~600 MiB to boot
    workers: int = 2
    max_output: int = 8192
    max_uses: int = 0  # candidates per VM; 0: as many as stay clean
    boot_timeout_s: float = 60.0
    allow_unisolated: bool = False  # run without namespaces where the kernel refuses them
    # Elixir each VM compiles once at boot, before its baseline state is taken: modules
    # every program of this pool uses, kept loaded (a program that redefines one leaves
    # its VM dirty)
    prelude: str = ""


@dataclass(frozen=True)
class Program:
    """One Elixir file, `code` then `tests`. A worker compiles the same `tests` starting
    on the same line once and reuses them after any `code` that cannot change how they
    compile, with the outcome of compiling the whole file (sandbox_server.ex says when);
    likewise a `defprotocol` that `code` begins with (a prompt's, the same in every
    sample), loaded rather than compiled again."""

    code: str
    tests: str = ""
    # its wall-clock limit (None: the pool's `timeout_s`), e.g. the time each of the
    # candidates that share one program would have had alone
    timeout_s: float | None = None

    @property
    def text(self) -> str:
        return self.code + self.tests

    def request(self) -> bytes:
        """The worker's request: the code's size in bytes on a line, then the file."""
        code = self.code.encode()
        return f"{len(code)}\n".encode() + code + self.tests.encode()


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
    isolated: bool


def _required_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SandboxError(f"`{name}` is not installed (needed by the evaluation sandbox)")
    return path


def _installation(tool: str) -> Path:
    """The directory a tool is installed in (`…/bin/tool` → `…`), links resolved."""
    return Path(_required_tool(tool)).resolve().parent.parent


def _system_mounts() -> list[str]:
    """Read-only binds of /usr, the Elixir and Erlang installations, the top-level system
    directories (or their merged-/usr links) and the loader's files; nothing else."""
    mounts = ["--ro-bind", "/usr", "/usr"]
    for root in sorted({_installation("elixir"), _installation("erl")}):
        if not root.is_relative_to("/usr"):
            mounts += ["--ro-bind", str(root), str(root)]
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            mounts += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            mounts += ["--ro-bind", name, name]
    for name in SYSTEM_FILES:
        mounts += ["--ro-bind-try", name, name]
    return mounts


def _bubblewrap(mounts: list[str]) -> list[str]:
    """The command that runs what follows it in the sandbox with `mounts` added to the
    system's; exforge running as root drops to `nobody` first, so that the sandbox's
    processes are nobody's on the host too (and RLIMIT_NPROC binds them)."""
    drop_root = (
        [
            _required_tool("setpriv"),
            f"--reuid={UNPRIVILEGED_ID}",
            f"--regid={UNPRIVILEGED_ID}",
            "--clear-groups",
            "--",
        ]
        if os.geteuid() == 0
        else []
    )
    return [
        *drop_root,
        _required_tool("bwrap"),
        *NAMESPACES,
        *_system_mounts(),
        *mounts,
        *(arg for path in READ_ONLY_ONCE_MOUNTED for arg in ("--remount-ro", path)),
        "--",
    ]


@cache
def isolation() -> Isolation:
    """Whether this kernel grants the sandbox its namespaces, probed once per process."""
    if shutil.which("bwrap") is None:
        return Isolation("none: bubblewrap (bwrap) is not installed", False)
    probe = subprocess.run(
        [*_bubblewrap([]), "true"],
        capture_output=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip() or f"exit {probe.returncode}"
        return Isolation(f"none: bubblewrap could not set up the sandbox here ({reason})", False)
    return Isolation(
        "bubblewrap: private user, mount, network, PID, IPC and UTS namespaces, "
        "read-only system directories, a private home, unprivileged",
        True,
    )


def checked_isolation(allow_unisolated: bool) -> Isolation:
    """The isolation workers get; UnisolatedError where there is none and that is not
    allowed."""
    found = isolation()
    if not (found.isolated or allow_unisolated):
        raise UnisolatedError(f"refusing to run candidates unisolated: {found.description}")
    return found


@cache
def server_modules() -> Path:
    """The server's modules, compiled once for its source, this Elixir and this OTP release
    and kept in the user's cache: every VM loads them instead of compiling the server at
    boot (~27 M reductions, as many as ~55 candidates at 20 a problem, in every boot of a
    pool, every replacement of a dirty VM and every candidate of `max_uses=1`)."""
    key = hashlib.sha256(SERVER_SOURCE.read_bytes())
    for root, pattern in (
        (_installation("elixir"), "lib/elixir/ebin/elixir.app"),
        (_installation("erl"), "releases/*/OTP_VERSION"),
    ):
        for path in sorted(root.glob(pattern)):
            key.update(str(path).encode() + path.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exforge"
    modules = cache / f"sandbox-server-{key.hexdigest()[:20]}.beams"
    if modules.exists():
        return modules
    cache.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed: a concurrent pool sees none or all of it
    descriptor, name = tempfile.mkstemp(dir=cache, suffix=".partial")
    os.close(descriptor)
    partial = Path(name)
    compiled = subprocess.run(
        [_required_tool("elixir"), "-e", SERVER_COMPILE, str(SERVER_SOURCE), str(partial)],
        capture_output=True,
        check=False,
    )
    if compiled.returncode != 0:
        partial.unlink()
        reason = compiled.stderr.decode(errors="replace").strip()
        raise SandboxError(f"the sandbox server did not compile: {reason}")
    partial.replace(modules)
    return modules


def _worker_env(home: str, path: str) -> dict[str, str]:
    """A scrubbed environment: nothing of the host's (no credentials) reaches candidates."""
    return {
        "PATH": path,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "ERL_CRASH_DUMP_SECONDS": "0",
        # Every module a VM compiles (a candidate's, a sample's) runs once, mostly for
        # milliseconds: the SSA optimisation passes cost ~13 % of a candidate's
        # reductions, more than they save at run time. The code means the same, and the
        # compiler's warnings come from the passes before them.
        "ERL_COMPILER_OPTIONS": "[no_ssa_opt]",
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
    reports the failed allocation or, from JIT or thread-stack allocations, segfaults
    (a signal bubblewrap reports as 128 + its number)."""
    segfault = returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV)
    if segfault or any(sign in stderr_tail for sign in MEMORY_SIGNS):
        return "memory"
    return "runtime_error"


class BeamWorker:
    """One warm VM in its own process group, sandbox (where isolated) and temporary
    directory, which holds its stderr log (and, unisolated, is its home)."""

    def __init__(self, config: SandboxConfig, root: Path, isolated: bool) -> None:
        self.config = config
        self.uses = 0
        self.dir = Path(tempfile.mkdtemp(prefix="beam-", dir=root))
        self._ready = False
        self._killed = False
        request_r, self._request_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        fds = [request_r, reply_w]
        limits = [
            _required_tool("prlimit"),
            f"--as={config.memory_mb * 1024 * 1024}",
            f"--fsize={FILE_SIZE_LIMIT}",
            "--core=0",
        ]
        if isolated:
            fds.append(os.open(server_modules(), os.O_RDONLY))
            home, modules = SANDBOX_HOME, SANDBOX_MODULES
            wrap = _bubblewrap(
                [
                    *("--size", str(HOME_BYTES), "--tmpfs", home, "--chdir", home),
                    *("--ro-bind-data", str(fds[-1]), modules),
                ]
            )
            limits.append(f"--nproc={PROCESS_LIMIT}")
            erl_bin = Path(_required_tool("erl")).resolve().parent
            env = _worker_env(home, f"{erl_bin}:/usr/bin:/bin")
        else:
            home, modules, wrap = str(self.dir), str(server_modules()), []
            env = _worker_env(home, os.environ.get("PATH", "/usr/bin:/bin"))
        server = [
            str(Path(_required_tool("elixir")).resolve()),
            "--erl",
            ERL_FLAGS,
            "-e",
            SERVER_MAIN,
            modules,
            str(request_r),
            str(reply_w),
            str(int(config.timeout_s * 1000)),
            str(config.max_output),
            home,
            "1" if isolated else "0",
            base64.b64encode(config.prelude.encode()).decode(),
        ]
        try:
            with (self.dir / "stderr.log").open("wb") as stderr:
                self.process = subprocess.Popen(
                    [*wrap, *limits, "--", *server],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=fds,
                    start_new_session=True,
                    cwd=self.dir,
                    env=env,
                )
        finally:
            for fd in fds:
                os.close(fd)

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

    def run(self, program: Program) -> tuple[Outcome, bool]:
        """Run one candidate; the outcome and whether this worker may serve another."""
        if not self._ready:
            self._await_ready()
        self.uses += 1
        started = time.monotonic()
        limit = program.timeout_s or self.config.timeout_s
        deadline = started + limit
        try:
            write_frame(self._request_w, program.request())
            frame = read_frame(self._reply_r, deadline)
        except TimeoutError:
            return Outcome("timeout", output="wall-clock timeout", seconds=limit), False
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
        self.isolation = checked_isolation(self.config.allow_unisolated)
        self.replaced = 0
        self._root = Path(tempfile.mkdtemp(prefix="exforge-sandbox-"))
        # None: a worker could not be replaced (`_broken` says why), for every taker
        self._idle: queue.Queue[BeamWorker | None] = queue.Queue()
        self._all: set[BeamWorker] = set()
        self._broken: BaseException | None = None

    def __enter__(self) -> SandboxPool:
        for _ in range(self.config.workers):
            self._spawn()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        worker = BeamWorker(self.config, self._root, self.isolation.isolated)
        self._all.add(worker)
        self._idle.put(worker)

    def _retire(self, worker: BeamWorker) -> None:
        worker.kill()
        shutil.rmtree(worker.dir, ignore_errors=True)
        self._all.discard(worker)
        self.replaced += 1
        try:
            self._spawn()
        except BaseException as exc:
            # its slot is gone: whoever waits for a worker would wait forever
            self._broken = exc
            self._idle.put(None)
            raise

    def _take(self) -> BeamWorker:
        """An idle worker; SandboxError once a worker could not be replaced."""
        worker = self._idle.get()
        if worker is None:
            self._idle.put(None)
            raise SandboxError(
                f"a sandbox worker could not be replaced: {self._broken}"
            ) from self._broken
        return worker

    def run(self, program: str | Program) -> Outcome:
        """One program: a whole file, or code and tests a worker may compile once."""
        return self._run_on(self._take(), program)

    def _run_on(self, worker: BeamWorker, program: str | Program) -> Outcome:
        """`program` on `worker`, taken from the idle ones: put back, or replaced."""
        try:
            outcome, reusable = worker.run(
                program if isinstance(program, Program) else Program(program)
            )
        except BaseException:
            self._retire(worker)
            raise
        if reusable:
            self._idle.put(worker)
            return outcome
        self._retire(worker)
        return replace(outcome, worker_replaced=True)

    def map(
        self,
        programs: Iterable[str | Program],
        on_done: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Outcomes in the order of `programs`; `on_done(index, outcome)` as each ends.
        Programs with the same tests go to the worker that ran them first while it has
        them to run (it compiles those tests once: `Program`); an idle worker with none of
        its own left takes the next unclaimed tests, then helps another's."""
        items = list(programs)
        outcomes: list[Outcome | None] = [None] * len(items)
        schedule = _Affinity([_tests_key(item) for item in items])

        def serve() -> None:
            while True:
                worker = self._take()
                index = schedule.take(worker, lambda owner: owner in self._all)
                if index is None:
                    self._idle.put(worker)
                    return
                outcome = self._run_on(worker, items[index])
                outcomes[index] = outcome
                if on_done is not None:
                    on_done(index, outcome)

        with ThreadPoolExecutor(self.config.workers) as executor:
            for future in [executor.submit(serve) for _ in range(self.config.workers)]:
                future.result()
        return [outcome for outcome in outcomes if outcome is not None]

    def close(self) -> None:
        for worker in list(self._all):
            worker.kill()
        self._all.clear()
        shutil.rmtree(self._root, ignore_errors=True)


def _tests_key(program: str | Program) -> Hashable | None:
    """What a worker compiles once for `program` (its tests and their first line), or
    None: a whole file, nothing kept."""
    if isinstance(program, Program) and program.tests:
        return program.tests, program.code.count("\n")
    return None


class _Affinity:
    """Which program a worker runs next, each once: first those whose tests it claimed,
    in order; else the first whose tests are unclaimed (or claimed by a worker that is
    gone), claiming them; else the last of the longest queue of another's."""

    def __init__(self, keys: list[Hashable | None]) -> None:
        self._queues: dict[Hashable, deque[int]] = {}
        for index, key in enumerate(keys):
            # a program without tests to keep is a queue of its own
            self._queues.setdefault(("whole", index) if key is None else key, deque()).append(index)
        self._owners: dict[Hashable, object] = {}
        self._lock = threading.Lock()

    def take(self, worker: object, alive: Callable[[object], bool]) -> int | None:
        with self._lock:
            for key in [k for k, owner in self._owners.items() if owner is worker]:
                if self._queues[key]:
                    return self._queues[key].popleft()
                del self._owners[key], self._queues[key]
            for key, queue in self._queues.items():
                owner = self._owners.get(key)
                if queue and (owner is None or not alive(owner)):
                    self._owners[key] = worker
                    return queue.popleft()
            longest = max(self._queues.values(), key=len, default=None)
            return longest.pop() if longest else None
