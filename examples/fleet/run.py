"""A fleet of playbooks on Celery with redis, on this machine, with one command:

    .venv/bin/python examples/fleet/run.py [--workers N]

It starts a redis-server (a free 127.0.0.1 port, a temporary directory, no persistence)
and one Celery worker (prefork pool, ``--workers`` processes; tasks.py installs
runner-spawn), sends a batch of playbooks, prints each job as it finishes and a summary,
then stops the worker and redis-server by pid. One job never ends by itself: its hard
``time_limit`` ends it, and the summary counts that job's processes still running 2 s
later (by the FLEET_JOB value in their environment): 0.

Across machines the code is the same: run redis-server (or any Celery broker) once,
start ``celery -A tasks worker`` on each machine with FLEET_BROKER pointing at it, and
send the jobs from anywhere with ``run_playbook.apply_async``. See docs/engines.md.

Exits 1 if a job did not end as expected or a process of the stuck job was left.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLAYBOOKS = HERE / "playbooks"
WORKER_FLAGS = ["-l", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"]
TIME_LIMIT = 10  # seconds: the stuck job's hard time limit

#: (job name, playbook, localhost aliases, expected Celery state, apply_async options)
BATCH: list[tuple[str, str, int, str, dict[str, Any]]] = [
    ("web1", "hello.yml", 1, "SUCCESS", {}),
    ("web2", "hello.yml", 2, "SUCCESS", {}),
    ("db1", "facts.yml", 1, "SUCCESS", {}),
    ("lb1", "hello.yml", 3, "SUCCESS", {}),
    ("broken", "fails.yml", 1, "FAILURE", {}),
    ("stuck", "stuck.yml", 3, "FAILURE", {"time_limit": TIME_LIMIT}),
    ("cache1", "hello.yml", 1, "SUCCESS", {}),
    ("db2", "facts.yml", 2, "SUCCESS", {}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{proc.args[0]} did not start (see {path}):\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def processes_with(var: str, value: str) -> list[int]:
    """Pids of the processes whose environment holds ``var=value``."""
    needle = f"{var}={value}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return found


def stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM (Celery: warm shutdown), then SIGKILL to its process group after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started it in (pool processes)
    proc.wait()


def describe(result: Any) -> str:
    value = result.result
    if isinstance(value, dict):
        return (
            f"{value['status']}, rc {value['rc']}, {value['events']} events, {value['seconds']} s on {value['worker']}"
        )
    return f"{type(value).__name__}: {value}"


def run_fleet(workers: int, tmp: Path) -> int:
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        sys.exit("redis-server not found: install it (Debian/Ubuntu: apt-get install -y redis-server)")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {**os.environ, "FLEET_BROKER": broker, "TMPDIR": str(tmp)}
    # ansible-playbook comes from the environment this interpreter belongs to.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    os.environ["FLEET_BROKER"] = broker
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp / "redis.log", "wb") as log:
            redis = subprocess.Popen(
                [
                    redis_exe,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        procs.append(redis)
        wait_for_text(tmp / "redis.log", "Ready to accept connections", redis, 30)
        with open(tmp / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-c", str(workers), *WORKER_FLAGS],
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        procs.append(worker)
        wait_for_text(tmp / "worker.log", " ready.", worker, 60)
        print(f"redis-server pid {redis.pid} on {broker}; celery worker pid {worker.pid}, {workers} pool processes")

        sys.path.insert(0, str(HERE))
        from tasks import JOB_VAR, run_playbook  # the client side only sends: no job runs here

        started = time.monotonic()
        pending = {}
        for name, playbook, hosts, expected, options in BATCH:
            result = run_playbook.apply_async((name, (PLAYBOOKS / playbook).read_text(), hosts), **options)
            pending[result.id] = (name, playbook, expected, result)
        print(f"sent {len(BATCH)} jobs\n")
        print(f"{'job':<8} {'playbook':<10} {'state':<8} {'expected':<8} result")
        unexpected, states, left = 0, {"SUCCESS": 0, "FAILURE": 0}, -1
        deadline = started + 200
        while pending and time.monotonic() < deadline:
            for task_id, (name, playbook, expected, result) in list(pending.items()):
                if not result.ready():
                    continue
                del pending[task_id]
                state = str(result.state)
                states[state] = states.get(state, 0) + 1
                ok = state == expected
                unexpected += not ok
                print(f"{name:<8} {playbook:<10} {state:<8} {expected:<8} {describe(result)}", flush=True)
                if name == "stuck":  # what of it still runs 2 s after Celery reported the end
                    end = time.monotonic() + 2
                    while processes_with(JOB_VAR, task_id) and time.monotonic() < end:
                        time.sleep(0.05)
                    left = len(processes_with(JOB_VAR, task_id))
                    print(f"{'':<8} {'':<10} hard time_limit={TIME_LIMIT} s: processes left 2 s later: {left}")
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        for name, *_ in pending.values():
            print(f"{name:<8} did not finish in time")
        counts = ", ".join(f"{n} {s}" for s, n in states.items())
        print(f"\n{len(BATCH)} jobs in {elapsed:.1f} s: {counts}; {unexpected + len(pending)} unexpected")
        print(f"processes left: {left}" if left >= 0 else "processes left: unknown (the stuck job did not end)")
        return 0 if unexpected == 0 and not pending and left == 0 else 1
    finally:
        for proc in reversed(procs):
            stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="pool processes of the worker (default 2)")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers: give 1 or more")
    with tempfile.TemporaryDirectory(prefix="runner-spawn-fleet-") as tmp:
        return run_fleet(args.workers, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
