"""Container engine command lines for a job on pipes.

In pexpect mode ansible-runner starts a containerized job as
``podman run --rm --tty --interactive ... IMAGE ansible-playbook ...`` (docker
alike): ``--tty`` hands the terminal that ``pexpect.spawn`` gives the engine on to
the container. A job started by RunnerSpawn has pipes instead, and with ``--tty``
docker refuses to start ("the input device is not a TTY") and podman warns.
:func:`without_tty` drops the flag, so the container gets pipes too, and passes
``PYTHONUNBUFFERED`` into the container, where output would otherwise be
block-buffered now that it is not a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: Executables ansible-runner treats as container engines.
ENGINES = frozenset({"docker", "podman"})
#: Tokens that ask for a terminal, and what is left of each without the request.
_TTY_TOKENS: dict[str, list[str]] = {"--tty": [], "-t": [], "--tty=true": [], "-it": ["-i"], "-ti": ["-i"]}
#: Value-less flags ansible-runner writes right after ``run``, around ``--tty``.
_LEADING_FLAGS = frozenset({"--rm", "--interactive", "-i", *_TTY_TOKENS})
#: Passed through (value taken from the engine's environment, where RunnerSpawn sets it).
_UNBUFFERED = ["--env", "PYTHONUNBUFFERED"]


def run_index(argv: Sequence[str]) -> int | None:
    """Index of ``run`` when ``argv`` is ``docker|podman [--global=opt ...] run ...``, else None."""
    if not argv or os.path.basename(argv[0]) not in ENGINES:
        return None
    for i, token in enumerate(argv[1:], start=1):
        if not token.startswith("-"):
            return i if token == "run" else None
    return None


def without_tty(argv: Sequence[str]) -> list[str]:
    """``argv`` without the terminal request of a container ``run``; other commands unchanged.

    Only the value-less flags right after ``run`` are looked at (where
    ansible-runner puts ``--tty``), so nothing that belongs to the command run
    inside the container (``ansible-playbook -t TAGS``) is ever touched.
    """
    out = list(argv)
    start = run_index(out)
    if start is None:
        return out
    end = start + 1
    while end < len(out) and out[end] in _LEADING_FLAGS:
        end += 1
    flags = out[start + 1 : end]
    kept = [rest for flag in flags for rest in _TTY_TOKENS.get(flag, [flag])]
    if kept == flags:
        return out
    if not any("PYTHONUNBUFFERED" in token for token in out):
        kept.extend(_UNBUFFERED)
    return [*out[: start + 1], *kept, *out[end:]]
