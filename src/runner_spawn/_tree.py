"""The job's process tree (Linux /proc): listing it, freezing it, ending it.

Every signal goes through a pidfd, or a start-time check where the kernel has no
pidfds, so a pid that was reused meanwhile is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._child import JOB_MARKER_VAR
from ._fds import close_fd, wait_readable

log = logging.getLogger("runner_spawn")


@dataclass(frozen=True)
class ProcInfo:
    """One line of /proc/PID/stat, the fields that identify a process and its place."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with pid, names one process for good
    zombie: bool


def read_proc(pid: int) -> ProcInfo | None:
    """/proc/PID/stat of ``pid``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces and ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0] == b"Z")


def _all_procs() -> list[ProcInfo]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                procs.append(info)
    return procs


def _host_lineage() -> set[int]:
    """This process and its ancestors: never part of a job's tree."""
    lineage, pid = set(), os.getpid()
    while pid > 1 and pid not in lineage:
        lineage.add(pid)
        info = read_proc(pid)
        if info is None:
            break
        pid = info.ppid
    return lineage


def job_tree(roots: Iterable[ProcInfo]) -> list[ProcInfo]:
    """``roots``, their live descendants and the members of their sessions.

    Descendants are found through parent links, so workers that moved into sessions
    of their own (ansible-core 2.19+) are included. A process that started before its
    root cannot be its descendant; the host and its ancestors are never included.
    """
    if not os.path.isdir("/proc"):  # pragma: no cover - non-Linux: the roots alone
        return list(roots)
    procs = _all_procs()
    by_pid = {p.pid: p for p in procs}
    # A root whose pid now names another process (it ended, the pid was reused) is
    # dropped: its "descendants" would be strangers.
    roots = [r for r in roots if r.pid in by_pid and by_pid[r.pid].start == r.start]
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found = {r.pid: r for r in roots}
    stack = list(roots)
    while stack:
        parent = stack.pop()
        for c in children.get(parent.pid, ()):
            if c.pid not in found and c.start >= parent.start:
                found[c.pid] = c
                stack.append(c)
    for r in roots:
        if r.sid == r.pid:
            for p in procs:
                if p.sid == r.pid and p.start >= r.start:
                    found.setdefault(p.pid, p)
    for pid in _host_lineage():
        found.pop(pid, None)
    return list(found.values())


def marked_processes(marker: str) -> list[ProcInfo]:
    """Processes whose environment holds ``JOB_MARKER_VAR=marker`` (see :class:`Child`)."""
    needle = f"{JOB_MARKER_VAR}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        info = read_proc(int(name))
        if info is not None:
            found.append(info)
    return found


class ProcHandle:
    """A process found in a job's tree, signalled without the risk of pid reuse.

    Holds a pidfd where the kernel has them; otherwise checks that the pid still
    has the start time it had when it was found, just before each signal.
    """

    def __init__(self, info: ProcInfo) -> None:
        self.info = info
        self.fd = -1
        with contextlib.suppress(AttributeError, OSError):
            self.fd = os.pidfd_open(info.pid)
        if self.fd >= 0 and not self._same():
            # The pid was reused between reading /proc and opening the pidfd.
            close_fd(self.fd)
            self.fd = -2  # known gone

    def _same(self) -> bool:
        now = read_proc(self.info.pid)
        return now is not None and now.start == self.info.start

    def alive(self) -> bool:
        """False once the process has exited (a zombie counts as exited)."""
        if self.fd == -2:
            return False
        if self.fd >= 0:
            return not wait_readable([self.fd], 0)
        now = read_proc(self.info.pid)
        return now is not None and now.start == self.info.start and not now.zombie

    def signal(self, sig: int) -> None:
        if self.fd == -2:
            return
        try:
            if self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            elif self._same():
                os.kill(self.info.pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:  # pragma: no cover - e.g. EPERM on a setuid descendant
            log.warning("could not signal pid %d: %s", self.info.pid, e)

    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)
        self.fd = -2


