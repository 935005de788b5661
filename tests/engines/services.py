"""Services the engine tests start and stop by pid: redis-server and engine workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests import procs

REPO = Path(__file__).resolve().parent.parent.parent
REDIS_ADVICE = (
    "redis-server not found: install it to run the task-engine tests (Debian/Ubuntu: apt-get install -y redis-server)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class Service:
    """A process this test run started, its output in ``log``; stopped by pid with its tree."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in a terminal reaches pytest only; its fixtures stop us
            )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_bytes().decode(errors="replace")

    def tree(self) -> dict[int, int]:
        """{pid: start} of this service and everything below it."""
        st = procs.stat(self.pid)
        root = {self.pid: st[2]} if st is not None and st[3] != "Z" else {}
        return {**root, **procs.descendants(self.pid)}

    def wait_output(self, text: str, timeout: float) -> None:
        wait_for(lambda: text in self.output(), timeout, f"{self.name}: {text!r} in its output", self.proc)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Send ``sig`` to the service; SIGKILL what is left of its tree after ``grace`` s."""
        tree = self.tree()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        tree.update(procs.descendants(self.pid) if self.proc.poll() is None else {})
        procs.kill_all(tree)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_redis(directory: Path, started: Callable[[Service], object]) -> tuple[Service, str]:
    """redis-server on a free 127.0.0.1 port, no persistence, its files in ``directory``.

    ``started`` is called with the service as soon as it runs (so it is stopped if it
    never gets ready)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError(REDIS_ADVICE)
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        exe,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    redis = Service("redis-server", argv, directory / "redis.log")
    started(redis)
    redis.wait_output("Ready to accept connections", 30)
    return redis, f"redis://127.0.0.1:{port}/0"


def python_service(name: str, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Service:
    """``sys.executable args...`` run from the repository root (so ``tests.engines`` imports)."""
    return Service(name, [sys.executable, *args], log, env)
