"""runner-spawn: start ansible-runner jobs without running Python between fork and exec.

Call :func:`install` once at startup; ``ansible_runner.run()`` then spawns
``ansible-playbook`` through :class:`RunnerSpawn` and ends cancelled or timed-out
jobs with :func:`handle_runner_termination`.
"""

from .patch import UnsupportedRunnerError, install, is_installed, uninstall
from .spawn import RunnerSpawn
from .terminal import TerminalSpawn
from .termination import handle_runner_termination

__version__ = "0.3.0"

__all__ = [
    "RunnerSpawn",
    "TerminalSpawn",
    "UnsupportedRunnerError",
    "__version__",
    "handle_runner_termination",
    "install",
    "is_installed",
    "uninstall",
]
