"""The watchdog program: it ends a host's running jobs once the host is gone.

A job runs in a session of its own (ansible-core 2.19+ workers even ``setsid()`` into
further sessions), so nothing the kernel does when the host dies (SIGKILL, the OOM
killer) reaches it: it would run on until its next write to the dead host's pipe. Each
host process that starts jobs runs one watchdog (started by
:mod:`runner_spawn._watchdog_client`, which has the host's side of this protocol), as
this file run by ``sys.executable -I -S``, alone in a session of its own, with fd 0 its
end of a ``SOCK_SEQPACKET`` socket pair that only the host holds the other end of.

It blocks in ``recv(0)`` (no CPU while idle) and keeps the set of running jobs. Each
message holds lines: ``+MARKER`` (a job is about to start), ``-MARKER`` (it was reaped),
and ``?N``: once the whole message is read, the watchdog sends ``N`` back, so that the
host knows the message's markers are held by a live watchdog. Markers without the host's
``<host pid>-<random token>-`` prefix (``argv[1]``) are ignored.

End of file means that no copy of the host's end is left: the host died, exec'd or
closed it. The watchdog then ends every process whose environment carries one of the
running jobs' markers, and their descendants: SIGSTOP until a scan finds nothing new (a
stopped process cannot fork), SIGTERM and SIGCONT, up to :data:`GRACE` seconds, SIGKILL
until a scan finds nothing left; then it exits. Processes are signalled through pidfds
(or after a start-time check), so a reused pid is never hit. Background processes of a
job that was already reaped are left running, as after a normal end of the run.

This file imports no package module and only cheap standard-library modules (the
watchdog runs it as a script, without site-packages); the host imports its constants
and /proc helpers from it.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import select
import signal
import sys
import time

#: Environment variable that marks every process of a job with the job's identity.
JOB_MARKER_VAR = "RUNNER_SPAWN_JOB"
#: Seconds between SIGTERM and SIGKILL once the host is gone.
GRACE = 1.0
#: The longest message the watchdog reads at once; the host sends shorter ones.
MAX_MESSAGE = 1 << 16
_MARKER_ENTRY = JOB_MARKER_VAR.encode() + b"="


def _readable(fds: list[int], timeout: float) -> bool:
    """Whether one of ``fds`` becomes readable within ``timeout`` seconds (poll: any fd number)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` (zombie or not), or None."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of ``pid`` if it runs (a zombie does not), else None."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def _marker(pid: int) -> bytes | None:
    """The ``RUNNER_SPAWN_JOB`` value in ``pid``'s environment, if readable and present."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for entry in env.split(b"\0"):
        if entry.startswith(_MARKER_ENTRY):
            return entry[len(_MARKER_ENTRY) :]
    return None


def _scan(markers: set[bytes]) -> dict[int, int]:
    """{pid: start time} of every process carrying one of ``markers`` and of their
    descendants (one that cleared its environment is still found through its parent).
    Never this process, never pid 1."""
    me = os.getpid()
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (me, 1):
            st = _stat(int(name))
            if st is not None:
                procs[int(name)] = st
    found = {pid: st[1] for pid, st in procs.items() if _marker(pid) in markers}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        parent = stack.pop()
        for child in children.get(parent, ()):
            if child not in found and procs[child][1] >= procs[parent][1]:
                found[child] = procs[child][1]
                stack.append(child)
    return found


class _Proc:
    """A process to end: signalled through a pidfd, or after a start-time check."""

    def __init__(self, pid: int, start: int) -> None:
        self.pid, self.start, self.fd = pid, start, -1
        with contextlib.suppress(AttributeError, OSError):
            self.fd = os.pidfd_open(pid)
        st = _stat(pid)
        if st is None or st[1] != start:  # gone, or the pid was reused since the scan
            self.close()

    def alive(self) -> bool:
        if self.fd >= 0:
            return not _readable([self.fd], 0)
        st = _stat(self.pid) if self.fd == -1 else None
        return st is not None and st[1] == self.start

    def signal(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            if self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            elif self.alive():
                os.kill(self.pid, sig)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -2  # gone


def _wait_gone(procs: list[_Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.alive()]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            return
        fds = [p.fd for p in alive if p.fd >= 0]
        if len(fds) == len(alive):
            _readable(fds, left)
        else:
            time.sleep(min(left, 0.02))


def end_jobs(markers: set[bytes], grace: float = GRACE) -> int:
    """End every process carrying one of ``markers``, and their descendants; returns how
    many were found. SIGSTOP until a scan finds nothing new, SIGTERM and SIGCONT, up to
    ``grace`` seconds, then SIGKILL until a scan finds nothing left."""
    procs: dict[int, _Proc] = {}

    def collect(sig: int) -> int:
        new = 0
        for pid, start in _scan(markers).items():
            if pid not in procs or procs[pid].start != start:
                procs[pid] = p = _Proc(pid, start)
                p.signal(sig)
                new += 1
        return new

    try:
        for _ in range(50):  # each round stops what the last one's processes had just forked
            if not collect(signal.SIGSTOP):
                break
    finally:
        for p in procs.values():
            p.signal(signal.SIGTERM)
            p.signal(signal.SIGCONT)
    _wait_gone(list(procs.values()), grace)
    for _ in range(50):
        live = [p for p in procs.values() if p.alive()]
        for p in live:
            p.signal(signal.SIGKILL)
        if not collect(signal.SIGKILL) and not live:
            break
        _wait_gone(live, 1.0)
    for p in procs.values():
        p.close()
    return len(procs)


def main(argv: list[str]) -> int:
    """The watchdog: read the host's messages until end of file, then end its running jobs."""
    prefix = argv[1].encode()
    sock = _socket.socket(fileno=0)  # kept open for the process's life
    sock.setblocking(True)
    active: set[bytes] = set()
    while True:
        try:
            data = sock.recv(MAX_MESSAGE)
        except BlockingIOError:  # someone made the socket non-blocking: block in recv anyway
            sock.setblocking(True)
            continue
        except OSError:
            data = b""
        if not data:
            break
        answer = None
        for line in data.split(b"\n"):
            kind, rest = line[:1], line[1:]
            if kind == b"?":
                answer = rest
            elif len(rest) > len(prefix) and rest.startswith(prefix):
                if kind == b"+":
                    active.add(rest)
                elif kind == b"-":
                    active.discard(rest)
        if answer is not None:
            # Never blocks and never raises SIGPIPE: a host that is gone or does not
            # read finds out by itself (no answer within its bound).
            with contextlib.suppress(OSError):
                sock.send(answer, _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL)
    if active:
        end_jobs(active)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
