"""The host's side of the watchdog: starting it, and registering every job with it.

The first job of a host process starts that process's watchdog (the program in
:mod:`runner_spawn._watchdog`) with :func:`~runner_spawn._launch.spawn_in_session`:
``sys.executable -I -S`` on the program's file, an empty environment, fd 0 the
watchdog's end of a ``SOCK_SEQPACKET`` socket pair, fds 1 and 2 on /dev/null. Only the
host holds the other end: it is close-on-exec, so no job inherits it, and a forked copy
of the host closes its copy at once (``os.register_at_fork``), so that the host's death
is still seen.

A job's registration is confirmed before the job is spawned: :func:`watch` sends
``+MARKER`` (the job's ``RUNNER_SPAWN_JOB`` value) and ``?N``, and waits until the
watchdog sends ``N`` back, that is until a live watchdog has read the marker. A watchdog
that has exited, closed the socket, or not answered within :data:`ANSWER_WAIT` seconds
(stopped, stuck) is SIGKILLed, reaped (or, if it does not exit at once, reaped at a later
start) and replaced by a new one that is given every running job's marker;
:func:`watch` waits up to :data:`START_WAIT` seconds for that one's answer. If it does
not answer either, the job runs anyway and a warning is logged. Once a job is reaped,
``-MARKER`` is sent without waiting for an answer. Markers are
``<host pid>-<random token>-<n>``; the watchdog ignores every other marker.

Left open: a watchdog killed *after* it answered is noticed at the next job start only,
so if the host dies before that start, the jobs it was watching outlive the host.
"""

from __future__ import annotations

import _socket  # not socket: under gevent, socket.socketpair() makes its own objects
import contextlib
import logging
import os
import secrets
import select
import signal
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

from . import _watchdog
from ._launch import spawn_in_session, spawn_lock

log = logging.getLogger("runner_spawn")

#: ``RUNNER_SPAWN_WATCHDOG=0`` in the host's environment: no watchdog (read at each job start).
OPT_OUT_VAR = "RUNNER_SPAWN_WATCHDOG"
#: Seconds a running watchdog may take to confirm a registration before it is replaced.
ANSWER_WAIT = 2.0
#: Seconds a new watchdog may take to start and confirm every running job.
START_WAIT = 5.0
_REAP_WAIT = 1.0  # seconds to wait for a SIGKILLed watchdog's exit before reaping it later
_CHUNK = _watchdog.MAX_MESSAGE // 2  # markers per message at a start: well below what it reads

# All state below changes under spawn_lock, which os.fork() in another thread waits for
# (_launch.hold_forks_during_spawns): a forked copy never sees it half made.
_prefix = ""  # "<pid>-<token>-" of this process; made again in a forked copy
_prefix_pid = 0
_count = 0
_active: set[str] = set()  # markers of this process's jobs that have not been reaped
_sock: _socket.socket | None = None  # the host's end (the C socket: never gevent's)
_sock_id = (0, 0)  # its (st_dev, st_ino): tells whether the fd number is still ours
_pid = 0  # the watchdog's pid; 0: none
_pidfd = -1
_start_time = 0  # its start time (/proc/PID/stat): with the pid, names it for good
_owner = 0  # the pid of the process that started it
_asked = 0  # the last N sent in a "?N" line
_stale: list[tuple[int, int]] = []  # (pid, start time) of watchdogs let go of, not yet reaped
_fork_hook = False


def _host_prefix() -> str:
    """``<pid>-<token>-`` for this process (under spawn_lock)."""
    global _prefix, _prefix_pid, _count
    if _prefix_pid != os.getpid():
        _prefix, _prefix_pid, _count = f"{os.getpid()}-{secrets.token_hex(8)}-", os.getpid(), 0
    return _prefix


def new_marker() -> str:
    """A new ``RUNNER_SPAWN_JOB`` value, ``<pid>-<token>-<n>``: unique, and names this process."""
    global _count
    with spawn_lock:
        prefix = _host_prefix()
        _count += 1
        return f"{prefix}{_count}"


def watch(marker: str) -> None:
    """Register a job that is about to be spawned, and wait until a watchdog holds it.

    Starts or replaces the watchdog as needed (see the module's docstring). Call it
    before the job's ``posix_spawn``, not holding spawn_lock (it may log). If no watchdog
    confirms the job, the job runs anyway, with a warning. ``RUNNER_SPAWN_WATCHDOG=0``
    turns the watchdog off.
    """
    if os.environ.get(OPT_OUT_VAR) == "0":
        return
    replaced = None
    with spawn_lock:
        _active.add(marker)
        try:
            replaced, problem = _register(marker)
        except Exception as e:  # a job never fails because of its watchdog
            problem = f"{type(e).__name__}: {e}"
    if replaced:  # logged outside spawn_lock
        log.info("%s: replaced at the start of job %s", replaced, marker)
    if problem:
        log.warning("no watchdog confirmed job %s: it may outlive this process if this dies (%s)", marker, problem)


