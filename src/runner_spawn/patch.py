"""install(), uninstall(), is_installed(): route ansible-runner's spawns through RunnerSpawn.

Only what ``ansible_runner.runner`` sees is changed: its module-level name
``pexpect`` is pointed at a view of pexpect whose ``spawn`` is RunnerSpawn,
``Runner.handle_termination`` is replaced, and ``Runner.run`` is wrapped so that any
exception leaving it while a job it started still runs ends that job's whole tree
first (:mod:`runner_spawn._scope`). The process-wide ``pexpect.spawn`` stays the
original, so other pexpect users keep their terminal spawn.
"""

from __future__ import annotations

import functools
import importlib
import re
import threading
import types
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pexpect

from . import _scope
from .spawn import RunnerSpawn
from .terminal import TerminalSpawn
from .termination import handle_runner_termination

#: ansible-runner versions this release is tested on: [low, high).
SUPPORTED_RUNNER = ((2, 3), (2, 5))
SUPPORTED_RUNNER_TEXT = ">=2.3,<2.5"

_lock = threading.RLock()
_originals: dict[str, Any] = {}  # what install() replaced; empty when not installed


class UnsupportedRunnerError(RuntimeError):
    """The installed ansible-runner is outside the range this release supports."""


class _PexpectView(types.ModuleType):
    """``pexpect`` as ``ansible_runner.runner`` sees it: ``spawn`` is RunnerSpawn."""

    spawn = RunnerSpawn

    def __getattr__(self, name: str) -> Any:
        return getattr(pexpect, name)


def _version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string: "2.4.3" -> (2, 4), "2.5.0rc1" -> (2, 5)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:2])


def runner_version() -> str:
    """The installed ansible-runner's version string."""
    return metadata.version("ansible-runner")


