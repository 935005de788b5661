"""/proc helpers shared by the benchmark scripts: a process's descendants, and ending them by pid.

A script that makes itself a child subreaper (:func:`become_subreaper`) keeps every
process its jobs start as a descendant, orphans included, so :func:`descendants`
finds them; :func:`kill_exact` then ends exactly those (pid and start time), never a
process that took a pid over.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of everything this process starts re-parent to it: they stay countable."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0].decode()


def descendants(root: int | None = None) -> dict[int, int]:
    """{pid: start time} of the live (non-zombie) descendants of ``root`` (default: this process)."""
    kids: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None:
                info[int(name)] = st
                kids.setdefault(st[0], []).append(int(name))
    out: dict[int, int] = {}
    stack = [os.getpid() if root is None else root]
    while stack:
        for c in kids.get(stack.pop(), ()):
            if c not in out:
                stack.append(c)
                if info[c][2] != "Z":
                    out[c] = info[c][1]
    return out


def alive(procs: dict[int, int]) -> dict[int, int]:
    """Those of ``procs`` (pid -> start time) that still run as the same process (not zombies)."""
    left = {}
    for pid, start in procs.items():
        st = stat(pid)
        if st is not None and st[1] == start and st[2] != "Z":
            left[pid] = start
    return left


def kill_exact(procs: dict[int, int]) -> None:
    """SIGKILL each of ``procs`` that is still the same process; reap our zombies among them."""
    for pid in alive(procs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in procs:
        st = stat(pid)
        if st is not None and st[0] == os.getpid() and st[2] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def open_fds() -> set[int]:
    """This process's open fds."""
    return {int(n) for n in os.listdir("/proc/self/fd")}
