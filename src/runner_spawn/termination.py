"""handle_runner_termination: end a job's whole process tree (cancel, timeouts, stop)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

from . import _child, _tree

log = logging.getLogger("runner_spawn")

#: Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
GRACE_SECONDS = 3.0
#: How much longer than its grace period :func:`end_job_shielded` waits for the
#: ending to finish (listing the tree, SIGKILL and the wait after it).
SHIELD_SLACK = 5.0


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


def end_job_shielded(child: _child.Child, grace: float, why: str) -> None:
    """End ``child``'s whole tree (as :func:`handle_runner_termination`) while an exception unwinds.

    Never raises, and returns within ``grace`` + :data:`SHIELD_SLACK` seconds. The
    tree is ended in a helper thread while the calling thread waits: Python runs
    signal handlers only in the main thread, so a handler that raises again (a
    repeating timer, a second Ctrl-C, a hard limit after a soft one) cannot stop the
    ending halfway and leave the job stopped or half killed. Such an exception,
    raised in the calling thread while it waits, is logged and dropped, so that the
    exception being unwound goes on, not a new one. Where no thread can be started
    (interpreter shutdown) the tree is ended in the calling thread. A child that has
    already exited, or was reaped (its pid may name another process now), is left alone.
    ``why`` says in the log what happened.
    """
    try:
        if child.reaped or child.has_exited(0):
            return
        child.ended_by_host = True  # its output now ends by rule 2 of ``_stream``
        log.warning("pid %d: %s while the job runs; ending the job", child.pid, why)
    except Exception:  # pragma: no cover - e.g. logging fails late in shutdown
        pass
    done = threading.Event()

    def end() -> None:
        try:
            _tree.end_tree(child.pid, grace, child.marker)
        except Exception:
            log.exception("pid %d: ending the job failed", child.pid)
        finally:
            done.set()

    if sys.is_finalizing():
        # A new thread would never start (Thread.start() would wait forever), and late
        # in shutdown even builtins may be gone: try here; the host's watchdog ends the
        # job anyway once this process has exited.
        with contextlib.suppress(Exception):
            _tree.end_tree(child.pid, grace, child.marker)
        return
    try:
        threading.Thread(target=end, name=f"runner-spawn-end-{child.pid}", daemon=True).start()
    except RuntimeError:  # no thread can be created
        end()
    deadline = time.monotonic() + grace + SHIELD_SLACK
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            log.error("pid %d: ending the job took over %.1fs; not waiting longer", child.pid, grace + SHIELD_SLACK)
            return
        try:
            done.wait(left)
        except BaseException as e:  # raised by a signal handler while we wait
            log.warning("pid %d: %r raised while the job was being ended; dropped", child.pid, e)
