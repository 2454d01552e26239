"""Waiting on processes that are not the test's children."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path


def still_running(pidfds: dict[int, int], timeout_s: float) -> list[int]:
    """Wait until the processes of `pidfds` (pidfd → pid: a pidfd turns readable when its
    process exits, whoever its parent is) have exited, closing and forgetting the pidfds
    of those that have; the pids still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while pidfds:
        ready, _, _ = select.select(list(pidfds), [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        for fd in ready:
            os.close(fd)
            del pidfds[fd]
    return sorted(pidfds.values())


def pidfds(pids: Iterable[int]) -> dict[int, int]:
    """pidfd → pid of those of `pids` still running (a pidfd, unlike a pid, is never
    reused for another process)."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it ended already
            fds[os.pidfd_open(pid)] = pid
    return fds


def wait_for_text(
    log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float, start: int = 0
) -> int:
    """Wait until `text` shows in the file `log` past byte `start`, written by `proc`
    (which must keep running meanwhile); the offset just past it."""
    needle = text.encode()
    deadline = time.monotonic() + timeout_s
    while True:
        with log.open("rb") as handle:
            handle.seek(start)
            found = handle.read().find(needle)
        if found >= 0:
            return start + found + len(needle)
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{tail}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{tail}"
        time.sleep(0.05)


def wait_while_logging(proc: subprocess.Popen[bytes], log: Path, quiet_s: float) -> int | None:
    """Wait for `proc` to exit for as long as it makes progress, which is to say its log
    file `log` grows at least every `quiet_s` seconds (however slow a loaded machine
    makes it); its exit code, or None once it has logged nothing for `quiet_s`."""
    size, since = -1, time.monotonic()
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=0.2)
        grown = log.stat().st_size
        if grown != size:
            size, since = grown, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return None