def unwatch(marker: str) -> None:
    """The job carrying ``marker`` was reaped, or never started. Never waits for an
    answer, never logs and never starts a watchdog, so it may run under spawn_lock."""
    with spawn_lock:
        if marker in _active:
            _active.discard(marker)
            with contextlib.suppress(Exception):  # reaping never fails because of the watchdog
                if _alive() and _deliver(f"-{marker}", answer=False) is not None:
                    _discard(kill=True)  # stuck: the next job start replaces it


@contextlib.contextmanager
def unwatch_on_error(marker: str) -> Iterator[None]:
    """:func:`unwatch` ``marker`` if the block raises (the job did not start)."""
    try:
        yield
    except BaseException:
        unwatch(marker)
        raise


def watchdog_pid() -> int | None:
    """The pid of this process's watchdog, or None while it has none (it starts lazily)."""
    return _pid if _pid and _owner == os.getpid() else None


def ensure_started() -> int | None:
    """Start the watchdog now if there is none (normally the first job does); its pid."""
    if os.environ.get(OPT_OUT_VAR) == "0":
        return None
    with spawn_lock:
        _host_prefix()
        problem = None if _alive() else _start()
    if problem:
        log.warning("no watchdog: %s", problem)
    return watchdog_pid()


def _register(marker: str) -> tuple[str | None, str | None]:
    """Have a live watchdog confirm ``marker`` (under spawn_lock): (what was replaced and
    why, or None; an error text, or None once confirmed)."""
    replaced = None
    if _alive():
        pid = _pid
        failed = _deliver(f"+{marker}", answer=True, wait=ANSWER_WAIT)
        if failed is None:
            return None, None
        replaced = f"watchdog pid {pid}: {failed.text}"
        _discard(kill=True)  # gone, or silent: a new one gets every running job
    return replaced, _start()


