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
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pexpect.exceptions import EOF, TIMEOUT, ExceptionPexpect
from pexpect.expect import Expecter, searcher_re, searcher_string
from pexpect.popen_spawn import PopenSpawn
from pexpect.spawnbase import SpawnBase
from pexpect.utils import split_command_line, which

from . import _child, _container
from ._stream import OutputStream

log = logging.getLogger("runner_spawn")

if TYPE_CHECKING:
    _PopenSpawnBase = PopenSpawn[Any]
    _ExpecterBase = Expecter[Any]
else:
    _PopenSpawnBase = PopenSpawn
    _ExpecterBase = Expecter

#: Bytes asked of the pipe per read. What one read brings is handed to
#: ``logfile_read`` in slices of at most ``maxread`` characters.
READ_CHUNK = 1 << 16
#: After the child exits, how long to keep reading output that other processes
#: (a background job, a forked copy of the host) may still write to the pipe.
DRAIN_GRACE = 0.25
#: How long terminate() waits after SIGTERM, and after SIGKILL, for the child.
TERMINATE_GRACE = 2.0


class RunnerSpawn(_PopenSpawnBase):
    """A ``PopenSpawn`` that takes ``pexpect.spawn``'s arguments and behaves like it.

    The child is started by :mod:`runner_spawn._child`: ``posix_spawn`` into a
    new session, pipes for stdin and stdout+stderr, no Python between fork and
    exec. The supervising thread sleeps in ``poll()`` while the child is quiet;
    there is no reader thread.
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

        self.command = path
        self.args = argv
        self.name = f"<RunnerSpawn pid={self._child.pid} {path}>"
        self.pid = self._child.pid
        self.child_fd = self._child.stdout_fd
        self.closed = False
        self.terminated = False
        self._output = OutputStream(self._child, self._read_output, encoding, codec_errors, drain_grace)

    def _start_child(self, argv: list[str], env: dict[str, str], workdir: str | None) -> _child.Child:
        """Start the child process (on pipes); subclasses give it other stdio."""
        return _child.Child(argv, env, workdir)

    # --- reading ---------------------------------------------------------------------

    def _read_output(self) -> bytes:
        """One read of the child's output fd: b"" at its end."""
        return os.read(self._child.stdout_fd, READ_CHUNK)

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> Any:
        """Return up to ``size`` characters, waiting at most ``timeout`` for output.

        Raises TIMEOUT when nothing arrives in time and EOF once the output has
        ended, by the rules of :mod:`runner_spawn._stream`.
        """
        if timeout == -1:
            timeout = self.timeout
        text = self._output.take(size, timeout)
        if text is None:
            raise TIMEOUT("Timeout exceeded.")
        if not text:
            self.flag_eof = True
            raise EOF("End Of File (EOF).")
        self._write_logs(text, self.logfile_read)
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

    def expect_loop(self, searcher: Any, timeout: float | None = -1, searchwindowsize: int | None = -1) -> int:
        """pexpect's expect loop; output the child already wrote is never cut by timeout."""
        if timeout == -1:
            timeout = self.timeout
        return _Expecter(self, searcher, searchwindowsize).expect_loop(timeout)

    # pexpect's expect(), expect_list() and expect_exact() build a plain Expecter and
    # never call expect_loop(); these two route them through it.
    def expect_list(
        self,
        pattern_list: Any,
        timeout: float | None = -1,
        searchwindowsize: int | None = -1,
        async_: bool = False,
        **kw: Any,
    ) -> Any:
        """As pexpect's (``expect()`` calls it), through :meth:`expect_loop`."""
        if async_ or kw:
            base: Any = SpawnBase
            return base.expect_list(self, pattern_list, timeout, searchwindowsize, async_, **kw)
        return self.expect_loop(searcher_re(pattern_list), timeout, searchwindowsize)

    def expect_exact(
        self,
        pattern_list: Any,
        timeout: float | None = -1,
        searchwindowsize: int | None = -1,
        async_: bool = False,
        **kw: Any,
    ) -> Any:
        """As pexpect's, through :meth:`expect_loop`."""
        state: Any = self  # pexpect's private pattern helpers are not in its stubs
        if async_ or kw:
            base: Any = SpawnBase
            return base.expect_exact(self, pattern_list, timeout, searchwindowsize, async_, **kw)
        if isinstance(pattern_list, self.allowed_string_types) or pattern_list in (TIMEOUT, EOF):
            pattern_list = [pattern_list]
        patterns = []
        for pattern in pattern_list:
            if pattern in (TIMEOUT, EOF):
                patterns.append(pattern)
            elif isinstance(pattern, self.allowed_string_types):
                patterns.append(state._coerce_expect_string(pattern))
            else:
                state._pattern_type_err(pattern)
        return self.expect_loop(searcher_string(patterns), timeout, searchwindowsize)

    def _trim_unmatched(self) -> None:
        """Keep at most about ``2 * max_unmatched`` characters of unmatched output."""
        limit = self.max_unmatched
        state: Any = self  # pexpect's Expecter keeps its buffers in these private fields
        if limit is None or state._before.seek(0, io.SEEK_END) <= 2 * limit:
            return
        # The search window (_buffer) must stay a suffix of _before.
        keep = max(limit, state._buffer.seek(0, io.SEEK_END))
        tail = state._before.getvalue()[-keep:]
        state._before = state.buffer_type()
        state._before.write(tail)

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
        status = self._child.reap(block=False)
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
        """End the child's process group: SIGTERM, then SIGKILL if ``force``.

        ptyprocess sends SIGHUP, SIGCONT and SIGINT to the child alone; a job on
        pipes has no hangup to simulate, so this sends SIGTERM (and SIGCONT) to the
        child's process group and waits up to ``delayafterterminate`` seconds.
        Returns True when the child has exited.
        """
        if not self.isalive():
            return True
        self._child.ended_by_host = True
        self._child.signal_group(15)
        self._child.signal_group(18)
        if self._child.has_exited(self.delayafterterminate):
            return not self.isalive()
        if not force:
            return False
        self._child.signal_group(9)
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
        # As ptyprocess: a spawn that is dropped while open is closed (and its child
        # ended) so that no fd or zombie is left behind.
        if not getattr(self, "closed", True) and hasattr(self, "_child"):
            with contextlib.suppress(Exception):
                self.close()

    def isatty(self) -> bool:
        """False: the child is on pipes."""
        return False


