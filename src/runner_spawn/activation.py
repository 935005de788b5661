"""Activation by environment: the patch in programs whose code nobody changes.

``RUNNER_SPAWN_ACTIVATE=pipe`` (or ``terminal``) in the environment of a Python
process makes runner-spawn install itself, in that mode, when the process imports
``ansible_runner.runner``. The ``runner_spawn_activate.pth`` file that the wheel
puts in site-packages arms the start-up hook (:mod:`_runner_spawn_activate`) when
the variable is set; the hook calls :func:`activate`.

- Jobs never see the variables: the spawn classes installed here start them with
  every ``RUNNER_SPAWN_ACTIVATE*`` variable removed from their environment.
- A refusal (unknown mode, unsupported ansible-runner) is written to stderr and
  logged on the ``runner_spawn`` logger; the program goes on with stock spawns.
  With ``RUNNER_SPAWN_ACTIVATE_STRICT=1`` the process exits with status 78 instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import site
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import patch
from .spawn import RunnerSpawn
from .terminal import TerminalSpawn

log = logging.getLogger("runner_spawn")

#: The variable that asks for activation, and its values.
VARIABLE = "RUNNER_SPAWN_ACTIVATE"
MODES = ("pipe", "terminal")
#: Set to 1 (true, yes, on) to make a refused activation end the process.
STRICT_VARIABLE = "RUNNER_SPAWN_ACTIVATE_STRICT"
#: The exit status of a strict refusal (sysexits' EX_CONFIG).
STRICT_EXIT = 78
#: The file that arms the hook, at the top of site-packages, and the module it imports.
PTH_NAME = "runner_spawn_activate.pth"
HOOK_MODULE = "_runner_spawn_activate"


class ActivationError(RuntimeError):
    """Activation was asked for with a value runner-spawn does not know."""


def requested(environ: Mapping[str, str] | None = None) -> str | None:
    """The value of RUNNER_SPAWN_ACTIVATE, or None when unset or empty (no activation)."""
    value = (os.environ if environ is None else environ).get(VARIABLE, "")
    return value or None


def parse_mode(value: str) -> bool:
    """``terminal`` for a mode value: False for ``pipe``, True for ``terminal``."""
    mode = value.strip().lower()
    if mode not in MODES:
        raise ActivationError(f"Unknown mode {value!r}: set {VARIABLE} to pipe or terminal, or unset it.")
    return mode == "terminal"


def requested_terminal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for terminal mode (False when unset or unknown)."""
    value = requested(environ)
    try:
        return value is not None and parse_mode(value)
    except ActivationError:
        return False


def is_strict(environ: Mapping[str, str] | None = None) -> bool:
    """Whether RUNNER_SPAWN_ACTIVATE_STRICT makes a refusal fatal."""
    value = (os.environ if environ is None else environ).get(STRICT_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def job_environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` (or this process's environment) without the activation variables."""
    source = os.environ if env is None else env
    return {key: value for key, value in source.items() if not key.startswith(VARIABLE)}


class _JobEnvironment:
    """Spawn mixin: the job starts without RUNNER_SPAWN_ACTIVATE* in its environment."""

    #: Position of ``env`` among pexpect.spawn's positional parameters.
    ENV_POSITION = 7

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > self.ENV_POSITION:
            args = (*args[: self.ENV_POSITION], job_environment(args[self.ENV_POSITION]), *args[8:])
        else:
            kwargs["env"] = job_environment(kwargs.get("env"))
        super().__init__(*args, **kwargs)


class ActivatedRunnerSpawn(_JobEnvironment, RunnerSpawn):
    """RunnerSpawn for an activated process: jobs do not inherit the activation."""


class ActivatedTerminalSpawn(_JobEnvironment, TerminalSpawn):
    """TerminalSpawn for an activated process: jobs do not inherit the activation."""


def activate(environ: Mapping[str, str] | None = None) -> bool:
    """Install the patch in the mode RUNNER_SPAWN_ACTIVATE names; True when installed.

    Called by the start-up hook once ``ansible_runner.runner`` has been imported. A
    refusal is reported (:func:`refuse`); with the strict switch it ends the process.
    """
    value = requested(environ)
    if value is None:
        return False
    try:
        terminal = parse_mode(value)
        spawn = ActivatedTerminalSpawn if terminal else ActivatedRunnerSpawn
        patch._install(terminal=terminal, spawn=spawn, by=f"{VARIABLE}={value}")
    except (ActivationError, patch.UnsupportedRunnerError, RuntimeError) as e:
        refuse(str(e), environ)
        return False
    log.debug("activated by %s=%s in pid %d", VARIABLE, value, os.getpid())
    return True


def refuse(reason: str, environ: Mapping[str, str] | None = None) -> None:
    """Say that activation was asked for and refused; exit 78 when strict."""
    strict = is_strict(environ)
    message = (
        f"runner-spawn: activation refused in pid {os.getpid()} ({VARIABLE}={requested(environ)!r}). {reason} "
        + (
            f"{STRICT_VARIABLE} is set: exiting with status {STRICT_EXIT}."
            if strict
            else "Jobs of this process start with ansible-runner's own pexpect.spawn. "
            f"Set {STRICT_VARIABLE}=1 to make this fatal."
        )
    )
    log.error("%s", message)
    # The logger reaches stderr by itself only through logging's last resort.
    if log.hasHandlers() or logging.lastResort is None:
        sys.stderr.write(message + "\n")
    if strict:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed stream: exit all the same
                stream.flush()
        os._exit(STRICT_EXIT)


def site_dirs() -> list[str]:
    """The site-packages directories of this interpreter (where ``.pth`` files are read)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    with contextlib.suppress(AttributeError):  # an old virtualenv's site module lacks it
        dirs += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(dirs))


def hook_file() -> Path | None:
    """The installed ``runner_spawn_activate.pth``, or None."""
    for directory in site_dirs():
        path = Path(directory, PTH_NAME)
        if path.is_file():
            return path
    return None


def hook_state() -> str:
    """The start-up hook in this process: "not loaded", "idle", "armed" or "fired"."""
    hook = sys.modules.get(HOOK_MODULE)
    return "not loaded" if hook is None else str(getattr(hook, "state", "unknown"))
