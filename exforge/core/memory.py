"""A long-running process's heap: few malloc arenas, and freed memory given back.

A worker's live memory does not grow with the corpus (its Python objects and its native
in-use heap stay flat), but glibc keeps what is freed: each thread that allocates
(the event loop, `asyncio.to_thread`'s pool, RocksDB's flush and compaction threads)
gets an arena of its own, and free space between live chunks of an arena stays
resident until `malloc_trim` hands it back. Without that the resident size climbs with
every message handled. `limit_arenas` (before the threads start) and a periodic
`release_free_memory` keep the resident size near the live heap.

Both act only on glibc (Linux); elsewhere they do nothing and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

log = logging.getLogger("exforge.memory")

M_ARENA_MAX = -8  # mallopt parameter (glibc's malloc.h)


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim")):
        return None
    return libc


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas for this process (call before threads start);
    whether the allocator took it."""
    libc = _glibc()
    if libc is None:
        log.info("not glibc: malloc arenas left as they are")
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Give the free pages of every malloc arena back to the system; whether any were."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
