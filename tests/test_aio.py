"""runner_spawn.aio with real playbooks: await, cancel, time out, stream, run many at once."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import runner_spawn
from runner_spawn import aio
from tests import procs
from tests.conftest import JobDir

OK_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - debug: msg=one
    - debug: msg=two
"""

SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: nap
      command: sleep 30
"""

# 2 hosts x 6 tasks: 2 + 6 * 5 + 1 = 33 events, most of them in quick bursts.
MANY_EVENTS_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
""" + "".join(f"    - debug: msg=task{i}\n" for i in range(6))

needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout and TaskGroup are 3.11+")


@pytest.fixture(autouse=True)
def restore_patch_state() -> Iterator[None]:
    """aio installs runner_spawn on first use; leave the process as the test found it."""
    was_installed = runner_spawn.is_installed()
    yield
    if not was_installed:
        runner_spawn.uninstall()


def artifact_events(runner: Any) -> list[dict[str, Any]]:
    files = (Path(runner.config.artifact_dir) / "job_events").glob("*.json")
    return sorted((json.loads(f.read_text()) for f in files), key=lambda e: e["counter"])


def new_processes(before: dict[int, int]) -> dict[int, int]:
    return {p: s for p, s in procs.descendants().items() if p not in before}


def assert_none_left(before: dict[int, int]) -> None:
    left = new_processes(before)
    assert not left, f"processes left: {[(p, procs.stat(p), cmdline(p)) for p in left]}"


class Started:
    """An event_handler that tells the loop when the job reaches a given event (thread-safe)."""

    def __init__(self, event: str = "runner_on_start") -> None:
        self.loop = asyncio.get_running_loop()
        self.reached = asyncio.Event()
        self.event = event

    def __call__(self, data: dict[str, Any]) -> bool:
        if data["event"] == self.event:
            self.loop.call_soon_threadsafe(self.reached.set)
        return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return ""


