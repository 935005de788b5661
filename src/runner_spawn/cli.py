"""The ``ansible-runner`` command line with runner-spawn installed.

``python -m runner_spawn ansible-runner run|start|stop|worker|process|transmit ...``
takes the same arguments as ``ansible-runner``. The patch lives in the process, so
it also covers the daemon that ``start`` forks off, and ``stop`` ends the daemon
and its job's whole process tree.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .activation import requested_terminal
from .patch import UnsupportedRunnerError, install


def _exit_status(code: object) -> int:
    """The exit status ``sys.exit(code)`` would give (a message goes to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """Install the patch, then run ansible-runner's CLI with ``argv``; return its exit status.

    ``argv`` is what follows ``ansible-runner`` on its command line, e.g.
    ``["run", "/srv/job", "-p", "site.yml"]``. When the patch cannot be installed
    (an unsupported ansible-runner), nothing runs: the reason goes to stderr and the
    exit status is 1. The mode is pipe, or terminal when RUNNER_SPAWN_ACTIVATE says so.
    """
    try:
        # RUNNER_SPAWN_ACTIVATE=terminal (e.g. under ``runner-spawn run --terminal``) may
        # have installed terminal mode on import already; ask for the same mode.
        install(terminal=requested_terminal())
    except UnsupportedRunnerError as e:
        print(e, file=sys.stderr)  # the message starts with "runner-spawn"
        return 1
    from ansible_runner.__main__ import main as runner_main  # only needed here: keep importing cli cheap

    try:
        return _exit_status(runner_main(list(argv)))
    except SystemExit as e:  # argparse errors, --help, ``worker --worker-info``
        return _exit_status(e.code)