def _poll(fd: int, events: int, deadline: float) -> bool:
    """Whether ``fd`` has one of ``events`` before ``deadline`` (time.monotonic())."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000 + 0.999))))


class _Failed(NamedTuple):
    """Why a message was not confirmed: ``gone`` (it exited or closed the socket), or silent."""

    text: str
    gone: bool


def _deliver(text: str, answer: bool, wait: float = ANSWER_WAIT) -> _Failed | None:
    """Send one message to the watchdog (under spawn_lock, with one); with ``answer``,
    wait until it has read it. Both within ``wait`` seconds. None once done."""
    global _asked
    assert _sock is not None
    deadline = time.monotonic() + wait
    if answer:
        _asked += 1
        text += f"\n?{_asked}"
    flags = _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL
    while True:
        try:
            _sock.send(text.encode(), flags)
            break
        except BlockingIOError:  # it does not read (stopped?): wait for room, within the bound
            if not _poll(_sock.fileno(), select.POLLOUT, deadline):
                return _Failed(f"its socket stayed full for {wait:g} s", gone=False)
        except OSError as e:  # EPIPE, ECONNRESET: it died
            return _Failed(f"it is gone ({e})", gone=True)
    while answer:
        if not _poll(_sock.fileno(), select.POLLIN, deadline):
            return _Failed(f"it did not answer within {wait:g} s", gone=False)
        try:
            data = _sock.recv(64, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as e:
            return _Failed(f"it is gone ({e})", gone=True)
        if not data:
            return _Failed("it is gone (end of file)", gone=True)
        with contextlib.suppress(ValueError):  # answers to earlier questions come first
            if int(data) >= _asked:
                break
    return None


def _alive() -> bool:
    """Whether this process has a watchdog that runs and whose socket is still ours."""
    if _pid == 0:
        return False
    if _owner != os.getpid():  # a forked copy whose at-fork hook did not run
        _forget()
        return False
    assert _sock is not None
    try:
        st = os.fstat(_sock.fileno())
        ours = (st.st_dev, st.st_ino) == _sock_id
    except OSError:
        ours = False
    if not ours:  # someone closed our fds (the number may be another file now): let go
        _sock.detach()
        _discard(kill=False, fds_lost=True)
        return False
    if _pidfd >= 0:
        try:
            exited = os.waitid(os.P_PIDFD, _pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except OSError:  # reaped by someone else
            exited = True
        if exited:
            _discard(kill=False)
            return False
    return True


def _discard(kill: bool, fds_lost: bool = False) -> None:
    """Forget the watchdog: SIGKILL it if ``kill``, close our fds, reap it once it has exited.

    Never waits more than :data:`_REAP_WAIT` seconds: one that has not exited by then is
    reaped at a later start."""
    global _sock, _pid, _pidfd
    pid, pidfd, sock = _pid, _pidfd, _sock
    _sock, _pid, _pidfd = None, 0, -1
    if pid:
        _stale.append((pid, _start_time))
    if not fds_lost:  # else it read end of file and exits by itself
        if sock is not None:
            sock.close()
        if kill:
            with contextlib.suppress(OSError):  # it has already exited
                if pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                elif pid and _watchdog.proc_start(pid) == _start_time:
                    os.kill(pid, signal.SIGKILL)
        if pidfd >= 0:
            _poll(pidfd, select.POLLIN, time.monotonic() + _REAP_WAIT)
            os.close(pidfd)
    _reap_stale()


def _reap_stale() -> None:
    """Reap the watchdogs in ``_stale`` that have exited (never a process that took a pid over)."""
    for pid, start in list(_stale):
        if start and _watchdog.proc_start(pid) != start:  # reaped by someone else
            _stale.remove((pid, start))
            continue
        with contextlib.suppress(OSError):
            if os.waitpid(pid, os.WNOHANG)[0] != 0:
                _stale.remove((pid, start))


def _start() -> str | None:
    """Start a watchdog and have it confirm every running job (under spawn_lock); an
    error text or None. One that starts but does not answer in time is kept: the next
    job start replaces it if it is still silent."""
    global _sock, _sock_id, _pid, _pidfd, _owner, _fork_hook, _start_time
    _reap_stale()
    exe = sys.executable
    if not exe or not any(name in os.path.basename(exe) for name in ("python", "pypy")):
        return f"sys.executable is {exe!r}, not a Python interpreter"
    try:
        argv = [exe, "-I", "-S", *_program(), _host_prefix()]
        host_end, wd_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    except OSError as e:
        return str(e)
    # Blocking, whatever socket.setdefaulttimeout() says: the watchdog blocks in recv(0).
    wd_end.setblocking(True)
    try:
        stdio = [(os.POSIX_SPAWN_DUP2, wd_end.fileno(), 0), (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
        pid = spawn_in_session(exe, argv, {}, [*stdio, (os.POSIX_SPAWN_DUP2, 1, 2)])
    except OSError as e:
        host_end.close()
        return f"starting {exe}: {e}"
    finally:
        wd_end.close()
    st = os.fstat(host_end.fileno())
    _sock, _sock_id, _pid, _owner = host_end, (st.st_dev, st.st_ino), pid, os.getpid()
    _start_time = _watchdog.proc_start(pid) or 0
    try:
        _pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _pidfd = -1
    if not _fork_hook:
        os.register_at_fork(after_in_child=_forget)
        _fork_hook = True
    # Every running job, in messages it reads whole; it confirms the last one.
    lines = sorted(f"+{m}" for m in _active)
    deadline = time.monotonic() + START_WAIT
    while True:
        size, n = 0, 0
        while n < len(lines) and size + len(lines[n]) < _CHUNK:
            size, n = size + len(lines[n]) + 1, n + 1
        chunk, lines = lines[:n], lines[n:]
        last = not lines
        failed = _deliver("\n".join(chunk), answer=last, wait=max(0.0, deadline - time.monotonic()))
        if failed is not None:
            if failed.gone:
                _discard(kill=True)
            return f"the new watchdog (pid {pid}): {failed.text}"
        if last:
            return None


def _program() -> list[str]:
    """The watchdog's program: its file, or its source where it is no file (a zip)."""
    if os.path.isfile(_watchdog.__file__):
        return [_watchdog.__file__]
    loader = getattr(_watchdog, "__loader__", None)
    source = loader.get_source(_watchdog.__name__) if loader is not None else None
    if not source:
        raise OSError(f"no source for {_watchdog.__name__}")
    return ["-c", source]


def _forget() -> None:
    """In a forked copy of the host: close its copy of the socket (the host's death must
    still be seen) and forget the host's watchdog and jobs. No lock, no logging."""
    global _sock, _pid, _pidfd, _prefix_pid
    sock, pidfd = _sock, _pidfd
    _sock, _pid, _pidfd, _prefix_pid = None, 0, -1, 0
    _active.clear()
    _stale.clear()
    if sock is not None:
        sock.close()
    if pidfd >= 0:
        with contextlib.suppress(OSError):
            os.close(pidfd)
