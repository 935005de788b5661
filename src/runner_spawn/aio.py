"""asyncio API: await an ansible-runner job, stream its events, cancel it by cancelling the task.

::

    from runner_spawn import aio

    runner = await aio.run(private_data_dir=pdd, playbook="site.yml")

    async with aio.stream(private_data_dir=pdd, playbook="site.yml") as job:
        async for event in job:
            print(event["event"])
    print(job.status, job.rc)

Both take ``ansible_runner.run()``'s keyword arguments, install runner-spawn if it
is not installed, and run ``Runner.run()`` in a worker thread: ``executor`` if
given, else the loop's default executor (which has ``min(32, cpus + 4)`` threads;
a job holds one for its whole run, so give many concurrent jobs an executor of
their own).

Cancelling the task that awaits :func:`run` (or that iterates a :func:`stream`),
directly, through ``asyncio.timeout()``/``wait_for``, or as a ``TaskGroup``
sibling, stops the job through ansible-runner's own cancel path: the
``cancel_callback`` returns True, Runner calls ``Runner.handle_termination``
(runner-spawn's: SIGTERM to the job, a grace period, SIGKILL to what is left of
its tree), and the job ends with status ``canceled``. The task then waits, at
most ``cancel_wait`` seconds (default :data:`CANCEL_WAIT`), for the runner thread
to finish its cleanup (artifacts, callbacks), and re-raises ``CancelledError``.
Further cancellation does not shorten that wait; past the bound a warning is
logged and the thread finishes on its own. A job still queued in the executor
is not started at all.

Runner checks ``cancel_callback`` once per ``pexpect_timeout`` (5 s by default);
jobs started here check every :data:`CANCEL_POLL` seconds unless
``pexpect_timeout`` is set in ``settings`` or ``env/settings``. Measured on 2
cores (``benchmarks/aio_cancel_latency.py``), ``task.cancel()`` to
``CancelledError`` during a task took 0.02-0.31 s (median 0.18 s); with
``pexpect_timeout`` 5 it takes up to 5 s. The shorter poll costs about 0.5 ms of
CPU per second per running job.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import ansible_runner
from ansible_runner.interface import init_runner

from . import patch

log = logging.getLogger("runner_spawn")

#: Seconds between Runner's cancel checks (its ``pexpect_timeout``) for jobs started
#: here, unless the caller sets ``pexpect_timeout``. A check costs one poll() wakeup.
CANCEL_POLL = 0.25
#: Default bound, in seconds, on waiting for a cancelled job's runner thread to finish.
#: Covers a cancel check (CANCEL_POLL), termination's grace period and SIGKILL
#: (termination.GRACE_SECONDS + 1 s), draining the output and writing artifacts.
CANCEL_WAIT = 15.0
#: Default number of events :func:`stream` buffers before the runner thread waits.
QUEUE_SIZE = 100

#: An ansible-runner event, as its ``event_handler`` receives it.
Event = dict[str, Any]


class _EventQueue:
    """Events from the runner thread to the loop: bounded, in order, never dropped while open.

    The runner thread blocks in :meth:`put` while the queue is full. Once closed
    (the consumer is gone), :meth:`put` drops events and never blocks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._maxsize = maxsize
        self._items: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._changed = asyncio.Event()  # set in the loop when items arrive or the job ends

    def notify(self) -> None:
        """Wake the consumer; callable from any thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            self._loop.call_soon_threadsafe(self._changed.set)

    def put(self, event: Event) -> None:
        """Runner thread: append ``event``, waiting while the queue is full."""
        with self._cond:
            while len(self._items) >= self._maxsize and not self._closed:
                if self._loop.is_closed():
                    self._closed = True  # the consumer can never come back
                    break
                self._cond.wait(0.5)
            if self._closed:
                return
            self._items.append(event)
            first = len(self._items) == 1
        if first:
            self.notify()

    async def get(self, done: Callable[[], bool]) -> Event | None:
        """Loop: the next event, or None once ``done()`` and every event was taken."""
        while True:
            self._changed.clear()
            with self._cond:
                if self._items:
                    event = self._items.popleft()
                    self._cond.notify()
                    return event
            if done():
                return None
            await self._changed.wait()

    def close(self) -> None:
        """Drop what is queued and make :meth:`put` drop from now on (never block)."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