async def until_napping(before: dict[int, int], limit: float = 30.0) -> bool:
    """Wait up to ``limit`` s until the job's ``sleep 30`` task process runs (mid-task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if any(cmdline(p) == "sleep 30" for p in new_processes(before)):
            return True
        await asyncio.sleep(0.05)
    return False


def test_run_returns_finished_runner_and_chains_callbacks(job_dir: JobDir) -> None:
    pdd = job_dir(OK_PLAYBOOK)
    handled: list[str] = []
    threads: set[int] = set()
    statuses: list[str] = []
    finished: list[Any] = []
    cancel_checks: list[int] = []

    def on_event(event: dict[str, Any]) -> bool:
        handled.append(event["event"])
        threads.add(threading.get_ident())
        return True

    async def main() -> Any:
        return await aio.run(
            private_data_dir=str(pdd),
            playbook="site.yml",
            quiet=True,
            event_handler=on_event,
            status_handler=lambda data, runner_config: statuses.append(data["status"]),
            finished_callback=finished.append,
            cancel_callback=lambda: cancel_checks.append(1) or False,
        )

    runner = asyncio.run(main())
    assert runner_spawn.is_installed()
    assert (runner.status, runner.rc) == ("successful", 0)
    assert finished == [runner]
    assert statuses == ["starting", "running", "successful"]
    assert handled == [e["event"] for e in artifact_events(runner)]
    assert handled.count("runner_on_ok") == 2
    assert threading.get_ident() not in threads  # the job ran in a worker thread
    assert cancel_checks  # the caller's cancel_callback was consulted


def test_caller_cancel_callback_cancels_without_cancelling_the_task(job_dir: JobDir) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK)
    before = procs.descendants()
    napping = threading.Event()

    async def main() -> Any:
        async def raise_flag() -> None:
            if await until_napping(before):
                napping.set()

        helper = asyncio.ensure_future(raise_flag())
        try:
            return await aio.run(
                private_data_dir=str(pdd), playbook="site.yml", quiet=True, cancel_callback=napping.is_set
            )
        finally:
            helper.cancel()

    runner = asyncio.run(main())
    assert (runner.status, runner.rc) == ("canceled", 254)
    assert_none_left(before)


def test_cancel_mid_run_ends_job_then_raises(job_dir: JobDir) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=2)
    before = procs.descendants()
    finished: list[Any] = []
    statuses: list[str] = []

    async def main() -> None:
        started = Started()
        task = asyncio.ensure_future(
            aio.run(
                private_data_dir=str(pdd),
                playbook="site.yml",
                quiet=True,
                event_handler=started,
                finished_callback=finished.append,
                status_handler=lambda data, runner_config: statuses.append(data["status"]),
            )
        )
        await asyncio.wait_for(started.reached.wait(), 60)
        assert await until_napping(before), "the job's task never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Checked at once: run() re-raises only after the runner thread has finished.
        assert_none_left(before)
        assert task.cancelled()

    asyncio.run(main())
    assert len(finished) == 1
    runner = finished[0]
    assert (runner.status, runner.rc) == ("canceled", 254)
    assert statuses[-1] == "canceled"
    assert (Path(runner.config.artifact_dir) / "status").read_text() == "canceled"


@needs_311
def test_asyncio_timeout_cancels_job(job_dir: JobDir) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK)
    before = procs.descendants()
    finished: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = Started()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:  # type: ignore[attr-defined]

                async def expire_once_started() -> None:
                    await started.reached.wait()
                    await until_napping(before)
                    deadline.reschedule(loop.time())

                helper = asyncio.ensure_future(expire_once_started())
                try:
                    await aio.run(
                        private_data_dir=str(pdd),
                        playbook="site.yml",
                        quiet=True,
                        event_handler=started,
                        finished_callback=finished.append,
                    )
                finally:
                    helper.cancel()
        assert_none_left(before)

    asyncio.run(main())
    assert [r.status for r in finished] == ["canceled"]


def test_wait_for_timeout_cancels_job(job_dir: JobDir) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK)
    before = procs.descendants()
    finished: list[Any] = []

    async def main() -> None:
        job = aio.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, finished_callback=finished.append)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(job, timeout=3.0)
        assert_none_left(before)

    asyncio.run(main())
    # On a slow machine the timeout may come before Runner existed; then no job ran.
    assert [r.status for r in finished] in ([], ["canceled"])


def test_stream_slow_consumer_gets_every_event_in_order(job_dir: JobDir) -> None:
    pdd = job_dir(MANY_EVENTS_PLAYBOOK, hosts=2)
    handed_over = [0]  # events Runner passed to the caller's handler (runner thread)

    def count(event: dict[str, Any]) -> bool:
        handed_over[0] += 1
        return True

    async def main() -> tuple[list[dict[str, Any]], list[int], Any]:
        got: list[dict[str, Any]] = []
        ahead: list[int] = []
        async with aio.stream(
            private_data_dir=str(pdd), playbook="site.yml", quiet=True, queue_size=2, event_handler=count
        ) as job:
            async for event in job:
                got.append(event)
                if len(got) == 1:
                    # Stall: the runner thread fills the queue (2), then holds the next event.
                    for _ in range(1200):
                        if handed_over[0] >= 4:
                            break
                        await asyncio.sleep(0.05)
                    assert handed_over[0] >= 4, "the runner thread did not fill the queue"
                    await asyncio.sleep(0.2)  # not a wait: room for the thread to (wrongly) go further
                ahead.append(handed_over[0] - len(got))
                await asyncio.sleep(0.02)
        return got, ahead, job.runner

    got, ahead, runner = asyncio.run(main())
    assert (runner.status, runner.rc) == ("successful", 0)
    on_disk = artifact_events(runner)
    assert len(on_disk) == 33
    assert [e["uuid"] for e in got] == [e["uuid"] for e in on_disk]
    assert [e["counter"] for e in got] == list(range(1, 34))
    # While the consumer stalled, the runner thread had handed over exactly
    # queue_size + 1 more events and was waiting; it never got further ahead.
    assert ahead[0] == 3
    assert max(ahead) == 3


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_stream_consumer_leaving_early_cancels_job(job_dir: JobDir, how: str) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK)
    before = procs.descendants()
    finished: list[Any] = []
    handed_over = [0]

    def count(event: dict[str, Any]) -> bool:
        handed_over[0] += 1
        return True

    async def consume(first: asyncio.Event) -> Any:
        async with aio.stream(
            private_data_dir=str(pdd),
            playbook="site.yml",
            quiet=True,
            queue_size=1,
            event_handler=count,
            finished_callback=finished.append,
        ) as job:
            async for _event in job:
                first.set()
                if how == "break":
                    # Leave mid-task (cancelling while ansible starts its workers is
                    # termination's business, not this test's).
                    assert await until_napping(before)
                    break
                await asyncio.sleep(60)  # a consumer stuck on something else
        return job

    async def main() -> None:
        first = asyncio.Event()
        task = asyncio.ensure_future(consume(first))
        if how == "cancel":
            await asyncio.wait_for(first.wait(), 60)
            assert await until_napping(before)
            # One event taken, one queued, the third held in the runner thread: it waits.
            # (The task's process may run before the runner thread has read its events.)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while handed_over[0] < 3 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert handed_over[0] == 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            job = await task
            assert job.status == "canceled", (job.rc, Path(job.runner.config.artifact_dir, "stdout").read_text())
        assert_none_left(before)

    asyncio.run(main())
    assert [r.status for r in finished] == ["canceled"]


@needs_311
def test_sixteen_jobs_in_a_task_group(job_dir: JobDir) -> None:
    pdds = [job_dir(OK_PLAYBOOK) for _ in range(16)]
    lock = threading.Lock()
    running = [0, 0]  # now, peak

    def on_status(data: dict[str, Any], runner_config: Any) -> None:
        with lock:
            if data["status"] == "running":
                running[0] += 1
                running[1] = max(running)
            elif data["status"] in ("successful", "failed", "canceled", "timeout"):
                running[0] -= 1

    async def main() -> list[Any]:
        with ThreadPoolExecutor(16) as executor:
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                tasks = [
                    group.create_task(
                        aio.run(
                            private_data_dir=str(pdd),
                            playbook="site.yml",
                            quiet=True,
                            executor=executor,
                            status_handler=on_status,
                        )
                    )
                    for pdd in pdds
                ]
        return [t.result() for t in tasks]

    runners = asyncio.run(main())
    assert [(r.status, r.rc) for r in runners] == [("successful", 0)] * 16
    assert len({r.config.artifact_dir for r in runners}) == 16
    assert all(len(artifact_events(r)) == 9 for r in runners)
    assert running[1] > 1  # they did run at the same time


def test_stream_wait_without_iterating_does_not_block(job_dir: JobDir) -> None:
    pdd = job_dir(OK_PLAYBOOK)

    async def main() -> Any:
        async with aio.stream(private_data_dir=str(pdd), playbook="site.yml", quiet=True, queue_size=1) as job:
            return await asyncio.wait_for(job.wait(), 60)  # 9 events, room for 1: not waited on

    runner = asyncio.run(main())
    assert (runner.status, runner.rc) == ("successful", 0)
    assert len(artifact_events(runner)) == 9  # dropped from the stream only, not from job_events/


def test_stream_must_be_entered() -> None:
    async def main() -> None:
        events = aio.stream(private_data_dir="/nonexistent", playbook="site.yml")
        with pytest.raises(RuntimeError, match="async with"):
            async for _ in events:
                pass
        with pytest.raises(ValueError, match="queue_size"):
            aio.stream(private_data_dir="/nonexistent", queue_size=0)

    asyncio.run(main())
