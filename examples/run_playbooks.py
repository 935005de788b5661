"""Run several real playbooks at once from an asyncio program, with runner-spawn installed.

    .venv/bin/python examples/run_playbooks.py [--jobs N] [--stock]

Each job gets its own private_data_dir (ansible-runner writes artifacts there; jobs
must never share one) with a localhost inventory (connection: local). The jobs run in
worker threads of the event loop, the way an asyncio service calls ansible-runner.

Each job is printed as it finishes, with what shows that runner-spawn started it: the
spawn class Runner called, whether the job's processes carry runner-spawn's job marker
(RUNNER_SPAWN_JOB in /proc/PID/environ), whether the job leads a session of its own,
and whether its output arrives on a pipe (runner-spawn) or a pseudo-terminal (stock).
At the end: how many Python at-fork callbacks ran while the jobs ran (stock
pexpect.spawn forks through Python once per job; runner-spawn never does).

Exits 1 if a job did not end as expected or, unless --stock, if a job was not started
by runner-spawn. --stock skips install() to show the difference.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner
import ansible_runner.runner

import runner_spawn

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
EXPECTED = {"hello.yml": "successful", "facts.yml": "successful", "loop.yml": "successful", "fails.yml": "failed"}
MARKER = b"RUNNER_SPAWN_JOB="

# Every fork that runs Python at-fork callbacks (os.fork, pty.fork, multiprocessing's
# "fork") counts here; posix_spawn and vfork do not run them.
_at_fork_calls = [0]
os.register_at_fork(before=lambda: _at_fork_calls.__setitem__(0, _at_fork_calls[0] + 1))


@dataclass
class Evidence:
    """What the host saw of one job while it ran (filled in from Runner's event handler)."""

    spawn: str = "?"
    seen: bool = False
    marked: dict[int, bool] = field(default_factory=dict)  # each process of the job seen: carries the marker?
    own_session: bool = False
    stdio: str = "?"


def spawn_name(cls: Any) -> str:
    """The name of the class ansible_runner.runner calls as pexpect.spawn."""
    module = getattr(cls, "__module__", "")
    return "pexpect.spawn" if module.startswith("pexpect") else getattr(cls, "__name__", repr(cls))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process is gone, or not ours to read
        return b""


def look_at_job(pdd: Path, ev: Evidence) -> None:
    """Find the job's processes in /proc: ansible-playbook and its workers name the job's directory."""
    host = os.getpid()
    needle = os.fsencode(str(pdd)) + b"/"
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if int(pid) in ev.marked or needle not in _read(f"/proc/{pid}/cmdline"):
            continue
        environ = _read(f"/proc/{pid}/environ").split(b"\0")
        stat = _read(f"/proc/{pid}/stat")
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 4:
            continue  # gone meanwhile
        ev.marked[int(pid)] = any(v.startswith(MARKER) for v in environ)
        if int(fields[1]) == host:  # ansible-playbook itself: the host's child
            ev.own_session = int(fields[3]) == int(pid)  # it leads its session
            try:
                stdout = os.readlink(f"/proc/{pid}/fd/1")
            except OSError:
                continue
            ev.seen = True
            ev.stdio = "pipe" if stdout.startswith("pipe:") else "pty" if stdout.startswith("/dev/pts/") else stdout


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


def run_job(pdd: Path, playbook: str, ev: Evidence) -> ansible_runner.Runner:
    ev.spawn = spawn_name(ansible_runner.runner.pexpect.spawn)  # what Runner.run() is about to call

    def on_event(event: dict[str, Any]) -> bool:
        look_at_job(pdd, ev)  # while the job runs; its workers come and go
        return True  # keep the event

    return ansible_runner.run(private_data_dir=str(pdd), playbook=playbook, quiet=True, event_handler=on_event)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} jobs: give 1 or more")
    return n


ROW = "{:<6} {:<10} {:<11} {:<11} {:>4} {:>6}  {:<14} {:<7} {:<8} {}"


async def main(jobs: int, stock: bool) -> int:
    if not stock:
        runner_spawn.install()  # once, at startup
    names = sorted(EXPECTED)
    plan = [names[i % len(names)] for i in range(jobs)]
    loop = asyncio.get_running_loop()
    print(ROW.format("job", "playbook", "expected", "status", "rc", "events", "spawn", "marker", "session", "stdio"))
    print("(marker: job processes seen with RUNNER_SPAWN_JOB in /proc/PID/environ; session: own = leads its own)")
    bad = not_patched = 0
    with tempfile.TemporaryDirectory(prefix="runner-spawn-example-") as tmp, ThreadPoolExecutor(jobs) as pool:
        dirs = [make_private_data_dir(Path(tmp), f"job{i}", pb) for i, pb in enumerate(plan)]
        evidence = [Evidence() for _ in plan]
        forks_before = _at_fork_calls[0]
        started = time.monotonic()

        async def one(i: int) -> tuple[int, ansible_runner.Runner]:
            return i, await loop.run_in_executor(pool, run_job, dirs[i], plan[i], evidence[i])

        for finished in asyncio.as_completed([one(i) for i in range(jobs)]):
            i, r = await finished
            pb, ev = plan[i], evidence[i]
            events = [e["event"] for e in r.events]  # read from the job's artifacts
            ok = r.status == EXPECTED[pb] and events[-1:] == ["playbook_on_stats"]
            patched = ev.spawn == "RunnerSpawn" and ev.seen and all(ev.marked.values()) and ev.stdio == "pipe"
            bad += not ok
            not_patched += not patched
            marker = f"{sum(ev.marked.values())}/{len(ev.marked)}" if ev.seen else "unseen"
            session = ("own" if ev.own_session else "host's") if ev.seen else "unseen"
            line = ROW.format(
                f"job{i}", pb, EXPECTED[pb], r.status, str(r.rc), len(events), ev.spawn, marker, session, ev.stdio
            )
            print(line.rstrip() + ("" if ok else "  UNEXPECTED"), flush=True)
        elapsed = time.monotonic() - started
        forks = _at_fork_calls[0] - forks_before
    print(f"{jobs} jobs in {elapsed:.1f}s; {'all as expected' if not bad else f'{bad} unexpected'}")
    print(f"Python at-fork callbacks while the jobs ran: {forks}")
    if stock:
        print("runner-spawn not installed (--stock): Runner used stock pexpect.spawn")
    elif not_patched or forks:
        print(f"runner-spawn {runner_spawn.__version__} NOT in effect: {not_patched} job(s) without its evidence")
    else:
        print(
            f"runner-spawn {runner_spawn.__version__} in effect: every job started by RunnerSpawn "
            "(posix_spawn, no Python between fork and exec), on pipes, marked, in a session of its own"
        )
    return 1 if bad or (not stock and (not_patched or forks)) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=positive_int, default=8, help="playbooks to run at once (default 8)")
    parser.add_argument("--stock", action="store_true", help="do not install runner-spawn (for comparison)")
    args = parser.parse_args()
    # ansible-playbook comes from the environment this interpreter belongs to.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    sys.exit(asyncio.run(main(args.jobs, args.stock)))
