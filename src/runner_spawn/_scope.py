"""The jobs one ``Runner.run()`` call started, so that an exception leaving it can end them.

:func:`runner_spawn.install` wraps ``Runner.run``: the wrapper opens a scope
(:func:`run_scope`), every spawn started inside it records itself (:func:`started`, one
list append), and when any exception leaves the call the jobs still running are ended
(:func:`end_running`) before the exception goes on. The scope is a context variable, so
each thread, each greenlet (greenlet 1.0+) and each asyncio task sees only its own, and a
``Runner.run()`` nested in another (a callback running a job) has a scope of its own.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Protocol

log = logging.getLogger("runner_spawn")


class Job(Protocol):
    """A started job that can be ended while an exception unwinds (a RunnerSpawn)."""

    def _end_on_unwind(self, why: str = ...) -> None:
        """End the job's whole tree if it still runs; bounded, never raising."""


#: The jobs started by the innermost ``Runner.run()`` of this context; None outside one.
#: Opened with ``token = run_scope.set([])``, closed with ``run_scope.reset(token)``.
run_scope: contextvars.ContextVar[list[Job] | None] = contextvars.ContextVar("runner_spawn_run_scope", default=None)


def started(job: Job) -> None:
    """Record ``job`` in the current ``Runner.run()`` scope, if there is one."""
    jobs = run_scope.get()
    if jobs is not None:
        jobs.append(job)


def end_running(jobs: list[Job], why: str) -> None:
    """End every job of ``jobs`` that still runs. Never raises: the exception being unwound goes on."""
    for job in jobs:
        try:
            job._end_on_unwind(why)
        except BaseException as e:  # e.g. a signal handler raising between two endings
            log.warning("%r raised while a job was being ended; dropped", e)
