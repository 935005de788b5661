"""Run several real playbooks at once from an asyncio program, with runner-spawn installed.

    python examples/run_playbooks.py [--jobs N]

Each job gets its own private_data_dir (ansible-runner writes artifacts there; jobs
must never share one) with a localhost inventory (connection: local). The jobs run in
worker threads of the event loop, the way an asyncio service calls ansible-runner.
Prints each job's status, rc and event count; exits non-zero if a job did not end as
expected.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ansible_runner

import runner_spawn

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
EXPECTED = {"hello.yml": "successful", "facts.yml": "successful", "loop.yml": "successful", "fails.yml": "failed"}


def make_private_data_dir(root: Path, name: str, playbook: str) -> Path:
    pdd = root / name
    (pdd / "project").mkdir(parents=True)
    (pdd / "inventory").mkdir()
    shutil.copy(PLAYBOOKS / playbook, pdd / "project" / playbook)
    # Pin the interpreter: with connection local, discovery could pick another Python.
    (pdd / "inventory" / "hosts").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    return pdd


def run_job(pdd: Path, playbook: str) -> ansible_runner.Runner:
    return ansible_runner.run(private_data_dir=str(pdd), playbook=playbook, quiet=True)


async def main(jobs: int) -> int:
    runner_spawn.install()  # once, at startup
    names = sorted(EXPECTED)
    plan = [names[i % len(names)] for i in range(jobs)]
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="runner-spawn-example-") as tmp, ThreadPoolExecutor(jobs) as pool:
        dirs = [make_private_data_dir(Path(tmp), f"job{i}", pb) for i, pb in enumerate(plan)]
        started = time.monotonic()
        runners = await asyncio.gather(*(loop.run_in_executor(pool, run_job, d, pb) for d, pb in zip(dirs, plan)))
        elapsed = time.monotonic() - started
        bad = 0
        print(f"{'job':<6} {'playbook':<11} {'status':<11} {'rc':>4} {'events':>7}")
        for i, (pb, r) in enumerate(zip(plan, runners)):
            events = [e["event"] for e in r.events]  # read from the job's artifacts
            ok = r.status == EXPECTED[pb] and events[-1:] == ["playbook_on_stats"]
            bad += not ok
            print(f"job{i:<3} {pb:<11} {r.status:<11} {r.rc!s:>4} {len(events):>7}{'' if ok else '  UNEXPECTED'}")
    verdict = "all as expected" if not bad else f"{bad} unexpected"
    print(f"{jobs} jobs in {elapsed:.1f}s with runner-spawn {runner_spawn.__version__} installed: {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="playbooks to run at once (default 8)")
    args = parser.parse_args()
    # ansible-playbook comes from the environment this interpreter belongs to.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    sys.exit(asyncio.run(main(args.jobs)))
