"""Test helpers that look at real processes through /proc (independent of the library)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make orphans of anything this test process starts re-parent to it, so they stay findable."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def stat(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, sid, start, state) of pid, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[3]), int(fields[19]), fields[0].decode()


def descendants(root: int | None = None) -> dict[int, int]:
    """{pid: start time} of every live (non-zombie) descendant of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    kids: dict[int, list[int]] = {}
    info = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None:
                info[int(name)] = st
                kids.setdefault(st[0], []).append(int(name))
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        for c in kids.get(stack.pop(), ()):
            if c not in out:
                stack.append(c)
                if info[c][3] != "Z":
                    out[c] = info[c][2]
    return out


def alive(procs: dict[int, int]) -> dict[int, int]:
    """Those of ``procs`` (pid -> start time) that still run as the same process."""
    left = {}
    for pid, start in procs.items():
        st = stat(pid)
        if st is not None and st[2] == start and st[3] != "Z":
            left[pid] = start
    return left


def kill_all(procs: dict[int, int]) -> None:
    """SIGKILL each of ``procs`` that is still the same process, then reap our zombie children."""
    for pid in alive(procs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    reap_orphans(procs)


def reap_orphans(procs: dict[int, int]) -> None:
    """Reap zombies among ``procs`` that were re-parented to this (subreaper) process."""
    me = os.getpid()
    for pid in procs:
        st = stat(pid)
        if st is not None and st[0] == me and st[3] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait until none of ``procs`` runs, or ``timeout``; return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = alive(procs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}
