"""``python -m runner_spawn``: the doctor, or ansible-runner's CLI with the patch installed.

- ``python -m runner_spawn`` or ``python -m runner_spawn doctor``: see :mod:`runner_spawn.doctor`.
- ``python -m runner_spawn ansible-runner ARGS...``: ``ansible-runner ARGS...`` with
  jobs spawned by runner-spawn (:func:`runner_spawn.cli.main`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m runner_spawn [doctor [-h]]
       python -m runner_spawn ansible-runner ARGS...

  doctor          check versions and run a self-test spawn (the default)
  ansible-runner  run ansible-runner's command line with runner-spawn installed
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
    if command in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(f"{USAGE}\npython -m runner_spawn: unknown command {command!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