def _wait_all_gone(handles: Sequence[ProcHandle], deadline: float) -> None:
    """Wait (in poll, or 20 ms steps without pidfds) until all exited or the deadline."""
    while True:
        alive = [h for h in handles if h.alive()]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return
        fds = [h.fd for h in alive if h.fd >= 0]
        if len(fds) == len(alive):
            wait_readable(fds, left)
        else:
            time.sleep(min(left, 0.02))


def _freeze(root: ProcInfo, own_group: bool) -> dict[int, ProcHandle]:
    """SIGSTOP the job's tree and return it, complete.

    Stopped processes cannot fork, so the listing cannot miss a process started while
    it is taken (ansible-playbook forks workers that setsid() at once; one forked just
    then would escape a plain listing and outlive its parent). Stopping the group first
    is atomic: the kernel restarts a fork that races with a group signal.
    """
    if own_group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(root.pgid, signal.SIGSTOP)
    handles: dict[int, ProcHandle] = {}
    for _ in range(50):  # each round stops one more generation; trees are shallow
        new = [p for p in job_tree([root, *(h.info for h in handles.values())]) if p.pid not in handles]
        if not new:
            break
        for p in new:
            handles[p.pid] = h = ProcHandle(p)
            h.signal(signal.SIGSTOP)
    return handles


def end_tree(root_pid: int, grace: float, marker: str | None = None) -> int:
    """End ``root_pid`` and its whole tree: SIGTERM, up to ``grace`` seconds, SIGKILL.

    The tree is stopped while it is listed (:func:`_freeze`), then SIGTERM goes to the
    root's process group (ansible-playbook forwards it to its workers) and to every
    process of the tree, and everything is continued. Whatever is left after the grace
    period, including processes that moved to sessions of their own, lost their parent
    or were started meanwhile, gets SIGKILL; so does any process whose environment
    carries the job's ``marker`` (:class:`Child`): ansible-playbook can fork a worker
    just as it handles SIGTERM, and that worker, in a session of its own, with stdio on
    /dev/null and no parent left, is found only that way. The host, its process group
    and its ancestors are never signalled. Returns how many processes got SIGKILL.
    """
    root = read_proc(root_pid)
    if root is None or root.pid in _host_lineage():
        if root is not None:
            log.error("refusing to terminate pid %d: it is this process or one of its ancestors", root_pid)
        return 0
    own_group = root.pgid != os.getpgrp() and root.pgid == root.pid
    handles: dict[int, ProcHandle] = {}
    try:
        try:
            handles = _freeze(root, own_group)
            log.debug("terminating job pid %d: %d processes in its tree", root_pid, len(handles))
            if own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(root.pgid, signal.SIGTERM)
            for h in handles.values():
                h.signal(signal.SIGTERM)
        finally:
            # Never leave anything stopped, whatever happened above.
            if own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(root.pgid, signal.SIGCONT)
            for h in handles.values():
                h.signal(signal.SIGCONT)
        _wait_all_gone(list(handles.values()), time.monotonic() + grace)

        # Whatever is left, and anything the tree started meanwhile.
        late = job_tree([h.info for h in handles.values() if h.alive()])
        if marker is not None:
            host = _host_lineage()
            late += [p for p in marked_processes(marker) if p.pid not in host]
        for p in late:
            if p.pid not in handles and p.start >= root.start:
                handles[p.pid] = ProcHandle(p)
        survivors = [h for h in handles.values() if h.alive()]
        for h in survivors:
            h.signal(signal.SIGKILL)
        if survivors:
            log.info("job pid %d: %d processes outlived SIGTERM (%.1fs); SIGKILL", root_pid, len(survivors), grace)
            _wait_all_gone(survivors, time.monotonic() + 1.0)
        return len(survivors)
    finally:
        for h in handles.values():
            h.close()
