"""Concurrency soak: many real ansible-runner jobs at once, some cancelled, some timing out.

Run::

    python benchmarks/soak.py --in-flight 32 --duration 120

An asyncio program keeps ``--in-flight`` jobs running through a thread pool, each an
``ansible_runner.run()`` of a real playbook against localhost (connection local), for
``--duration`` seconds, then lets the last jobs finish. Jobs take turns being plain,
having a slow event handler, being cancelled through ``cancel_callback`` while a task
sleeps, and hitting ``job_timeout``. runner_spawn is installed unless ``--stock``.

It reports jobs completed, hangs (jobs not done by their deadline), events lost (gaps in
event counters, partial event files never delivered, a missing or misplaced
``playbook_on_stats``, a count different from the playbook's), processes left (this
process is a child subreaper, so everything the jobs started stays its descendant), open
fds and threads before and after, and CPU per job. Exit status 1 if anything was off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("plain", "slow-handler", "plain", "cancel", "plain", "slow-handler", "plain", "timeout")

QUICK_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      debug:
        msg: hello
    - name: run a module
      command: echo soak
    - name: loop
      debug:
        msg: "item {{ item }}"
      loop: [1, 2, 3]
"""
# playbook_on_start, play_start, 3 x (task_start, runner_on_start), runner_on_ok x 2,
# runner_item_on_ok x 3, runner_on_ok (loop), playbook_on_stats
QUICK_EVENTS = 15

SLEEP_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: about to sleep
      debug:
        msg: sleeping
    - name: sleep
      command: sleep 60
"""

# --- processes, through /proc --------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of anything this process starts re-parent to it instead of init."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0].decode()


def descendants() -> dict[int, int]:
    """{pid: start time} of this process's live (non-zombie) descendants."""
    kids: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                info[int(name)] = st
                kids.setdefault(st[0], []).append(int(name))
    found: dict[int, int] = {}
    stack = [os.getpid()]
    while stack:
        for pid in kids.get(stack.pop(), ()):
            if pid not in found and info[pid][2] != "Z":
                found[pid] = info[pid][1]
            stack.append(pid)
    return found


