"""OS level: start a job's process, watch it exit, find and signal its process tree.

Nothing here runs Python code in a child. A job is started with ``os.posix_spawn``
(glibc: ``clone(CLONE_VM | CLONE_VFORK)`` and ``exec``, no error pipe that a
concurrently forked copy of the host could hold open) in a session of its own, so
it is the leader of its own process group and has no controlling terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import select
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("runner_spawn")

# posix_spawn has no "chdir" file action in Python, so a job with a cwd is started
# through /bin/sh: it changes directory and execs the real command in the same
# process (same pid). The shell is not Python, so no Python runs before the exec.
_SHELL = "/bin/sh"
_CD_AND_EXEC = 'cd -P -- "$0" || exit 127; exec "$@"'

# Signals reset to their default action in the child. Python ignores SIGPIPE and
# SIGXFSZ, and a host may ignore others; ignored signals would survive exec.
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_SIZE_FALLBACK = 1 << 20


def _high_fd(fd: int) -> int:
    """Return ``fd`` moved to 3 or above (close-on-exec), so dup2 onto 0-2 never aliases."""
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose ends are both fd 3 or above."""
    r, w = os.pipe()
    try:
        r = _high_fd(r)
    except BaseException:
        os.close(w)
        raise
    try:
        w = _high_fd(w)
    except BaseException:
        os.close(r)
        raise
    return r, w


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _inheritable_fds() -> list[int]:
    """The host's fds above 2 without close-on-exec: they would leak into the job."""
    found = []
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the directory's own fd, now closed
                if os.get_inheritable(fd):
                    found.append(fd)
    return found


def pipe_capacity(fd: int) -> int:
    """Bytes the pipe behind ``fd`` can hold (what a writer can have left in it)."""
    try:
        return max(int(fcntl.fcntl(fd, _F_GETPIPE_SZ)), 4096)
    except OSError:
        return _PIPE_SIZE_FALLBACK


def wait_readable(fds: Sequence[int], timeout: float | None) -> set[int]:
    """Sleep in poll() until one of ``fds`` is readable or ``timeout`` seconds pass."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    while True:
        try:
            return {fd for fd, _ in poller.poll(ms)}
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended, as ptyprocess reports it."""

    status: int | None  # raw wait status, None if someone else reaped the process
    exitstatus: int | None  # exit code, None when a signal ended it
    signalstatus: int | None  # signal number, None when it exited


def _decode_status(status: int) -> ExitStatus:
    if os.WIFSIGNALED(status):
        return ExitStatus(status, None, os.WTERMSIG(status))
    return ExitStatus(status, os.WEXITSTATUS(status), None)


# A copy of the host forked (without exec) while a job's pipes are open at both ends
# would hold the write end of the job's output: end of output would then wait for that
# copy, and the job's stdin would never see EOF. Forks in other threads therefore wait
# (os.register_at_fork, in the parent) while a spawn holds both ends. The section under
# this lock only makes pipes and calls posix_spawn: no logging, no other lock.
_spawn_lock = threading.RLock()

#: Environment variable that marks every process of a job with the job's identity.
JOB_MARKER_VAR = "RUNNER_SPAWN_JOB"
_markers = itertools.count(1)
_fork_hooks_registered = False


def _hold_forks_during_spawns() -> None:
    global _fork_hooks_registered
    with _children_lock:
        if not _fork_hooks_registered:
            os.register_at_fork(
                before=_spawn_lock.acquire,
                after_in_parent=_spawn_lock.release,
                after_in_child=_spawn_lock.release,
            )
            _fork_hooks_registered = True


_children: weakref.WeakValueDictionary[int, Child] = weakref.WeakValueDictionary()
_children_lock = threading.Lock()


def find_child(pid: int) -> Child | None:
    """The unreaped :class:`Child` this process started with ``pid``, if any."""
    with _children_lock:
        return _children.get(pid)


def _terminal_stdio(master: int, slave_path: str) -> tuple[int, int, list[tuple[Any, ...]]]:
    """(stdout_fd, stdin_fd, file actions) for a job on a pseudo-terminal; takes ``master``.

    The job opens the slave by path as fd 0 (1 and 2 are copies). posix_spawn runs
    file actions after setsid() (glibc's and musl's order), and a session leader
    without a controlling terminal that opens a terminal without O_NOCTTY acquires
    it: the terminal becomes the job's controlling terminal, its process group the
    foreground one. stdout_fd is ``master``, stdin_fd a copy of it, so that closing
    stdin leaves output readable.
    """
    try:
        stdin_fd = fcntl.fcntl(master, fcntl.F_DUPFD_CLOEXEC, 3)
    except BaseException:
        _close(master)
        raise
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, slave_path, os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_DUP2, 0, 2),
    ]
    return master, stdin_fd, actions