def _consume_result(fut: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as retrieved (nobody awaits it any more)."""
    if not fut.cancelled():
        fut.exception()


class _Job:
    """One ``Runner.run()`` in a worker thread, with a cancel flag the loop can set."""

    def __init__(
        self,
        kwargs: dict[str, Any],
        executor: concurrent.futures.Executor | None,
        cancel_wait: float,
        queue_size: int | None,
    ) -> None:
        if cancel_wait < 0:
            raise ValueError(f"cancel_wait must be >= 0, not {cancel_wait!r}")
        self._kwargs = dict(kwargs)
        self._executor = executor
        self._cancel_wait = cancel_wait
        self._queue_size = queue_size
        self._user_cancel: Callable[[], Any] | None = self._kwargs.pop("cancel_callback", None)
        self._user_events: Callable[[Event], Any] | None = self._kwargs.pop("event_handler", None)
        self._cancel = threading.Event()  # the awaiting task was cancelled
        self._user_canceled = False
        self._lock = threading.Lock()
        self._started = False
        self._queue: _EventQueue | None = None
        self._future: asyncio.Future[Any] | None = None
        self.runner: Any = None  # the Runner, once the worker thread has made it

    # --- loop side -------------------------------------------------------------------

    def start(self) -> None:
        if self._future is not None:
            raise RuntimeError("this job has already been started")
        if not patch.is_installed():
            patch.install()
        loop = asyncio.get_running_loop()
        if self._queue_size is not None:
            self._queue = _EventQueue(loop, self._queue_size)
        self._future = loop.run_in_executor(self._executor, self._work)
        if self._queue is not None:
            self._future.add_done_callback(lambda _: self._queue.notify() if self._queue else None)

    @property
    def future(self) -> asyncio.Future[Any]:
        if self._future is None:
            raise RuntimeError("the job has not been started")
        return self._future

    async def wait(self) -> Any:
        """The finished Runner; cancelling the awaiting task cancels the job."""
        fut = self.future
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            await self.stop(raise_if_interrupted=False)
            raise
        return self._result()

    def _result(self) -> Any:
        runner = self.future.result()
        if runner is None:  # cancelled before it started; only a cancelled task gets here
            raise asyncio.CancelledError()
        return runner

    async def stop(self, raise_if_interrupted: bool = True) -> None:
        """Cancel the job and wait, at most ``cancel_wait`` seconds, for its thread to end.

        Cancellation of the waiting task meanwhile does not shorten the wait; it is
        re-raised afterwards when ``raise_if_interrupted``.
        """
        with self._lock:
            self._cancel.set()
            started = self._started
        if self._queue is not None:
            self._queue.close()
        fut = self.future
        if not started:
            fut.add_done_callback(_consume_result)
            return  # _work() will see the flag and not start the job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._cancel_wait
        interrupted = False
        while not fut.done():
            left = deadline - loop.time()
            if left <= 0:
                log.warning("cancelled job still running after %.1fs; no longer waiting for it", self._cancel_wait)
                break
            try:
                await asyncio.wait({fut}, timeout=left)
            except asyncio.CancelledError:
                interrupted = True
        fut.add_done_callback(_consume_result)
        if interrupted and raise_if_interrupted:
            raise asyncio.CancelledError()

    # --- runner thread side ----------------------------------------------------------------

    def _work(self) -> Any:
        with self._lock:
            if self._cancel.is_set():
                return None
            self._started = True
        kwargs = dict(self._kwargs)
        kwargs["cancel_callback"] = self._cancel_callback
        if self._queue is not None or self._user_events is not None:
            kwargs["event_handler"] = self._event_handler
        runner = init_runner(**kwargs)
        self.runner = runner
        _shorten_cancel_poll(runner)
        runner.run()
        return runner

    def _cancel_callback(self) -> bool:
        if self._cancel.is_set() or self._user_canceled:
            return True
        if self._user_cancel is not None and self._user_cancel():
            self._user_canceled = True  # Runner re-reads the callback: keep answering True
        return self._user_canceled or self._cancel.is_set()

    def _event_handler(self, event: Event) -> Any:
        keep = True if self._user_events is None else self._user_events(event)
        if self._queue is not None:
            self._queue.put(event)
        return keep


def _shorten_cancel_poll(runner: Any) -> None:
    """Make Runner check for cancellation every CANCEL_POLL s, unless the caller chose."""
    config: Any = getattr(runner, "config", None)
    settings = getattr(config, "settings", None) or {}
    timeout = getattr(config, "pexpect_timeout", None)
    if "pexpect_timeout" not in settings and isinstance(timeout, (int, float)):
        config.pexpect_timeout = min(timeout, CANCEL_POLL)


async def run(
    *,
    executor: concurrent.futures.Executor | None = None,
    cancel_wait: float = CANCEL_WAIT,
    **kwargs: Any,
) -> ansible_runner.Runner:
    """Run ``ansible_runner.run(**kwargs)`` in a worker thread and return the finished Runner.

    Cancelling the awaiting task cancels the job (status ``canceled``, process tree
    ended), waits up to ``cancel_wait`` seconds for the runner thread to finish,
    then re-raises ``CancelledError``. ``cancel_callback``, ``event_handler``,
    ``status_handler`` and ``finished_callback`` in ``kwargs`` are called as usual;
    the job is also canceled when the caller's ``cancel_callback`` returns True, and
    then :func:`run` returns normally.
    """
    job = _Job(kwargs, executor, cancel_wait, None)
    job.start()
    return await job.wait()


class EventStream:
    """A running job's events, in order, as an async iterator; see :func:`stream`.

    Use it as ``async with``; iterate inside. Leaving the block before the job has
    finished (``break``, an exception, cancellation) cancels the job and waits for
    it as :func:`run` does. After the iteration ends, :attr:`runner`,
    :attr:`status` and :attr:`rc` hold the outcome.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._entered = False

    @property
    def runner(self) -> ansible_runner.Runner | None:
        """The Runner; None until the worker thread has created it."""
        return self._job.runner

    @property
    def status(self) -> str | None:
        """Runner's status (``running``, ``successful``, ``canceled``, ...); None before it exists."""
        return None if self._job.runner is None else self._job.runner.status

    @property
    def rc(self) -> int | None:
        """Runner's return code; None while it runs."""
        return None if self._job.runner is None else self._job.runner.rc

    async def __aenter__(self) -> EventStream:
        self._job.start()
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fut = self._job.future
        if fut.done():
            if self._job._queue is not None:
                self._job._queue.close()
            _consume_result(fut)
            return
        await self._job.stop(raise_if_interrupted=exc_type is None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if not self._entered:
            raise RuntimeError("iterate an event stream inside 'async with aio.stream(...) as job:'")
        queue = self._job._queue
        assert queue is not None
        fut = self._job.future
        event = await queue.get(fut.done)
        if event is None:
            self._job._result()  # the job's exception, if it raised one
            raise StopAsyncIteration
        return event

    async def wait(self) -> ansible_runner.Runner:
        """The finished Runner. Events not yet iterated are dropped, so that it cannot block."""
        if not self._entered:
            raise RuntimeError("wait for an event stream inside 'async with aio.stream(...) as job:'")
        if self._job._queue is not None:
            self._job._queue.close()
        return await self._job.wait()


def stream(
    *,
    executor: concurrent.futures.Executor | None = None,
    cancel_wait: float = CANCEL_WAIT,
    queue_size: int = QUEUE_SIZE,
    **kwargs: Any,
) -> EventStream:
    """Start ``ansible_runner.run(**kwargs)`` on entering the returned context; iterate its events.

    Events come in the order Runner handles them, each exactly once. At most
    ``queue_size`` wait for the consumer; then the runner thread waits in
    ``event_handler`` (and the playbook, once its output pipe is full), so a slow
    consumer slows the job instead of losing events or growing memory. The
    iteration ends when the job has finished, raising the job's exception if it
    raised one. Events are shared with Runner (which writes them to
    ``job_events/``): treat them as read-only.
    """
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, not {queue_size!r}")
    return EventStream(_Job(kwargs, executor, cancel_wait, queue_size))


__all__ = ["CANCEL_POLL", "CANCEL_WAIT", "QUEUE_SIZE", "Event", "EventStream", "run", "stream"]
