"""Run a command where the kernel refuses new namespaces:
`python tests/support/no_namespaces.py CMD…`.

The command runs in a user namespace of its own whose namespace limits
(`/proc/sys/user/max_*_namespaces`, kept per user namespace and checked up the tree) are
all 0, so every `unshare`/`clone` of a namespace inside it fails with ENOSPC, as on a
kernel that grants none. The user namespace maps the invoking user to itself (root: the
ids 0-65535, so that root inside can still drop to `nobody`); nothing else changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

CLONE_NEWUSER = 0x10000000
NAMESPACE_KINDS = ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup", "time")
IDS_MAPPED_FOR_ROOT = 65536


def _map_ids(child: int) -> None:
    """Write the child's uid and gid maps from outside its new user namespace."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        uid_map = gid_map = f"0 0 {IDS_MAPPED_FOR_ROOT}\n"
    else:
        Path(f"/proc/{child}/setgroups").write_text("deny")
        uid_map, gid_map = f"{uid} {uid} 1\n", f"{gid} {gid} 1\n"
    Path(f"/proc/{child}/uid_map").write_text(uid_map)
    Path(f"/proc/{child}/gid_map").write_text(gid_map)


def _refuse_namespaces() -> None:
    for kind in NAMESPACE_KINDS:
        limit = Path(f"/proc/sys/user/max_{kind}_namespaces")
        if limit.exists():
            limit.write_text("0\n")


def main(command: list[str]) -> int:
    if not command:
        sys.exit("usage: no_namespaces.py COMMAND [ARG…]")
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
            os.write(2, f"unshare: {os.strerror(ctypes.get_errno())}\n".encode())
            os._exit(125)
        os.write(unshared_w, b"x")
        if os.read(mapped_r, 1) != b"x":
            os._exit(125)
        _refuse_namespaces()
        os.execvp(command[0], command)
    os.close(unshared_w)
    os.close(mapped_r)
    if os.read(unshared_r, 1) == b"x":
        _map_ids(child)
        os.write(mapped_w, b"x")
    os.close(mapped_w)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
