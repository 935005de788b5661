"""Starting a job's process: posix_spawn in a session of its own, and watching it exit.

Nothing here runs Python code in a child. A job is started by
:func:`runner_spawn._launch.spawn_in_session` (``posix_spawn``, no error pipe that a
concurrently forked copy of the host could hold open) in a session of its own, so it
is the leader of its own process group and has no controlling terminal. Before that,
the job's marker is registered with the host's watchdog
(:mod:`runner_spawn._watchdog_client`), which ends the job if the host dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _watchdog_client
from ._fds import close_fd, pipe, wait_readable
from ._launch import hold_forks_during_spawns as hold_forks_during_spawns
from ._launch import spawn_in_session
from ._launch import spawn_lock as spawn_lock
from ._watchdog import JOB_MARKER_VAR as JOB_MARKER_VAR

log = logging.getLogger("runner_spawn")

# posix_spawn has no "chdir" file action in Python, so a job with a cwd is started
# through /bin/sh: it changes directory and execs the real command in the same
# process (same pid). The shell is not Python, so no Python runs before the exec.
SHELL = "/bin/sh"
_CD_AND_EXEC = 'cd -P -- "$0" || exit 127; exec "$@"'


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


# ioctl(pidfd, PIDFD_GET_INFO) with PIDFD_INFO_EXIT (Linux 6.15+): the kernel keeps an
# exited process's wait status for its pidfds, also after someone else reaped it (a host
# that ignores SIGCHLD, a thread in waitpid(-1), gevent's child watcher).
_PIDFD_INFO_SIZE = 64  # struct pidfd_info up to exit_code (offset 60), as in 6.15
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR(0xFF, 11, ...)
_PIDFD_INFO_EXIT = 1 << 3


def _status_from_pidfd(pidfd: int) -> int | None:
    """The wait status of the exited process behind ``pidfd``, or None where the kernel has none."""
    info = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", info, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info, True)
    except OSError:
        return None
    if not struct.unpack_from("=Q", info, 0)[0] & _PIDFD_INFO_EXIT:
        return None
    return int(struct.unpack_from("=i", info, 60)[0])


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
        close_fd(master)
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
        # end_tree() can find the ones that left the job's tree of parents, and the
        # watchdog can end them all if this process dies (_watchdog_client).
        self.marker = _watchdog_client.new_marker()
        env = {**env, JOB_MARKER_VAR: self.marker}
        exe, spawn_argv = argv[0], list(argv)
        if cwd is not None:
            exe, spawn_argv = SHELL, [SHELL, "-c", _CD_AND_EXEC, cwd, *argv]
        hold_forks_during_spawns()
        left_open: list[int] = []  # inheritable fds the job keeps (see _launch.inheritable_fds)
        _watchdog_client.watch(self.marker)  # returns once a watchdog holds the marker
        with spawn_lock, _watchdog_client.unwatch_on_error(self.marker):
            stdin_r = stdout_w = -1
            if tty is not None:
                self.stdout_fd, self.stdin_fd, stdio = _terminal_stdio(*tty)
            else:
                stdin_r, self.stdin_fd = pipe()
                try:
                    self.stdout_fd, stdout_w = pipe()
                except BaseException:
                    close_fd(stdin_r)
                    close_fd(self.stdin_fd)
                    raise
                stdio = [
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 2),
                ]
            try:
                # As close_fds=True in subprocess and ptyprocess: the job gets 0-2 only.
                self.pid = spawn_in_session(exe, spawn_argv, env, stdio, left_open)
            except BaseException:
                close_fd(self.stdin_fd)
                close_fd(self.stdout_fd)
                raise
            finally:
                close_fd(stdin_r)
                close_fd(stdout_w)
        self.exit: ExitStatus | None = None
        #: Set when this process ends the job (cancel, timeouts, terminate()): its
        #: output then ends by a bound rather than by draining (see ``_stream``).
        self.ended_by_host = False
        if left_open:
            log.warning("fds %s are at or above RLIMIT_NOFILE and stay open in job pid %d", left_open, self.pid)
        self._waiter: threading.Thread | None = None
        try:
            self.exit_fd = self._open_exit_fd()
        except BaseException:
            # Out of fds (pidfd_open and the fallback pipe alike) or threads: a job that
            # cannot be watched is ended here, not left running unseen.
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            _watchdog_client.unwatch(self.marker)
            close_fd(self.stdin_fd)
            close_fd(self.stdout_fd)
            raise

        with _children_lock:
            _children[self.pid] = self

    def _open_exit_fd(self) -> int:
        try:
            return os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass
        r, w = pipe()

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
            # Reaped by someone else: the host ignores SIGCHLD (the kernel reaps), or
            # another thread waits for any child. A pidfd may still know the status.
            found = None if self._waiter is not None else _status_from_pidfd(self.exit_fd)
            if found is None:
                log.warning(
                    "pid %d was reaped by someone else (SIGCHLD %s in this process); its exit status is unknown",
                    self.pid,
                    "ignored" if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN else "not ignored",
                )
                self.exit = ExitStatus(None, None, None)
            else:
                self.exit = _decode_status(found)
        else:
            self.exit = _decode_status(status)
        with _children_lock:
            if _children.get(self.pid) is self:
                del _children[self.pid]
        _watchdog_client.unwatch(self.marker)
        return self.exit

    def _pid_is_ours(self) -> bool:
        """False once the pid may name another process: reaped here or by someone else."""
        if self.exit is not None:
            return False
        if not self.has_exited():
            return True
        try:  # exited: the pid stays ours while it is our zombie
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return False

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself; no-op once reaped."""
        if self._pid_is_ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group it leads; no-op once reaped."""
        if self._pid_is_ours():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def close_stdin(self) -> None:
        close_fd(self.stdin_fd)
        self.stdin_fd = -1

    def close(self) -> None:
        """Close every fd; the caller has reaped the process first."""
        self.close_stdin()
        close_fd(self.stdout_fd)
        self.stdout_fd = -1
        if self._waiter is not None:
            self._waiter.join()
            self._waiter = None
        close_fd(self.exit_fd)
        self.exit_fd = -1
