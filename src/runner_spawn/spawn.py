"""RunnerSpawn: the part of ``pexpect.spawn`` that ``Runner.run()`` uses, on pipes.

Where it differs from ``pexpect.spawn`` (documented per method below):

- The child has pipes, not a terminal: output keeps ``\\n`` (no ``\\r\\n``), the
  child's ``isatty()`` is false, ``echo``, ``dimensions``, ``use_poll`` and
  ``ignore_sighup`` have no effect. stderr is merged into stdout.
- The child runs in a session of its own: it cannot reach the host's terminal,
  so ``getpass`` prompts arrive on the pipe where ``expect()`` sees them.
- ``PYTHONUNBUFFERED=1`` is added to the child's environment unless set.
- ``preexec_fn`` is refused: running Python between fork and exec is the hazard
  this class exists to remove.
- Where the output ends follows :mod:`runner_spawn._stream`: everything a job that
  exits by itself wrote is handed over (``expect()`` never times out on it), and a
  job the host ended hands over at most a quarter second of whole lines more.
  Unmatched output kept for ``before`` is bounded.
- ``delayafterread`` is None: no sleep after each read.
- An exception out of the supervising loop ends the job. When any exception other
  than pexpect's EOF or TIMEOUT leaves ``expect()`` (and its variants),
  ``read_nonblocking()`` or ``isalive()`` while the job runs (a signal handler's,
  ``KeyboardInterrupt``, ``SystemExit``, Celery's ``SoftTimeLimitExceeded``, RQ's
  ``JobTimeoutException``, gevent's ``Timeout``, a raising ``logfile_read``), the
  job's whole tree is ended first, as ``handle_runner_termination`` ends it, and
  then the exception goes on. ``Runner.run()`` never ends the job on that path.
  What was already handed to ``logfile_read`` stays there. The ending is bounded,
  never raises, and a further exception raised meanwhile (a second signal) does not
  interrupt it. A TIMEOUT does not end the job (Runner's final
  ``expect(EOF, timeout=5)`` lets one out).
- A spawn dropped while its job runs is freed when its last reference goes (no
  reference cycle), and ends its job then, as ``pexpect.spawn``'s finalizer does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pexpect.exceptions import EOF, TIMEOUT, ExceptionPexpect
from pexpect.popen_spawn import PopenSpawn
from pexpect.spawnbase import SpawnBase
from pexpect.utils import split_command_line, which

from . import _child, _container, _scope, _tree
from ._expect import ExpectRouting
from ._stream import OutputStream
from .termination import end_job_shielded

log = logging.getLogger("runner_spawn")

if TYPE_CHECKING:
    _PopenSpawnBase = PopenSpawn[Any]
else:
    _PopenSpawnBase = PopenSpawn

#: Bytes asked of the pipe per read. What one read brings is handed to
#: ``logfile_read`` in slices of at most ``maxread`` characters.
READ_CHUNK = 1 << 16
#: After the child exits, how long to keep reading output that other processes
#: (a background job, a forked copy of the host) may still write to the pipe.
DRAIN_GRACE = 0.25
#: How long terminate() waits after SIGTERM, and after SIGKILL, for the child.
TERMINATE_GRACE = 2.0


class RunnerSpawn(ExpectRouting, _PopenSpawnBase):
    """A ``PopenSpawn`` that takes ``pexpect.spawn``'s arguments and behaves like it.

    The child is started by :mod:`runner_spawn._child`: ``posix_spawn`` into a
    new session, pipes for stdin and stdout+stderr, no Python between fork and
    exec. The supervising thread sleeps in ``poll()`` while the child is quiet;
    there is no reader thread. Any exception but EOF or TIMEOUT that leaves
    ``expect()``, ``read_nonblocking()`` or ``isalive()`` while the job runs ends the
    job's whole tree before it goes on (see the module docstring).
    """

    #: The child has no terminal, so a container engine's ``--tty`` is dropped
    #: (:mod:`runner_spawn._container`). A spawn that gives the child a terminal sets False.
    drop_container_tty = True

    def __init__(
        self,
        command: str,
        args: Sequence[str] | None = None,
        timeout: float | None = 30,
        maxread: int = 2000,
        searchwindowsize: int | None = None,
        logfile: Any = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        ignore_sighup: bool = False,
        echo: bool = True,
        preexec_fn: Any = None,
        encoding: str | None = None,
        codec_errors: str = "strict",
        dimensions: tuple[int, int] | None = None,
        use_poll: bool = False,
        *,
        drain_grace: float = DRAIN_GRACE,
        max_unmatched: int | None = 1 << 20,
    ) -> None:
        """Start ``command`` with ``args``, as ``pexpect.spawn`` does.

        ``maxread`` (2000, as ``pexpect.spawn``) bounds each slice of output handed
        to ``logfile_read``, so a caller's timeout is checked between slices; the
        pipe itself is read 64 KiB at a time. ``echo``, ``dimensions``, ``use_poll`` and
        ``ignore_sighup`` are accepted and have no effect: there is no terminal to
        echo, size or hang up. ``drain_grace`` bounds the wait for output from
        processes other than the child after the child exits. ``max_unmatched``
        bounds the unmatched output kept for ``before`` (None: unbounded, as
        pexpect); it never changes what ``logfile_read`` receives.
        """
        refuse_preexec_fn(preexec_fn)
        SpawnBase.__init__(
            self,
            timeout=timeout,
            maxread=maxread,
            searchwindowsize=searchwindowsize,
            logfile=logfile,
            encoding=encoding,
            codec_errors=codec_errors,
        )
        self.crlf = self.linesep
        self.ignore_sighup = ignore_sighup
        self.echo = echo
        self.use_poll = use_poll
        self.drain_grace = drain_grace
        self.max_unmatched = max_unmatched
        self.delayafterterminate = TERMINATE_GRACE
        # pexpect sleeps this long after every read (0.1 ms, a PTY habit); under load
        # each sleep costs milliseconds and capped 50 MB of output at ~130 MB/s.
        # poll() already waits for output, so there is nothing to wait for here.
        self.delayafterread = None

        argv = _command_line(command, args)
        argv = _container.without_tty(argv) if self.drop_container_tty else argv
        child_env = _child_env(env)
        path = which(argv[0], env=child_env)
        if path is None:
            raise ExceptionPexpect(f"The command was not found or was not executable: {argv[0]}.")
        argv[0] = path
        workdir = None
        if cwd is not None:
            workdir = os.path.abspath(os.fspath(cwd))
            if not os.path.isdir(workdir):
                raise ExceptionPexpect(f"The working directory does not exist or is not a directory: {workdir}.")
        try:
            self._child = self._start_child(argv, child_env, workdir)
        except OSError as e:
            raise ExceptionPexpect(f"The command could not be started: {path}: {e}.") from e
        _scope.started(self)  # an exception leaving the Runner.run() that started it ends it

        self.command = path
        self.args = argv
        self.name = f"<RunnerSpawn pid={self._child.pid} {path}>"
        self.pid = self._child.pid
        self.child_fd = self._child.stdout_fd
        self.closed = False
        self.terminated = False
        # A plain function, not a bound method: the stream must not hold the spawn
        # (a cycle would keep a dropped spawn, and its job, alive until a cyclic collection).
        self._output = OutputStream(self._child, type(self)._read_fd, encoding, codec_errors, drain_grace)

    def _start_child(self, argv: list[str], env: dict[str, str], workdir: str | None) -> _child.Child:
        """Start the child process (on pipes); subclasses give it other stdio."""
        return _child.Child(argv, env, workdir)

    # --- reading ---------------------------------------------------------------------

    @staticmethod
    def _read_fd(fd: int) -> bytes:
        """One read of the child's output fd: b"" at its end."""
        return os.read(fd, READ_CHUNK)

    def _end_on_unwind(self, why: str = "an exception is leaving the supervising loop") -> None:
        """An exception is leaving the supervising loop (``why``): end the job's whole tree first.

        Bounded and never raising (:func:`~runner_spawn.termination.end_job_shielded`);
        nothing is done when the child has already exited.
        """
        child = getattr(self, "_child", None)
        if child is not None and not getattr(self, "terminated", False):  # also while __init__ runs
            end_job_shielded(child, self.delayafterterminate, why)

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> Any:
        """Return up to ``size`` characters, waiting at most ``timeout`` for output.

        Raises TIMEOUT when nothing arrives in time and EOF once the output has
        ended, by the rules of :mod:`runner_spawn._stream`. Any other exception
        (``logfile_read`` raising on a full disk or in an event handler, a signal
        handler raising while this waits) ends the job's whole tree before it goes
        on: ``Runner.run()`` lets it out of its loop and never reads or closes the
        job again, so the job would otherwise run on unread.
        """
        try:
            if timeout == -1:
                timeout = self.timeout
            text = self._output.take(size, timeout)
            if text is None:
                raise TIMEOUT("Timeout exceeded.")
            if not text:
                self.flag_eof = True
                raise EOF("End Of File (EOF).")
            self._write_logs(text, self.logfile_read)
        except (EOF, TIMEOUT):
            raise
        except BaseException:
            self._end_on_unwind()
            raise
        return text

    @property
    def output_dropped(self) -> int:
        """Output not handed over because the host ended the job (see ``_stream``, rule 2)."""
        return self._output.dropped

    def _write_logs(self, text: Any, second: Any) -> None:
        """Write to ``logfile`` and to ``second`` (``logfile_read`` or ``logfile_send``)."""
        for sink in (self.logfile, second):
            if sink is not None:
                sink.write(text)
                sink.flush()

    # --- status ----------------------------------------------------------------------

    def _record_exit(self, status: _child.ExitStatus) -> None:
        self.status = status.status
        self.exitstatus = status.exitstatus
        self.signalstatus = status.signalstatus
        self.terminated = True
        self._output.note_exit()

    def isalive(self) -> bool:
        """False once the child has exited; then ``exitstatus``/``signalstatus`` are set.

        Non-blocking, as in ptyprocess. A child killed by signal N has
        ``exitstatus`` None and ``signalstatus`` N.
        """
        if self.terminated:
            return False
        try:
            status = self._child.reap(block=False)
        except BaseException:
            self._end_on_unwind()
            raise
        if status is None:
            return True
        self._record_exit(status)
        return False

    def wait(self) -> int | None:
        """Block until the child exits and return ``exitstatus`` (as ``pexpect.spawn``).

        Like ptyprocess, it reads nothing: a child blocked on a full pipe never exits.
        """
        if not self.terminated:
            self._record_exit(self._child.reap(block=True) or _child.ExitStatus(None, None, None))
        return self.exitstatus

    # --- input and signals ---------------------------------------------------------------

    def send(self, s: Any) -> int:
        """Write ``s`` to the child's stdin; returns bytes written, 0 if stdin is closed.

        The text is never logged by this library (it may be a password).
        """
        if self.encoding is None and isinstance(s, str):
            s = s.encode("utf-8")
        self._write_logs(s, self.logfile_send)
        data = s if self.encoding is None else s.encode(self.encoding, self.codec_errors)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._child.stdin_fd, view)
                view = view[n:]
        except (BrokenPipeError, OSError) as e:
            log.debug("pid %d: stdin is closed (%s); %d bytes not sent", self.pid, type(e).__name__, len(view))
            return len(data) - len(view)
        return len(data)

    def sendeof(self) -> None:
        """Close the child's stdin (it then reads end of file)."""
        self._child.close_stdin()

    def kill(self, sig: int) -> None:
        """Send ``sig`` to the child if it is still alive (as ptyprocess)."""
        if self.isalive():
            self._child.signal(sig)

    def terminate(self, force: bool = False) -> bool:
        """End the job: SIGTERM to its process group; with ``force``, its whole tree.

        ptyprocess sends SIGHUP, SIGCONT and SIGINT to the child alone; a job on
        pipes has no hangup to simulate. Without ``force`` this sends SIGTERM (and
        SIGCONT) to the child's process group and waits up to
        ``delayafterterminate`` seconds. With ``force`` it ends the job's whole
        process tree as :func:`~runner_spawn.handle_runner_termination` does
        (SIGTERM, ``delayafterterminate`` seconds, SIGKILL to what is left,
        including processes in sessions of their own). Returns True when the child
        has exited.
        """
        if not self.isalive():
            return True
        self._child.ended_by_host = True
        if force:
            _tree.end_tree(self._child.pid, self.delayafterterminate, self._child.marker)
        else:
            self._child.signal_group(signal.SIGTERM)
            self._child.signal_group(signal.SIGCONT)
        self._child.has_exited(self.delayafterterminate)
        return not self.isalive()

    def close(self, force: bool = True) -> None:
        """Reap the child and close every pipe; idempotent.

        A child still running is ended with :meth:`terminate` (``force``), as in
        ptyprocess. Background processes of a child that already exited are left
        alone, as with a PTY and ``ignore_sighup``.
        """
        if self.closed:
            return
        if self.isalive() and not self.terminate(force):
            raise ExceptionPexpect("Could not terminate the child.")
        self.wait()
        self._child.close()
        self.child_fd = -1
        self.closed = True

    def __del__(self) -> None:
        # As ptyprocess: a spawn that is dropped while open is closed (and its job
        # ended) so that no process, fd or zombie is left behind. Nothing holds the
        # spawn but its users, so this runs when the last reference goes.
        if not getattr(self, "closed", True) and hasattr(self, "_child"):
            with contextlib.suppress(Exception):
                self._end_on_unwind("the spawn was dropped")
                self.close()

    def isatty(self) -> bool:
        """False: the child is on pipes."""
        return False


