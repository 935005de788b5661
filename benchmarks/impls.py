"""The three implementations under test, and Runner.run()'s way of driving a child.

- ``stock``: ``pexpect.spawn`` (a PTY through ptyprocess), constructed as
  ``ansible_runner.Runner.run()`` constructs it.
- ``popen``: pexpect's ``PopenSpawn`` as shipped, with the two methods Runner needs
  and it lacks (``isalive``, ``close``) added as thinly as possible.
- ``runner_spawn``: :class:`runner_spawn.RunnerSpawn`, constructed like ``stock``.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import pexpect
from pexpect.popen_spawn import PopenSpawn

import runner_spawn
from runner_spawn import RunnerSpawn

IMPLS = ("stock", "popen", "runner_spawn")
LABELS = {"stock": "pexpect.spawn", "popen": "PopenSpawn", "runner_spawn": "RunnerSpawn"}
#: Runner.run()'s pexpect_timeout default.
PEXPECT_TIMEOUT = 5


class PlainPopen(PopenSpawn):  # type: ignore[type-arg]
    """``PopenSpawn`` taking ``pexpect.spawn``'s arguments, plus ``isalive``/``close``.

    PTY-only options are dropped; the command is a list, as PopenSpawn wants.
    Nothing else of PopenSpawn's behaviour is changed (reader thread, 1 KiB reads,
    busy-polling ``read_nonblocking``).
    """

    def __init__(
        self,
        command: str,
        args: Sequence[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        encoding: str | None = None,
        codec_errors: str = "strict",
        **_pty_only: Any,
    ) -> None:
        super().__init__([command, *(args or [])], cwd=cwd, env=env, encoding=encoding, codec_errors=codec_errors)
        self.exitstatus: int | None = None
        self.signalstatus: int | None = None

    def isalive(self) -> bool:
        rc = self.proc.poll()
        if rc is None:
            return True
        self.exitstatus, self.signalstatus = (rc, None) if rc >= 0 else (None, -rc)
        return False

    def close(self, force: bool = True) -> None:
        if self.closed:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        self.isalive()
        self._read_thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.closed = True


def spawn(impl: str, argv: Sequence[str], cwd: str | None, env: Mapping[str, str]) -> Any:
    """Start ``argv`` with ``impl``, with the arguments Runner.run() passes."""
    if impl == "popen":
        return PlainPopen(argv[0], list(argv[1:]), cwd=cwd, env=env, encoding="utf-8", codec_errors="replace")
    cls: Any
    if impl == "stock":
        cls = pexpect.spawn
    elif impl == "runner_spawn":
        cls = RunnerSpawn
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")
    return cls(
        argv[0],
        list(argv[1:]),
        cwd=cwd,
        env=dict(env),
        ignore_sighup=True,
        encoding="utf-8",
        codec_errors="replace",
        echo=False,
        use_poll=True,
    )


def drive(child: Any, sink: Any) -> bool:
    """Runner.run()'s loop over ``child``; False when its final expect(EOF) timed out.

    Runner lets that TIMEOUT escape (the run fails); here it is caught so that the
    output it cut off can be counted.
    """
    child.logfile_read = sink
    while child.isalive():
        child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=PEXPECT_TIMEOUT, searchwindowsize=100)
    complete = True
    try:
        child.expect(pexpect.EOF, timeout=5)
    except pexpect.TIMEOUT:
        complete = False
    child.close()
    return complete


class CountingSink:
    """A ``logfile_read`` that counts what it receives and keeps nothing.

    ``\\r`` is not counted: a PTY turns each ``\\n`` into ``\\r\\n``.
    """

    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> None:
        self.chars += len(text) - text.count("\r")

    def flush(self) -> None:
        pass


def use_in_runner(impl: str) -> None:
    """Make ansible_runner.Runner.run() spawn with ``impl`` in this process."""
    if impl == "stock":
        return
    if impl == "runner_spawn":
        runner_spawn.install()
        return
    import ansible_runner.runner as runner_module

    view = types.ModuleType("pexpect")
    view.__dict__.update(vars(pexpect))
    view.spawn = PlainPopen  # type: ignore[attr-defined]
    runner_module.pexpect = view  # type: ignore[attr-defined]


def child_env() -> dict[str, str]:
    """The environment a job gets: the host's, as Runner passes it."""
    return dict(os.environ)
