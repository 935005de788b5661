"""handle_runner_termination: end a job's whole process tree (cancel, timeouts, stop)."""

from __future__ import annotations

import contextlib
import logging
import os

from . import _child, _tree

log = logging.getLogger("runner_spawn")

#: Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
GRACE_SECONDS = 3.0


def handle_runner_termination(
    pid: int, pidfile: str | None = None, is_cancel: bool = True, *, grace: float | None = None
) -> None:
    """End the job whose top process is ``pid``, then remove ``pidfile``.

    Replaces ``Runner.handle_termination`` (which SIGKILLs ``pid``'s process group,
    leaving ansible-core 2.19+ workers running, and with a child in the host's own
    group, the host). Here: SIGTERM to the job's process group, up to ``grace``
    seconds (default :data:`GRACE_SECONDS`) for it to exit, then SIGKILL to whatever
    of its tree is left, including descendants that moved into sessions of their
    own. The host, its process group and its ancestors are never signalled.
    ``is_cancel`` is accepted for ansible-runner 2.3's call and not used.
    """
    del is_cancel
    child = _child.find_child(pid)
    if child is not None:
        child.ended_by_host = True  # its output now ends by rule 2 of ``_stream``
    if pid <= 0:
        log.error("refusing to terminate pid %d: not a single process", pid)
    elif child is None and pid == os.getpid():
        log.error("refusing to terminate pid %d: it is this process", pid)
    elif child is not None and child.reaped:
        pass  # it has ended and been reaped; the pid may already belong to someone else
    else:
        _tree.end_tree(pid, GRACE_SECONDS if grace is None else grace, None if child is None else child.marker)
    if pidfile is not None:
        with contextlib.suppress(OSError):
            os.remove(pidfile)
