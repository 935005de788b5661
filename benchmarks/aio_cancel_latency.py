"""How long cancelling an awaited runner_spawn.aio.run() takes, until CancelledError is raised.

Each run starts a playbook whose task sleeps 30 s on ``--hosts`` local hosts, waits
until the task runs, cancels the awaiting task and times how long until the task
has raised CancelledError (the job's process tree ended, the runner thread done).
It also reports the event-loop process's CPU time while a job sits idle.

    python benchmarks/aio_cancel_latency.py --runs 10 --hosts 1
    python benchmarks/aio_cancel_latency.py --runs 5 --poll 5    # ansible-runner's default
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runner_spawn import aio

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 30
"""


def private_data_dir(root: Path, hosts: int) -> Path:
    pdd = Path(tempfile.mkdtemp(dir=root))
    (pdd / "project").mkdir()
    (pdd / "inventory").mkdir()
    (pdd / "project" / "site.yml").write_text(PLAYBOOK)
    (pdd / "inventory" / "hosts").write_text(
        "".join(
            f"h{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}\n"
            for i in range(hosts)
        )
    )
    return pdd


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one(pdd: Path, poll: float | None, idle: float) -> tuple[float, float]:
    """(seconds from cancel() to CancelledError, host CPU ms per second while idle)."""
    loop = asyncio.get_running_loop()
    running = asyncio.Event()

    def on_event(event: dict[str, Any]) -> bool:
        if event["event"] == "runner_on_start":
            loop.call_soon_threadsafe(running.set)
        return True

    kwargs: dict[str, Any] = {"settings": {"pexpect_timeout": poll}} if poll is not None else {}
    task = asyncio.ensure_future(
        aio.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, event_handler=on_event, **kwargs)
    )
    await running.wait()
    await asyncio.sleep(1.0)  # the task's process is running
    c0, w0 = cpu(), time.monotonic()
    await asyncio.sleep(idle)
    idle_cpu = (cpu() - c0) / (time.monotonic() - w0) * 1000
    start = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return time.monotonic() - start, idle_cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--poll", type=float, default=None, help="pexpect_timeout (default: aio.CANCEL_POLL)")
    parser.add_argument("--idle", type=float, default=0.0, help="seconds of idle CPU measurement per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = [await one(private_data_dir(Path(root), args.hosts), args.poll, args.idle) for _ in range(args.runs)]
    latencies = sorted(r[0] for r in results)
    poll = aio.CANCEL_POLL if args.poll is None else args.poll
    print(
        f"pexpect_timeout={poll} hosts={args.hosts} runs={args.runs}: cancel latency "
        f"median {statistics.median(latencies):.2f}s, min {latencies[0]:.2f}s, max {latencies[-1]:.2f}s"
    )
    if args.idle:
        print(f"event-loop process CPU while a job idles: {statistics.median(r[1] for r in results):.2f} ms/s")


if __name__ == "__main__":
    asyncio.run(main())