def refuse_preexec_fn(preexec_fn: Any) -> None:
    """Raise ValueError for a ``preexec_fn``: it is Python run between fork and exec."""
    if preexec_fn is not None:
        raise ValueError(
            "RunnerSpawn does not accept preexec_fn: it would run Python code in the child "
            "between fork and exec, which is the deadlock RunnerSpawn exists to avoid. "
            "Use cwd= and env= for the child's directory and environment, or wrap the "
            "command (for example ['nice', '-n', '5', ...] or ['sh', '-c', ...])."
        )


def _command_line(command: str, args: Sequence[str] | None) -> list[str]:
    if isinstance(args, (str, bytes)):
        raise TypeError("args must be a list of strings, not a single string: use args=[...]")
    if not isinstance(command, str) or not command:
        raise ExceptionPexpect(f"The command must be a non-empty string, not {command!r}.")
    if args:
        return [command, *args]
    argv: list[str] = split_command_line(command)  # type: ignore[no-untyped-call]
    if not argv:
        raise ExceptionPexpect("The command is empty.")
    return list(argv)


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The child's environment: ``env`` (or the host's), plus PYTHONUNBUFFERED=1."""
    child_env = dict(os.environ if env is None else env)
    for key, value in child_env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ExceptionPexpect(
                f"The environment must map str to str; {key!r} maps to a {type(value).__name__}. "
                "Convert the value with str() or remove it."
            )
    # On a pipe CPython block-buffers stdout: ansible's output would arrive in bursts,
    # late enough for idle_timeout to end a healthy job.
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    return child_env
