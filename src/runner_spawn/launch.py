"""``runner-spawn run [--terminal] [--strict] [--] COMMAND [ARGS...]``.

Sets RUNNER_SPAWN_ACTIVATE (and RUNNER_SPAWN_ACTIVATE_STRICT with ``--strict``) and
replaces this process with COMMAND (``execve``): COMMAND keeps this process's pid,
so signals sent to it reach COMMAND directly, and its exit status is the command's.
Every Python process of COMMAND that imports ``ansible_runner.runner`` then runs
its jobs through runner-spawn (:mod:`runner_spawn.activation`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from . import activation

USAGE = """usage: runner-spawn run [--terminal] [--strict] [--] COMMAND [ARGS...]

Run COMMAND with runner-spawn active in each of its Python processes that import
ansible-runner (RUNNER_SPAWN_ACTIVATE set in its environment).

  --terminal  jobs get a pseudo-terminal (TerminalSpawn) instead of pipes
  --strict    a process where activation is refused exits with status 78
"""

#: Exit statuses, as a shell gives them.
NOT_FOUND = 127
NOT_EXECUTABLE = 126


def _error(message: str, status: int) -> int:
    sys.stderr.write(f"runner-spawn run: {message}\n")
    return status


def parse(argv: Sequence[str]) -> tuple[dict[str, bool], list[str]] | int:
    """(options, command line), or an exit status after printing usage or an error."""
    options = {"terminal": False, "strict": False}
    args = list(argv)
    while args and args[0].startswith("-"):
        arg = args.pop(0)
        if arg == "--":
            break
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        if arg[2:] not in options or not arg.startswith("--"):
            sys.stderr.write(USAGE)
            return _error(f"unknown option {arg!r}; put -- before the command if it is the command's own.", 2)
        options[arg[2:]] = True
    if not args:
        sys.stderr.write(USAGE)
        return _error("no COMMAND given.", 2)
    return options, args


def resolve(command: str) -> str | None:
    """COMMAND's path: as given when it has a slash, else looked up on PATH."""
    if os.sep in command:
        return command if os.path.exists(command) else None
    return shutil.which(command)


def main(argv: Sequence[str]) -> int:
    """Exec COMMAND with activation set; return an exit status only when that fails."""
    parsed = parse(argv)
    if isinstance(parsed, int):
        return parsed
    options, command = parsed
    hook = activation.hook_file()
    if hook is None:
        return _error(
            f"{activation.PTH_NAME} is not installed in this environment's site-packages "
            f"({', '.join(activation.site_dirs())}), so nothing would activate runner-spawn. "
            "Reinstall runner-spawn with pip (pip install --force-reinstall runner-spawn).",
            1,
        )
    path = resolve(command[0])
    if path is None:
        return _error(f"{command[0]}: command not found (PATH={os.environ.get('PATH', '')}).", NOT_FOUND)
    env = dict(os.environ)
    env[activation.VARIABLE] = "terminal" if options["terminal"] else "pipe"
    if options["strict"]:
        env[activation.STRICT_VARIABLE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(path, command, env)
    except OSError as e:
        return _error(f"{path}: cannot run it: {e.strerror or e}.", NOT_EXECUTABLE)
    return 0  # not reached: execve replaced this process