class Child:
    """A job process: stdin and stdout+stderr on pipes, a session of its own.

    Until :meth:`reap` the pid cannot be reused, so signalling it is safe. Exit is
    watched through a pidfd (Linux 5.3+), or else a thread blocked in
    ``waitid(WNOWAIT)`` that writes to a pipe; either way it is one fd to poll.
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, *, tty: tuple[int, str] | None = None
    ) -> None:
        """Start ``argv``. With ``tty`` (a pseudo-terminal's master fd and slave path)
        the job gets the terminal instead of pipes (see :func:`_terminal_stdio`)."""
        # Every process of the job inherits this variable (forks and execs alike), so
        # end_tree() can find the ones that left the job's tree of parents.
        self.marker = f"{os.getpid()}-{next(_markers)}-{secrets.token_hex(4)}"
        env = {**env, JOB_MARKER_VAR: self.marker}
        exe, spawn_argv = argv[0], list(argv)
        if cwd is not None:
            exe, spawn_argv = _SHELL, [_SHELL, "-c", _CD_AND_EXEC, cwd, *argv]
        _hold_forks_during_spawns()
        with _spawn_lock:
            stdin_r = stdout_w = -1
            if tty is not None:
                self.stdout_fd, self.stdin_fd, stdio = _terminal_stdio(*tty)
            else:
                stdin_r, self.stdin_fd = _pipe()
                try:
                    self.stdout_fd, stdout_w = _pipe()
                except BaseException:
                    _close(stdin_r)
                    _close(self.stdin_fd)
                    raise
                stdio = [
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 2),
                ]
            try:
                self.pid = os.posix_spawn(
                    exe,
                    spawn_argv,
                    env,
                    file_actions=[
                        *stdio,
                        # As close_fds=True in subprocess and ptyprocess: the job gets 0-2 only.
                        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()),
                    ],
                    setsid=True,
                    setsigdef=_DEFAULT_SIGNALS,
                    setsigmask=(),
                )
            except BaseException:
                _close(self.stdin_fd)
                _close(self.stdout_fd)
                raise
            finally:
                _close(stdin_r)
                _close(stdout_w)
        self.exit: ExitStatus | None = None
        self._waiter: threading.Thread | None = None
        self.exit_fd = self._open_exit_fd()

        with _children_lock:
            _children[self.pid] = self

    def _open_exit_fd(self) -> int:
        try:
            return os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass
        r, w = _pipe()

        def wait_for_exit() -> None:
            try:
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
            finally:
                os.write(w, b"x")
                os.close(w)

        self._waiter = threading.Thread(target=wait_for_exit, name=f"runner-spawn-wait-{self.pid}", daemon=True)
        self._waiter.start()
        return r

    @property
    def reaped(self) -> bool:
        return self.exit is not None

    def has_exited(self, timeout: float | None = 0.0) -> bool:
        """True once the process has ended (reaped or not); waits up to ``timeout``."""
        if self.exit is not None:
            return True
        return bool(wait_readable([self.exit_fd], timeout))

    def reap(self, block: bool) -> ExitStatus | None:
        """Collect the exit status; None while the process runs (``block=False``)."""
        if self.exit is not None:
            return self.exit
        if not block and not self.has_exited():
            return None
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            log.warning("pid %d was reaped by someone else; its exit status is unknown", self.pid)
            self.exit = ExitStatus(None, None, None)
        else:
            self.exit = _decode_status(status)
        with _children_lock:
            if _children.get(self.pid) is self:
                del _children[self.pid]
        return self.exit

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself; no-op once reaped."""
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group it leads; no-op once reaped."""
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def close_stdin(self) -> None:
        _close(self.stdin_fd)
        self.stdin_fd = -1

    def close(self) -> None:
        """Close every fd; the caller has reaped the process first."""
        self.close_stdin()
        _close(self.stdout_fd)
        self.stdout_fd = -1
        if self._waiter is not None:
            self._waiter.join()
            self._waiter = None
        _close(self.exit_fd)
        self.exit_fd = -1


# --- the job's process tree (Linux /proc) -------------------------------------------


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
            _close(self.fd)
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
            _close(self.fd)
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
