"""Jobs never outlive their host: a watchdog process that ends them when the host dies.

A job runs in a session of its own (ansible-core 2.19+ workers even ``setsid()`` into
further sessions), so nothing the kernel does when the host dies (SIGKILL, the OOM
killer) reaches it: it would run on until its next write to the dead host's pipe.

Host side (imported as ``runner_spawn._watchdog``): the first job of a host process
starts that process's watchdog with ``os.posix_spawn`` (no Python between fork and exec):
this file run by ``sys.executable -I -S``, in a session of its own (signals to the host's
process group do not reach it), every signal at its default action, an empty
environment, fd 0 the watchdog's end of a ``SOCK_SEQPACKET`` socket pair, fds 1 and 2
on /dev/null, no other fd. Only the host holds the other end: it is close-on-exec, so
no job inherits it, and a forked copy of the host closes its copy at once
(``os.register_at_fork``). Before a job is spawned the host sends ``+MARKER`` (the job's
``RUNNER_SPAWN_JOB`` value); once it is reaped, ``-MARKER``. Markers are
``<host pid>-<random token>-<n>``: the watchdog ignores every marker without its host's
``<host pid>-<random token>-`` prefix.

Watchdog side (``__main__``): it blocks in ``read(0)`` (no CPU while idle) and keeps the
set of running jobs. End of file means that no copy of the host's end is left: the host
died, exec'd or closed it. The watchdog then ends every process whose environment
carries one of those markers, and their descendants: SIGSTOP until a scan finds nothing
new (a stopped process cannot fork), SIGTERM and SIGCONT, up to :data:`GRACE` seconds,
SIGKILL until a scan finds nothing left; then it exits. Processes are signalled through
pidfds (or after a start-time check), so a reused pid is never hit. Background processes
of a job that was already reaped are left running, as after a normal end of the run.

Only cheap standard-library modules are imported at the top: the watchdog runs this
file as a script, without the package and without site-packages.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False  # typing costs the watchdog's start; mypy knows this name
if TYPE_CHECKING:
    import _socket
    from collections.abc import Iterator

#: ``RUNNER_SPAWN_WATCHDOG=0`` in the host's environment: no watchdog (read at each job start).
OPT_OUT_VAR = "RUNNER_SPAWN_WATCHDOG"
#: Seconds between SIGTERM and SIGKILL once the host is gone.
GRACE = 1.0
# _child.JOB_MARKER_VAR, not imported: the watchdog loads no package module.
_MARKER_VAR = b"RUNNER_SPAWN_JOB="
_MAX_MESSAGE = 1 << 16  # the watchdog reads one message of at most this many bytes
_SEND_WAIT = 1.0  # seconds a full socket may take to drain before the watchdog counts as stuck


# --------------------------------------------------------------------------- host side
# All state below changes under _child.spawn_lock, which os.fork() in another thread
# waits for (_child.hold_forks_during_spawns): a forked copy never sees it half made.

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
_stale: list[tuple[int, int]] = []  # (pid, start time) of watchdogs whose fds someone else closed
_fork_hook = False


def _spawn_lock() -> contextlib.AbstractContextManager[bool]:
    from ._child import spawn_lock  # _child imports this module: imported at call time

    return spawn_lock


def _host_prefix() -> str:
    """``<pid>-<token>-`` for this process (under spawn_lock)."""
    global _prefix, _prefix_pid, _count
    if _prefix_pid != os.getpid():
        import secrets

        _prefix, _prefix_pid, _count = f"{os.getpid()}-{secrets.token_hex(8)}-", os.getpid(), 0
    return _prefix


def new_marker() -> str:
    """A new ``RUNNER_SPAWN_JOB`` value, ``<pid>-<token>-<n>``: unique, and names this process."""
    global _count
    with _spawn_lock():
        prefix = _host_prefix()
        _count += 1
        return f"{prefix}{_count}"


def watch(marker: str) -> None:
    """Register a job that is about to be spawned; start the watchdog if there is none.

    Call it before the job's ``posix_spawn``, not holding spawn_lock (it may log). If no
    watchdog can be started the job runs without one, with a warning.
    ``RUNNER_SPAWN_WATCHDOG=0`` turns the watchdog off.
    """
    if os.environ.get(OPT_OUT_VAR) == "0":
        return
    with _spawn_lock():
        _active.add(marker)
        try:
            problem = _send(f"+{marker}", start=True)
        except Exception as e:  # a job never fails because of its watchdog
            problem = f"{type(e).__name__}: {e}"
    if problem:
        import logging

        log = logging.getLogger("runner_spawn")
        log.warning("no watchdog: jobs will outlive this process if it dies (%s)", problem)


def unwatch(marker: str) -> None:
    """The job carrying ``marker`` was reaped, or never started. Never logs and never
    starts a watchdog, so it may run under spawn_lock."""
    with _spawn_lock():
        if marker in _active:
            _active.discard(marker)
            with contextlib.suppress(Exception):  # reaping never fails because of the watchdog
                _send(f"-{marker}", start=False)


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
    with _spawn_lock():
        _host_prefix()
        if not _alive():
            _start()
    return watchdog_pid()


def _send(line: str, start: bool) -> str | None:
    """Send one message (under spawn_lock). With ``start``, a missing or dead watchdog is
    replaced (the new one gets every running job). Returns an error text or None."""
    import _socket

    if not _alive():
        return _start() if start else None
    assert _sock is not None
    deadline = time.monotonic() + _SEND_WAIT
    while True:
        try:
            _sock.send(line.encode(), _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL)
            return None
        except BlockingIOError:  # it does not read (stopped?): wait a little, then replace it
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
        except OSError:  # EPIPE, ECONNRESET: it died
            pass
        _discard(kill=True)
        return _start() if start else None


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
    """Forget the watchdog: SIGKILL it if ``kill``, reap it, close our fds."""
    global _sock, _pid, _pidfd
    pid, pidfd, sock = _pid, _pidfd, _sock
    _sock, _pid, _pidfd = None, 0, -1
    if fds_lost:  # it read end of file and exits by itself; reaped once it has
        _stale.append((pid, _start_time))
        _reap_stale()
        return
    if sock is not None:
        sock.close()
    if pidfd >= 0:
        if kill:
            with contextlib.suppress(OSError):  # it has already exited
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(OSError):  # reaped by someone else (a host that waits for any child)
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        os.close(pidfd)
    elif pid:
        if kill and _proc_start(pid) == _start_time:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)


def _reap_stale() -> None:
    """Reap the watchdogs in ``_stale`` that have exited (never a process that took a pid over)."""
    for pid, start in list(_stale):
        if _proc_start(pid) != start:  # reaped by someone else
            _stale.remove((pid, start))
            continue
        with contextlib.suppress(OSError):
            if os.waitpid(pid, os.WNOHANG)[0] != 0:
                _stale.remove((pid, start))


def _start() -> str | None:
    """Start a watchdog and give it every running job (under spawn_lock); an error or None."""
    global _sock, _sock_id, _pid, _pidfd, _owner, _fork_hook, _start_time
    import _socket  # not socket: under gevent, socket.socketpair() makes its own objects

    from ._child import _DEFAULT_SIGNALS, _inheritable_fds

    _reap_stale()
    exe = sys.executable
    if not exe or not any(name in os.path.basename(exe) for name in ("python", "pypy")):
        return f"sys.executable is {exe!r}, not a Python interpreter"
    try:
        argv = [exe, "-I", "-S", *_program(), _host_prefix()]
        host_end, wd_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    except OSError as e:
        return str(e)
    # Blocking, whatever socket.setdefaulttimeout() says: the watchdog blocks in read(0).
    wd_end.setblocking(True)
    try:
        pid = os.posix_spawn(
            exe,
            argv,
            {},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, wd_end.fileno(), 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
            setsigmask=(),
        )
    except OSError as e:
        host_end.close()
        return f"starting {exe}: {e}"
    finally:
        wd_end.close()
    st = os.fstat(host_end.fileno())
    _sock, _sock_id, _pid, _owner = host_end, (st.st_dev, st.st_ino), pid, os.getpid()
    _start_time = _proc_start(pid) or 0
    try:
        _pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _pidfd = -1
    if not _fork_hook:
        os.register_at_fork(after_in_child=_forget)
        _fork_hook = True
    # Every running job, in messages the watchdog reads whole; a new socket holds them all.
    lines = [f"+{m}" for m in sorted(_active)]
    while lines:
        size, n = 0, 0
        while n < len(lines) and size + len(lines[n]) < _MAX_MESSAGE // 2:
            size, n = size + len(lines[n]) + 1, n + 1
        chunk, lines = lines[:n], lines[n:]
        try:
            host_end.send("\n".join(chunk).encode(), _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL)
        except OSError as e:
            _discard(kill=True)
            return f"sending to the watchdog: {e}"
    return None


def _program() -> list[str]:
    """The watchdog's program: this file, or its source where it is no file (a zip)."""
    if os.path.isfile(__file__):
        return [__file__]
    loader = globals().get("__loader__")
    source = loader.get_source(__name__) if loader is not None else None
    if not source:
        raise OSError(f"no source for {__name__}")
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


# ----------------------------------------------------------------------- watchdog side


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


def _proc_start(pid: int) -> int | None:
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
        if entry.startswith(_MARKER_VAR):
            return entry[len(_MARKER_VAR) :]
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
    active: set[bytes] = set()
    while True:
        try:
            data = os.read(0, _MAX_MESSAGE)
        except BlockingIOError:  # someone made the socket non-blocking: block in read anyway
            os.set_blocking(0, True)
            continue
        except OSError:
            data = b""
        if not data:
            break
        for line in data.split(b"\n"):
            marker = line[1:]
            if len(marker) > len(prefix) and marker.startswith(prefix):
                if line[:1] == b"+":
                    active.add(marker)
                elif line[:1] == b"-":
                    active.discard(marker)
    if active:
        end_jobs(active)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
