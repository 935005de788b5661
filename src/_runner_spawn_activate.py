"""runner-spawn's start-up hook, imported by ``runner_spawn_activate.pth``.

The ``.pth`` line imports this module only when ``RUNNER_SPAWN_ACTIVATE`` is set to
a non-empty value. :func:`arm` then puts one finder first on ``sys.meta_path``. The
finder waits for the import of ``ansible_runner.runner``, takes itself off
``sys.meta_path``, and wraps that one module's loader: once the module has run, the
real loader is put back and :func:`runner_spawn.activation.activate` installs the
patch. Nothing else is imported here, so a process that never imports ansible-runner
pays for this file alone: it imports nothing that start-up has not imported already.
"""

import os
import sys

# No `from __future__ import annotations`, no typing: annotations are strings, and
# importing either module would cost more than this whole file.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

VARIABLE = "RUNNER_SPAWN_ACTIVATE"
TARGET = "ansible_runner.runner"
#: Exit status of a strict refusal (sysexits' EX_CONFIG); runner_spawn.activation uses it too.
STRICT_EXIT = 78

#: "idle" (not armed), "armed" (waiting for TARGET) or "fired" (TARGET imported).
state = "idle"


class _Loader:
    """Runs the real loader of TARGET, puts it back, then activates."""

    def __init__(self, loader: "Any") -> None:
        self.loader = loader

    def create_module(self, spec: "Any") -> "ModuleType | None":
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: "ModuleType") -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        fire()


class _Finder:
    """On sys.meta_path until TARGET is imported; finds nothing else."""

    def find_spec(self, fullname: str, path: "Any", target: "Any" = None) -> "Any":
        if fullname != TARGET:
            return None
        disarm()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            fire()  # cannot wait for the module to run: activation reports why it cannot patch
            return spec
        spec.loader = _Loader(spec.loader)
        return spec

    def __repr__(self) -> str:
        return f"<runner-spawn activation hook: waiting for {TARGET}>"


_finder = _Finder()


def arm() -> None:
    """Activate when TARGET is imported (at once if it already is)."""
    global state
    if state != "idle":
        return
    if TARGET in sys.modules:
        fire()
        return
    state = "armed"
    sys.meta_path.insert(0, _finder)


def disarm() -> None:
    """Take the finder off sys.meta_path (idempotent)."""
    global state
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if state == "armed":
        state = "idle"


def fire() -> None:
    """Install the patch in the mode the environment asks for, or report why not."""
    global state
    disarm()
    state = "fired"
    try:
        from runner_spawn import activation
    except Exception as e:  # a broken runner-spawn must not break the program's import
        message = (
            f"runner-spawn: activation refused in pid {os.getpid()} "
            f"({VARIABLE}={os.environ.get(VARIABLE, '')!r}): runner_spawn cannot be imported: {e!r}\n"
        )
        sys.stderr.write(message)
        if os.environ.get(VARIABLE + "_STRICT", "").lower() in ("1", "true", "yes", "on"):
            sys.stderr.flush()
            os._exit(STRICT_EXIT)
        return
    activation.activate()