def check_runner_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedRunnerError` unless ansible-runner is in the supported range."""
    version = runner_version() if version is None else version
    low, high = SUPPORTED_RUNNER
    if not low <= _version_tuple(version) < high:
        raise UnsupportedRunnerError(
            f"runner-spawn supports ansible-runner {SUPPORTED_RUNNER_TEXT}, but {version} is installed. "
            f"Pin ansible-runner to {SUPPORTED_RUNNER_TEXT} or use a runner-spawn release that supports {version}."
        )


def _check_runner_shape(module: types.ModuleType) -> None:
    """Refuse a Runner whose run() no longer spawns the way the patch expects."""
    runner = getattr(module, "Runner", None)
    run = getattr(runner, "run", None)
    names = set(getattr(getattr(run, "__code__", None), "co_names", ()))
    missing = sorted({"pexpect", "spawn", "handle_termination", "logfile_read"} - names)
    if getattr(module, "pexpect", None) is None:
        missing.append("module-level pexpect")
    if runner is None or "handle_termination" not in vars(runner):
        missing.append("Runner.handle_termination")
    if runner is not None and "run" not in vars(runner):
        missing.append("Runner.run")
    if missing:
        try:
            version = runner_version()
        except metadata.PackageNotFoundError:
            version = "(version unknown)"
        raise UnsupportedRunnerError(
            f"runner-spawn cannot patch ansible-runner {version}: Runner.run() does not start jobs through "
            f"pexpect.spawn as ansible-runner {SUPPORTED_RUNNER_TEXT} does (not found: {', '.join(missing)}), "
            "so jobs would bypass or break the patch. "
            f"Pin ansible-runner to {SUPPORTED_RUNNER_TEXT} (pip install 'ansible-runner{SUPPORTED_RUNNER_TEXT}') "
            "or use a runner-spawn release that supports this ansible-runner; until then, do not call install()."
        )


def _terminate(cls: type, pid: int, pidfile: str | None = None, is_cancel: bool = True) -> None:
    handle_runner_termination(pid, pidfile=pidfile, is_cancel=is_cancel)


#: What the log says when a job is ended because an exception leaves Runner.run().
_WHY = "an exception is leaving Runner.run()"


def _wrap_run(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``Runner.run``, ending the jobs it started that still run when any exception leaves it.

    Spawns started during the call record themselves in its scope (one list append);
    the exception is re-raised unchanged once they are ended. Runner may already have
    closed the job's ``logfile_read`` (a raising ``cancel_callback``): the ending only
    signals and waits, it never reads or writes output.
    """

    @functools.wraps(run)
    def wrapper(self: Any) -> Any:
        jobs: list[_scope.Job] = []
        token = _scope.run_scope.set(jobs)
        try:
            return run(self)
        except BaseException:
            _scope.end_running(jobs, _WHY)
            raise
        finally:
            _scope.run_scope.reset(token)

    return wrapper


def _mode(terminal: bool) -> str:
    return "terminal" if terminal else "pipe"


def install(*, terminal: bool = False) -> None:
    """Make ansible-runner start jobs with RunnerSpawn. Idempotent and thread-safe.

    Call it once at startup, before jobs run; Runner objects that already exist are
    covered too. ``Runner.run`` is wrapped so that any exception leaving it while a
    job it started still runs (a raising ``cancel_callback``, a signal handler, a task
    engine's time limit) ends that job's whole tree before the exception goes on.
    Raises :class:`UnsupportedRunnerError` outside the supported ansible-runner
    range. With ``terminal=True`` jobs get a pseudo-terminal as
    their controlling terminal (:class:`~runner_spawn.terminal.TerminalSpawn`).
    Installing again in the same mode does nothing; in the other mode it raises
    RuntimeError: call :func:`uninstall` first.
    """
    _install(terminal=terminal)


def _install(*, terminal: bool, spawn: type[RunnerSpawn] | None = None, by: str = "install()") -> None:
    """:func:`install`, with the spawn class Runner gets (default: by mode) and who asked.

    ``runner_spawn.activation`` passes a class that keeps its variables out of jobs.
    Replaced: ``ansible_runner.runner.pexpect`` (a view whose ``spawn`` is that class),
    ``Runner.handle_termination`` and ``Runner.run`` (wrapped: an exception leaving it
    ends the jobs it started that still run); :func:`uninstall` puts back all three.
    """
    with _lock:
        if not _originals:
            check_runner_version()
            # The first import of ansible_runner.runner may activate runner-spawn
            # (runner_spawn.activation), which installs through here, in this thread.
            module = importlib.import_module("ansible_runner.runner")
        if _originals:
            if _originals["terminal"] != terminal:
                raise RuntimeError(
                    f"runner-spawn is already installed in {_mode(_originals['terminal'])} mode "
                    f"(by {_originals['by']}); call runner_spawn.uninstall() before install(terminal={terminal})."
                )
            return
        _check_runner_shape(module)
        view = _PexpectView("pexpect", doc="pexpect as seen by ansible_runner.runner (runner-spawn)")
        runner_cls = module.Runner
        _originals["module"] = module
        _originals["pexpect"] = module.pexpect
        _originals["handle_termination"] = vars(runner_cls)["handle_termination"]
        _originals["run"] = vars(runner_cls)["run"]
        _originals["terminal"] = terminal
        _originals["by"] = by
        if spawn is not None:
            view.spawn = spawn
        elif terminal:
            view.spawn = TerminalSpawn
        setattr(module, "pexpect", view)  # noqa: B010 - a module attribute, set by name
        runner_cls.handle_termination = classmethod(_terminate)
        runner_cls.run = _wrap_run(_originals["run"])


def uninstall() -> None:
    """Put back exactly what :func:`install` replaced. Idempotent."""
    with _lock:
        if not _originals:
            return
        module = _originals["module"]
        setattr(module, "pexpect", _originals["pexpect"])  # noqa: B010
        module.Runner.handle_termination = _originals["handle_termination"]
        module.Runner.run = _originals["run"]
        _originals.clear()


def is_installed() -> bool:
    """Whether ansible-runner currently spawns through RunnerSpawn."""
    with _lock:
        return bool(_originals)


def installed_by() -> tuple[str, bool] | None:
    """(who installed the patch, terminal mode) while installed, else None."""
    with _lock:
        return (_originals["by"], _originals["terminal"]) if _originals else None