class _Expecter(_ExpecterBase):
    """Expecter whose timeout never cuts off output that an exited child left behind.

    pexpect's loop counts the time ``logfile_read`` takes against the timeout, so a
    slow event handler made ``Runner.run()``'s final ``expect(EOF, timeout=5)``
    raise TIMEOUT with output still unread (ansible-runner issue 1343). Here a
    passed timeout ends the loop only when the stream is not ready
    (:meth:`OutputStream.ready`): while the child runs, or after its exit while
    another holder of the pipe may still write.
    """

    spawn: RunnerSpawn

    def expect_loop(self, timeout: float | None = -1) -> int:
        spawn = self.spawn
        end = None if timeout is None else time.monotonic() + timeout
        try:
            idx = self.existing_data()
            if idx is not None:
                return int(idx)
            while True:
                left = None if end is None else end - time.monotonic()
                if left is not None and left < 0 and not spawn._output.ready():
                    return int(self.timeout())
                spawn._trim_unmatched()
                incoming = spawn.read_nonblocking(spawn.maxread, None if left is None else max(left, 0.0))
                if spawn.delayafterread:
                    time.sleep(spawn.delayafterread)
                idx = self.new_data(incoming)
                if idx is not None:
                    return int(idx)
        except EOF as e:
            return int(self.eof(e))
        except TIMEOUT as e:
            return int(self.timeout(e))
        except BaseException:
            self.errored()
            raise


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