def _reap_orphan_zombies(ours: set[int]) -> None:
    """Reap zombie children of this (subreaper) process that are not in ``ours``."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in ours:
            st = _stat(int(name))
            if st is not None and st[0] == me and st[2] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(name), os.WNOHANG)


def _kill_exact(procs: dict[int, int]) -> None:
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- one job -------------------------------------------------------------------------


@dataclass
class JobResult:
    index: int
    kind: str
    status: str
    rc: int | None
    seconds: float
    events: int
    lost: int  # events the job produced but the handler never saw
    problems: list[str] = field(default_factory=list)
    hung: bool = False


class Job:
    """One ``ansible_runner.run()`` in its own private_data_dir."""

    def __init__(self, index: int, kind: str, root: Path, slow_delay: float, job_timeout: int) -> None:
        self.index, self.kind = index, kind
        self.slow_delay, self.job_timeout = slow_delay, job_timeout
        self.pdd = root / f"job{index:05d}"
        (self.pdd / "project").mkdir(parents=True)
        (self.pdd / "inventory").mkdir()
        quick = kind in ("plain", "slow-handler")
        (self.pdd / "project" / "site.yml").write_text(QUICK_PLAYBOOK if quick else SLEEP_PLAYBOOK)
        (self.pdd / "inventory" / "hosts").write_text(
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        )
        self.events: list[dict[str, Any]] = []
        self.sleep_started: float | None = None
        self.cancel_at = random.uniform(0.2, 1.5)

    def event_handler(self, event: dict[str, Any]) -> bool:
        self.events.append({k: event.get(k) for k in ("counter", "uuid", "event")})
        if event.get("event") == "runner_on_start" and (event.get("event_data") or {}).get("task") == "sleep":
            self.sleep_started = time.monotonic()
        if self.kind == "slow-handler":
            time.sleep(self.slow_delay)
        return True

    def cancel_callback(self) -> bool:
        return self.sleep_started is not None and time.monotonic() - self.sleep_started > self.cancel_at

    def run(self, pexpect_timeout: float) -> JobResult:
        import ansible_runner

        t0 = time.monotonic()
        kw: dict[str, Any] = {}
        if self.kind == "cancel":
            kw["cancel_callback"] = self.cancel_callback
        if self.kind == "timeout":
            kw["timeout"] = self.job_timeout  # becomes the config's job_timeout
        r = ansible_runner.run(
            private_data_dir=str(self.pdd),
            playbook="site.yml",
            ident="soak",
            quiet=True,
            event_handler=self.event_handler,
            settings={"pexpect_timeout": pexpect_timeout, "suppress_ansible_output": True},
            **kw,
        )
        return self.check(r.status, r.rc, time.monotonic() - t0)

    def check(self, status: str, rc: int | None, seconds: float) -> JobResult:
        """Compare what the handler saw with the artifacts and with the playbook."""
        problems = []
        expected_status = {"cancel": "canceled", "timeout": "timeout"}.get(self.kind, "successful")
        if status != expected_status:
            problems.append(f"status {status} (rc {rc}), expected {expected_status}")
        counters = sorted(e["counter"] for e in self.events)
        missing: set[int] = set()  # counters of events the handler never saw
        if counters and counters != list(range(1, counters[-1] + 1)):
            gaps = set(range(1, counters[-1] + 1)) - set(counters)
            missing |= gaps
            problems.append(f"event counters missing: {sorted(gaps)[:10]}")
        events_dir = self.pdd / "artifacts" / "soak" / "job_events"
        names = os.listdir(events_dir) if events_dir.is_dir() else []
        partial = [n for n in names if n.endswith("-partial.json")]
        written = {  # uuid -> counter, from "<counter>-<uuid>.json"
            n[: -len(".json")].split("-", 1)[1]: int(n.split("-", 1)[0])
            for n in names
            if not n.endswith(("-partial.json", ".tmp"))
        }
        seen = {e["uuid"] for e in self.events}
        if set(written) != seen:
            problems.append(f"job_events/ has {len(written)} events, the handler saw {len(seen)}")
            missing |= {written[u] for u in set(written) - seen}
        lost = len(missing)
        if expected_status == "successful":
            # Every event ansible wrote a partial file for must have been delivered.
            lost += len(partial)
            if partial:
                problems.append(f"{len(partial)} events written by ansible never delivered")
            if len(self.events) != QUICK_EVENTS:
                lost = max(lost, QUICK_EVENTS - len(self.events))
                problems.append(f"{len(self.events)} events, the playbook makes {QUICK_EVENTS}")
            if not self.events or self.events[-1]["event"] != "playbook_on_stats":
                problems.append("playbook_on_stats is not the last event")
        return JobResult(self.index, self.kind, status, rc, round(seconds, 2), len(self.events), lost, problems)


# --- the soak ------------------------------------------------------------------------


@dataclass
class SoakReport:
    in_flight: int
    duration: float
    patched: bool
    jobs_completed: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    hangs: int = 0
    events_delivered: int = 0
    events_lost: int = 0
    wrong_status: int = 0
    processes_left: int = 0
    fds_before: int = 0
    fds_after: int = 0
    threads_before: int = 0
    threads_after: int = 0
    wall_seconds: float = 0.0
    host_cpu_per_job: float = 0.0  # this process (supervision), CPU-seconds
    jobs_cpu_per_job: float = 0.0  # ansible-playbook and its workers, CPU-seconds
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.jobs_completed > 0
            and self.hangs == 0
            and self.events_lost == 0
            and self.wrong_status == 0
            and self.processes_left == 0
            and self.fds_after == self.fds_before
            and self.threads_after == self.threads_before
        )

    def text(self) -> str:
        lines = [
            f"soak: {self.in_flight} jobs in flight for {self.duration:g}s "
            f"({'runner_spawn installed' if self.patched else 'stock pexpect.spawn'}), {self.wall_seconds:.0f}s wall",
            f"  jobs completed   {self.jobs_completed}  "
            + "  ".join(f"{k}={v}" for k, v in sorted(self.by_kind.items())),
            f"  hangs            {self.hangs}",
            f"  events lost      {self.events_lost} (of {self.events_delivered} delivered)",
            f"  wrong status     {self.wrong_status}",
            f"  processes left   {self.processes_left}",
            f"  fds              {self.fds_before} before, {self.fds_after} after",
            f"  threads          {self.threads_before} before, {self.threads_after} after",
            f"  CPU per job      {self.host_cpu_per_job * 1000:.0f} ms host, {self.jobs_cpu_per_job:.2f} s in the job",
        ]
        lines += [f"  ! {p}" for p in self.problems[:20]]
        return "\n".join(lines)


async def _keep_in_flight(
    report: SoakReport,
    root: Path,
    pool: ThreadPoolExecutor,
    slow_delay: float,
    job_timeout: int,
    pexpect_timeout: float,
    hang_after: float,
) -> list[JobResult]:
    loop = asyncio.get_running_loop()
    end = loop.time() + report.duration
    results: list[JobResult] = []
    running: set[asyncio.Future[JobResult]] = set()
    index = 0

    async def one(job: Job) -> JobResult:
        fut = loop.run_in_executor(pool, job.run, pexpect_timeout)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), hang_after)
        except asyncio.TimeoutError:
            result = JobResult(job.index, job.kind, "hung", None, hang_after, len(job.events), 0, hung=True)
            result.problems.append(f"not done after {hang_after:g}s")
            return result

    while True:
        while loop.time() < end and len(running) < report.in_flight:
            job = Job(index, KINDS[index % len(KINDS)], root, slow_delay, job_timeout)
            running.add(asyncio.ensure_future(one(job)))
            index += 1
        if not running:
            return results
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        results.extend(f.result() for f in done)


def run_soak(
    in_flight: int = 32,
    duration: float = 60.0,
    *,
    patched: bool = True,
    slow_delay: float = 0.1,
    job_timeout: int = 3,
    pexpect_timeout: float = 1.0,
    hang_after: float = 300.0,
    workdir: str | None = None,
) -> SoakReport:
    """Run the soak in this process and return its report.

    The caller's process should be a child subreaper (:func:`become_subreaper`) so that
    processes left by jobs stay findable.
    """
    import ansible_runner  # noqa: F401 - imported before measuring fds and threads

    import runner_spawn

    gc.collect()
    report = SoakReport(in_flight, duration, patched)
    procs_before = descendants()
    report.fds_before, report.threads_before = open_fds(), threading.active_count()
    ru_self, ru_kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="runner-spawn-soak-", dir=workdir))
    installed_here = patched and not runner_spawn.is_installed()
    if installed_here:
        runner_spawn.install()
    results: list[JobResult] = []
    try:
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="soak-job") as pool:
            results = asyncio.run(
                _keep_in_flight(report, root, pool, slow_delay, job_timeout, pexpect_timeout, hang_after)
            )
            if any(r.hung for r in results):
                # Free the blocked threads: end what the jobs started (all ours), then wait.
                _kill_exact({p: s for p, s in descendants().items() if p not in procs_before})
    finally:
        if installed_here:
            runner_spawn.uninstall()
        shutil.rmtree(root, ignore_errors=True)
    report.wall_seconds = round(time.monotonic() - t0, 1)
    ru_self2, ru_kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    left: dict[int, int] = {}
    for _ in range(150):  # processes that are exiting get 3 s
        left = {p: s for p, s in descendants().items() if p not in procs_before}
        if not left:
            break
        time.sleep(0.02)
    report.processes_left = len(left)
    if left:
        report.problems.append(f"processes left: {sorted(left)}")
        _kill_exact(left)
    _reap_orphan_zombies(set(procs_before))
    gc.collect()
    report.fds_after, report.threads_after = open_fds(), threading.active_count()

    for r in results:
        report.by_kind[r.kind] = report.by_kind.get(r.kind, 0) + 1
        report.events_delivered += r.events
        report.events_lost += r.lost
        report.hangs += r.hung
        report.wrong_status += bool(not r.hung and any(p.startswith("status") for p in r.problems))
        report.problems += [f"job {r.index} ({r.kind}): {p}" for p in r.problems]
    report.jobs_completed = sum(not r.hung for r in results)
    n = max(report.jobs_completed, 1)
    report.host_cpu_per_job = (ru_self2.ru_utime + ru_self2.ru_stime - ru_self.ru_utime - ru_self.ru_stime) / n
    report.jobs_cpu_per_job = (ru_kids2.ru_utime + ru_kids2.ru_stime - ru_kids.ru_utime - ru_kids.ru_stime) / n
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=32, help="jobs running at once")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to keep starting jobs")
    parser.add_argument("--slow-delay", type=float, default=0.1, help="seconds a slow event handler takes per event")
    parser.add_argument("--job-timeout", type=int, default=3, help="job_timeout of the timing-out jobs")
    parser.add_argument("--pexpect-timeout", type=float, default=1.0, help="ansible-runner's pexpect_timeout setting")
    parser.add_argument("--hang-after", type=float, default=300.0, help="seconds after which a job counts as hung")
    parser.add_argument("--stock", action="store_true", help="do not install runner_spawn (for comparison)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    bin_dir = os.path.dirname(sys.executable)  # ansible-playbook of this interpreter
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    become_subreaper()
    report = run_soak(
        args.in_flight,
        args.duration,
        patched=not args.stock,
        slow_delay=args.slow_delay,
        job_timeout=args.job_timeout,
        pexpect_timeout=args.pexpect_timeout,
        hang_after=args.hang_after,
    )
    print(json.dumps({**asdict(report), "ok": report.ok}) if args.json else report.text(), flush=True)
    if report.hangs:
        os._exit(1)  # job threads may still be blocked; do not wait for them
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
