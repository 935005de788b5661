"""Starting a program in a session of its own with ``posix_spawn``: nothing of the host leaks in.

Jobs (:mod:`runner_spawn._child`) and the watchdog (:mod:`runner_spawn._watchdog_client`)
are both started by :func:`spawn_in_session`. No Python runs in the child: glibc's
``posix_spawn`` is ``clone(CLONE_VM | CLONE_VFORK)`` and ``exec``, with no error pipe
that a concurrently forked copy of the host could hold open. The program leads a new
session (so it has no controlling terminal, and signals to the host's process group
miss it), every signal is at its default action, the signal mask is empty, and it
holds fds 0 to 2 only, as the caller's file actions set them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

# A copy of the host forked (without exec) while a job's pipes are open at both ends
# would hold the write end of the job's output: end of output would then wait for that
# copy, and the job's stdin would never see EOF. Forks in other threads therefore wait
# (os.register_at_fork, in the parent) while a spawn holds both ends. The sections under
# this lock make pipes, call posix_spawn and talk to the watchdog: no logging, no other lock.
spawn_lock = threading.RLock()
_hooks_lock = threading.Lock()
_fork_hooks_registered = False

#: Signals reset to their default action in the child. Python ignores SIGPIPE and
#: SIGXFSZ, and a host may ignore others; ignored signals would survive exec.
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def hold_forks_during_spawns() -> None:
    """Make ``os.fork()`` in other threads wait while :data:`spawn_lock` is held (idempotent)."""
    global _fork_hooks_registered
    with _hooks_lock:
        if not _fork_hooks_registered:
            os.register_at_fork(
                before=spawn_lock.acquire,
                after_in_parent=spawn_lock.release,
                after_in_child=spawn_lock.release,
            )
            _fork_hooks_registered = True


def inheritable_fds(above_limit: list[int] | None = None) -> list[int]:
    """The host's fds above 2 without close-on-exec: they would leak into the child.

    Only those below the soft RLIMIT_NOFILE: posix_spawn refuses to close an fd at or
    above it (EBADF), which would fail every spawn of a host that lowered its limit
    below an fd it holds. Those stay open in the child (as with pexpect.spawn, which
    closes fds up to the limit only) and are appended to ``above_limit``.
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    found = []
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the directory's own fd, now closed
                if os.get_inheritable(fd):
                    if 0 <= limit <= fd:
                        if above_limit is not None:
                            above_limit.append(fd)
                    else:
                        found.append(fd)
    return found


def spawn_in_session(
    exe: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: Sequence[tuple[Any, ...]],
    above_limit: list[int] | None = None,
) -> int:
    """``posix_spawn`` ``exe`` in a new session; its pid.

    ``stdio`` are the file actions that set fds 0 to 2; every other inheritable fd is
    closed in the child (see :func:`inheritable_fds` for those that cannot be).
    """
    return os.posix_spawn(
        exe,
        list(argv),
        env,
        file_actions=[*stdio, *((os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable_fds(above_limit))],
        setsid=True,
        setsigdef=DEFAULT_SIGNALS,
        setsigmask=(),
    )
