"""TerminalSpawn: RunnerSpawn with a pseudo-terminal that is the child's controlling terminal.

Choose it for jobs that need a terminal: ``pause`` with a prompt, ``vars_prompt``,
or output that must match stock ansible-runner byte for byte (``\\r\\n`` line ends,
``isatty()`` true in the child). Everything else is RunnerSpawn's: no Python code
runs between fork and exec, the supervising thread sleeps in ``poll()``, the
child's whole tree is ended by ``handle_runner_termination``.

How the child gets its controlling terminal, with no Python in the child: the host
opens the pseudo-terminal (``os.openpty``, whose slave is opened with O_NOCTTY, so
the host never acquires it), sets window size and echo on it, and starts the child
with ``os.posix_spawn(setsid=True)`` and a file action that opens the slave by path
as fd 0. posix_spawn runs file actions after ``setsid()``, and on Linux a session
leader without a controlling terminal that opens a terminal acquires it. This was
chosen over ``setsid --ctty`` (an extra program whose pid is not the job's unless
it execs, and util-linux only) and over a helper interpreter calling
``os.login_tty`` (a second Python start-up per job, tens of milliseconds).

posix_spawn can neither change directory nor set a signal to SIG_IGN, so with
``cwd`` or ``ignore_sighup`` the child starts as ``/bin/sh``, which runs
``trap '' HUP`` and ``cd``, then execs the command in the same process (same pid,
same session, same terminal). The shell is not Python.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import _child
from .spawn import RunnerSpawn, refuse_preexec_fn

#: Window size (rows, columns) when none is given: ptyprocess's default.
DEFAULT_DIMENSIONS = (24, 80)

_IGNORE_HUP = "trap '' HUP"
_CHANGE_DIR = 'cd -P -- "$0" || exit 127'
_EXEC = 'exec "$@"'


def _trampoline(argv: list[str], workdir: str | None, ignore_sighup: bool) -> list[str]:
    """``argv``, behind a /bin/sh that ignores SIGHUP and/or changes directory first."""
    steps = ([_IGNORE_HUP] if ignore_sighup else []) + ([_CHANGE_DIR] if workdir is not None else [])
    if not steps:
        return argv
    # "$0" is the directory when there is one, else just the shell's name for messages.
    return [_child.SHELL, "-c", "; ".join([*steps, _EXEC]), workdir or argv[0], *argv]


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _set_echo(fd: int, echo: bool) -> None:
    attr = termios.tcgetattr(fd)
    attr[3] = attr[3] | termios.ECHO if echo else attr[3] & ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attr)


class TerminalSpawn(RunnerSpawn):
    """A RunnerSpawn whose child runs on a pseudo-terminal, as ``pexpect.spawn``'s does.

    A subclass rather than a RunnerSpawn option, so that pipe mode's code path
    stays as it is and ``install(terminal=True)`` can hand ansible-runner a class
    with ``pexpect.spawn``'s signature.

    Differences from RunnerSpawn: stdin, stdout and stderr are the terminal (output
    has ``\\r\\n``); ``echo``, ``dimensions`` (default 24x80) and ``ignore_sighup``
    take effect as in ``pexpect.spawn``; ``sendeof()`` sends the terminal's EOF
    character instead of closing stdin. The end of output is the terminal's hangup
    (EIO from the master once no process has the slave open), with the same
    ``drain_grace`` as pipes when a background process keeps the slave open.
    ``send()`` waits ``delaybeforesend`` (50 ms) first, as ``pexpect.spawn`` does.
    """

    #: The child has a terminal: a container engine's ``--tty`` is kept, as under stock.
    drop_container_tty = False

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
        **kwargs: Any,
    ) -> None:
        """Start ``command`` on a new terminal; arguments as for ``pexpect.spawn``.

        ``kwargs`` are RunnerSpawn's keyword-only options (``drain_grace``,
        ``max_unmatched``).
        """
        refuse_preexec_fn(preexec_fn)
        self._dimensions = DEFAULT_DIMENSIONS if dimensions is None else (int(dimensions[0]), int(dimensions[1]))
        super().__init__(
            command,
            args,
            timeout=timeout,
            maxread=maxread,
            searchwindowsize=searchwindowsize,
            logfile=logfile,
            cwd=cwd,
            env=env,
            ignore_sighup=ignore_sighup,
            echo=echo,
            preexec_fn=None,
            encoding=encoding,
            codec_errors=codec_errors,
            dimensions=dimensions,
            use_poll=use_poll,
            **kwargs,
        )
        self.crlf = "\r\n" if self.encoding is not None else b"\r\n"  # as pexpect.spawn
        self.name = self.name.replace("<RunnerSpawn", "<TerminalSpawn", 1)

    def _start_child(self, argv: list[str], env: dict[str, str], workdir: str | None) -> _child.Child:
        """Open a pseudo-terminal, size it, and start the child on its slave.

        The host keeps its slave fd until the child has opened the slave, then closes
        it: the master reports hangup once the job's processes close theirs. Python
        forks in other threads wait meanwhile (as for pipes, see ``_child``): a
        copy of the host holding the slave would keep the terminal from hanging up.
        """
        _child.hold_forks_during_spawns()
        with _child.spawn_lock:
            master, slave = os.openpty()
            handed_over = False
            try:
                _set_winsize(slave, *self._dimensions)
                _set_echo(slave, self.echo)
                slave_path = os.ttyname(slave)
                command = _trampoline(argv, workdir, self.ignore_sighup)
                handed_over = True  # from here on the Child owns the master, also when it fails
                return _child.Child(command, env, None, tty=(master, slave_path))
            finally:
                os.close(slave)
                if not handed_over:
                    os.close(master)

    @staticmethod
    def _read_fd(fd: int) -> bytes:
        """One read of the master; EIO means every slave fd is closed: end of output."""
        try:
            return RunnerSpawn._read_fd(fd)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise

    def send(self, s: Any) -> int:
        """Write ``s`` to the terminal after ``delaybeforesend`` seconds (50 ms), as ``pexpect.spawn``.

        Programs that prompt on a terminal often discard pending input right after
        showing the prompt (ansible's ``pause`` sets raw mode with TCSAFLUSH, getpass
        flushes too): an answer sent at once can be lost and the job then waits forever.
        Set ``delaybeforesend`` to None to send at once.
        """
        if self.delaybeforesend:
            time.sleep(self.delaybeforesend)
        return super().send(s)

    def sendline(self, s: Any = "") -> int:
        """Send ``s`` and a line end in one write (pipe mode writes them separately)."""
        if self.encoding is None and isinstance(s, str):
            s = s.encode("utf-8")
        return self.send(s + self.linesep)

    def sendeof(self) -> None:
        """Send the terminal's EOF character (usually ^D), as ``pexpect.spawn`` does.

        The child reads end of file if it is at the start of a line.
        """
        self._send_control_char(termios.VEOF, b"\x04")

    def sendintr(self) -> None:
        """Send the terminal's interrupt character (usually ^C): SIGINT to the foreground group."""
        self._send_control_char(termios.VINTR, b"\x03")

    def _send_control_char(self, index: int, default: bytes) -> None:
        try:
            char = termios.tcgetattr(self._child.stdin_fd)[6][index]
        except (termios.error, OSError):
            char = default
        RunnerSpawn.send(self, char if self.encoding is None else char.decode("latin-1"))  # no delay

    def getwinsize(self) -> tuple[int, int]:
        """The terminal's (rows, columns)."""
        packed = fcntl.ioctl(self._child.stdout_fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        rows, cols, _, _ = struct.unpack("HHHH", packed)
        return rows, cols

    def setwinsize(self, rows: int, cols: int) -> None:
        """Resize the terminal; the child's foreground process group gets SIGWINCH."""
        _set_winsize(self._child.stdout_fd, rows, cols)

    def isatty(self) -> bool:
        """True while the terminal is open, as ``pexpect.spawn``."""
        return not self.closed and os.isatty(self._child.stdout_fd)
