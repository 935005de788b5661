"""``python -m runner_spawn``: the doctor, or ansible-runner's CLI with the patch installed.

- ``python -m runner_spawn`` or ``python -m runner_spawn doctor``: see :mod:`runner_spawn.doctor`.
- ``python -m runner_spawn ansible-runner ARGS...``: ``ansible-runner ARGS...`` with
  jobs spawned by runner-spawn (:func:`runner_spawn.cli.main`).
- ``python -m runner_spawn run [--terminal] [--strict] -- COMMAND ARGS...``: COMMAND with
  runner-spawn activated in its Python processes (:mod:`runner_spawn.launch`).

The console script ``runner-spawn`` is the same as ``python -m runner_spawn``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: runner-spawn [doctor [-h]]
       runner-spawn ansible-runner ARGS...
       runner-spawn run [--terminal] [--strict] [--] COMMAND [ARGS...]
(or python -m runner_spawn ...)

  doctor          check versions, activation and run a self-test spawn (the default)
  ansible-runner  run ansible-runner's command line with runner-spawn installed
  run             run COMMAND with runner-spawn activated in its Python processes
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch on the first argument; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else "doctor"
    if command == "doctor":
        from . import doctor

        return doctor.main(args)
    if command == "ansible-runner":
        from . import cli  # type: ignore[attr-defined,unused-ignore]

        status = cli.main(args)
        return status if isinstance(status, int) else 0
    if command == "run":
        from . import launch

        return launch.main(args)
    if command in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(f"{USAGE}\nrunner-spawn: unknown command {command!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
