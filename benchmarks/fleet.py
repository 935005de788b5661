"""A fleet of concurrent playbooks in one host process: stock against RunnerSpawn.

Usage::

    python benchmarks/fleet.py                 # 8, 32 and 64 jobs; several minutes
    python benchmarks/fleet.py --quick         # smoke run: 2 jobs, a 3-task playbook
    python benchmarks/fleet.py --jobs 64 --reps 3 --impls stock,runner_spawn --breakdown

Each measurement is one fresh host process (this file with ``--worker``) that runs N
``ansible_runner.run()`` jobs at once, each on its own localhost playbook:

- driver ``threads``: a ``ThreadPoolExecutor`` with N threads calls ``ansible_runner.run()``;
- driver ``asyncio``: N tasks in one event loop; RunnerSpawn through ``runner_spawn.aio.run``,
  stock and PopenSpawn through ``loop.run_in_executor`` (as ansible-rulebook does), each
  with an executor of N threads. ``aio.run`` checks for cancellation every 0.25 s
  (its ``CANCEL_POLL``); stock checks every 5 s.

Reported per implementation (``benchmarks/impls.py``: ``pexpect.spawn``, plain
``PopenSpawn``, ``RunnerSpawn``):

- host CPU per job: the host process's own user+system CPU time (all its threads, not
  its children: ansible-playbook's CPU is not counted) from just before the jobs start
  to just after the last ends, divided by N;
- wall time for all N jobs;
- events delivered to ``event_handler`` against the events the playbook produces
  (every job must deliver all of them, ending with ``playbook_on_stats``);
- p50 and p99 event latency: the event's ``created`` time (stamped by ansible's
  callback plugin in ansible-playbook) to the ``event_handler`` call in the host.
  ``verbose`` events, which Runner stamps itself on arrival, are left out.

Implementations take turns within each repetition, the first one rotating; the table
shows medians and, with ``--reps`` above 1, the spread (min-max). Each run records the
load average at its start. ``--breakdown`` also splits the host's CPU per job by thread
CPU time (:class:`Breakdown`): ansible-runner's event processing, the spawn's
read/expect path, starting and closing the spawn, and the rest.

The goal (issue 18): at 64 jobs on 2 cores, host CPU at most 0.5x stock and p99 event
latency at most stock's, with every event delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from impls import LABELS, use_in_runner  # noqa: E402

DRIVERS = ("threads", "asyncio")
FULL_JOBS = (8, 32, 64)
QUICK_JOBS = (2,)
#: debug tasks before and after one quiet ``command: sleep`` task, per playbook.
FULL_DEBUG_TASKS = 10
QUICK_DEBUG_TASKS = 2
FULL_SLEEP = 2
QUICK_SLEEP = 1
#: PopenSpawn busy-polls (0.16 CPU-s per second per quiet job); above this many jobs it
#: would starve the others on 2 cores and is not run unless asked for with --popen-max.
POPEN_MAX_DEFAULT = 32


# --- the worker: one host process, N concurrent jobs ---------------------------------


def playbook(debug_tasks: int, sleep: int) -> str:
    tasks = [f"    - name: step {i}\n      debug:\n        msg: step-{i}\n" for i in range(debug_tasks)]
    tasks.append(f"    - name: quiet\n      command: sleep {sleep}\n")
    tasks.append("    - name: done\n      debug:\n        msg: done\n")
    return "- hosts: all\n  gather_facts: false\n  tasks:\n" + "".join(tasks)


def expected_events(debug_tasks: int) -> int:
    """playbook_on_start, play_start, 3 per task (task_start, runner_on_start, runner_on_ok), stats."""
    return 2 + 3 * (debug_tasks + 2) + 1


def make_job_dirs(base: Path, jobs: int, debug_tasks: int, sleep: int) -> list[Path]:
    dirs = []
    text = playbook(debug_tasks, sleep)
    inventory = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    for i in range(jobs):
        pdd = base / f"job{i}"
        (pdd / "project").mkdir(parents=True)
        (pdd / "inventory").mkdir()
        (pdd / "project" / "site.yml").write_text(text)
        (pdd / "inventory" / "hosts").write_text(inventory)
        dirs.append(pdd)
    return dirs


def _created(event: dict[str, Any]) -> float | None:
    raw = event.get("created")
    if not raw or event.get("event") == "verbose":
        return None
    when = datetime.datetime.fromisoformat(raw)
    if when.tzinfo is None:  # older callback plugins stamp naive UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


class Recorder:
    """The jobs' ``event_handler``s: counts events per job and records latencies."""

    def __init__(self, jobs: int) -> None:
        self.counts = [0] * jobs
        self.last = [""] * jobs
        self.latencies: list[float] = []
        self.samples: list[tuple[float, float, str]] = []  # (created, delivered, event name)
        self.lock = threading.Lock()

    def handler(self, job: int, event: dict[str, Any]) -> bool:
        now = time.time()
        created = _created(event)
        with self.lock:
            self.counts[job] += 1
            self.last[job] = str(event.get("event"))
            if created is not None:
                self.latencies.append(now - created)
                self.samples.append((created, now, str(event.get("event"))))
        return True


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Breakdown:
    """Per-thread CPU time (``time.thread_time``) spent in each part of a job's path.

    - ``events``: ``OutputEventFilter.write`` (ansible-runner's own event processing:
      decoding, json, writing ``job_events``, calling ``event_handler``);
    - ``spawn_read``: the spawn's ``expect()`` and ``isalive()`` minus ``events`` (the
      read/expect path: poll, read, decode, slicing, pattern search);
    - ``spawn_start``: constructing the spawn (fork+exec, or posix_spawn) and ``close()``;
    - ``events_wait`` (not CPU): wall time inside ``OutputEventFilter.write`` beyond its
      CPU time: waiting for the GIL and for a core while an event is being delivered.

    The rest of the host's CPU is Runner's set-up and teardown per job (artifacts,
    env, command line), the drivers' threads and event loop, and the interpreter's
    switching between threads.
    """

    def __init__(self) -> None:
        self.totals = {"events": 0.0, "spawn_read": 0.0, "spawn_start": 0.0, "events_wait": 0.0}
        self.calls = {"events": 0, "spawn_read": 0}
        self.lock = threading.Lock()
        self.local = threading.local()

    def _add(self, key: str, seconds: float, calls: int = 1) -> None:
        with self.lock:
            self.totals[key] += seconds
            if key in self.calls:
                self.calls[key] += calls

    def install(self, spawn_cls: Any) -> None:
        from ansible_runner.utils import OutputEventFilter

        bd = self
        write = OutputEventFilter.write

        def timed_write(filt: Any, data: Any) -> Any:
            w0, t0 = time.monotonic(), time.thread_time()
            try:
                return write(filt, data)
            finally:
                took = time.thread_time() - t0
                bd.local.events = getattr(bd.local, "events", 0.0) + took
                bd._add("events", took)
                bd._add("events_wait", max(0.0, time.monotonic() - w0 - took), 0)

        OutputEventFilter.write = timed_write  # type: ignore[method-assign]

        def outer(name: str, key: str) -> None:
            inner = getattr(spawn_cls, name)

            @functools.wraps(inner)
            def timed(spawn: Any, *args: Any, **kwargs: Any) -> Any:
                if getattr(bd.local, "depth", 0):
                    return inner(spawn, *args, **kwargs)
                bd.local.depth = 1
                ev0, t0 = getattr(bd.local, "events", 0.0), time.thread_time()
                try:
                    return inner(spawn, *args, **kwargs)
                finally:
                    bd.local.depth = 0
                    bd._add(key, time.thread_time() - t0 - (getattr(bd.local, "events", 0.0) - ev0))

            setattr(spawn_cls, name, timed)

        for name in ("expect", "isalive"):
            outer(name, "spawn_read")
        for name in ("__init__", "close"):
            outer(name, "spawn_start")


def spawn_class(impl: str) -> Any:
    """The class whose instances Runner.run() gets as its child under ``impl``."""
    if impl == "stock":
        import pexpect

        return pexpect.spawn
    if impl == "runner_spawn":
        from runner_spawn import RunnerSpawn

        return RunnerSpawn
    from impls import PlainPopen

    return PlainPopen


def run_fleet(
    impl: str, driver: str, dirs: list[Path], breakdown: Breakdown | None = None
) -> tuple[Recorder, list[tuple[str, Any]], float, float]:
    """Run one job per directory at once; (recorder, (status, rc) per job, host CPU s, wall s)."""
    import ansible_runner

    use_in_runner(impl)
    if breakdown is not None:
        breakdown.install(spawn_class(impl))
    rec = Recorder(len(dirs))

    def kwargs(i: int, pdd: Path) -> dict[str, Any]:
        return {
            "private_data_dir": str(pdd),
            "playbook": "site.yml",
            "quiet": True,
            "event_handler": functools.partial(rec.handler, i),
        }

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=len(dirs), thread_name_prefix="job")
    cpu0, t0 = _cpu_self(), time.monotonic()
    try:
        if driver == "threads":
            futures = [executor.submit(ansible_runner.run, **kwargs(i, d)) for i, d in enumerate(dirs)]
            runners = [f.exception() or f.result() for f in futures]
        elif driver == "asyncio":
            runners = asyncio.run(_run_async(impl, executor, [kwargs(i, d) for i, d in enumerate(dirs)]))
        else:
            raise SystemExit(f"unknown driver {driver!r}; expected one of {', '.join(DRIVERS)}")
    finally:
        executor.shutdown(wait=True)
    cpu, wall = _cpu_self() - cpu0, time.monotonic() - t0
    # A job whose Runner.run() raised (stock's final expect(EOF, timeout=5) on a loaded
    # machine, ansible-runner issue 1343) is counted, not allowed to end the measurement.
    outcomes = [("raised", type(r).__name__) if isinstance(r, BaseException) else (r.status, r.rc) for r in runners]
    return rec, outcomes, cpu, wall


async def _run_async(impl: str, executor: concurrent.futures.Executor, jobs: list[dict[str, Any]]) -> list[Any]:
    import ansible_runner

    if impl == "runner_spawn":
        from runner_spawn import aio

        return list(await asyncio.gather(*(aio.run(executor=executor, **kw) for kw in jobs), return_exceptions=True))
    loop = asyncio.get_running_loop()
    calls = [loop.run_in_executor(executor, functools.partial(ansible_runner.run, **kw)) for kw in jobs]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    base = Path(tempfile.mkdtemp(prefix="fleet-"))
    try:
        dirs = make_job_dirs(base, spec["jobs"], spec["debug_tasks"], spec["sleep"])
        breakdown = Breakdown() if spec.get("breakdown") else None
        rec, outcomes, cpu, wall = run_fleet(spec["impl"], spec["driver"], dirs, breakdown)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if os.environ.get("FLEET_SAMPLES"):
        Path(os.environ["FLEET_SAMPLES"]).write_text(json.dumps(rec.samples))
    expected = expected_events(spec["debug_tasks"])
    return {
        **spec,
        "cpu_s": cpu,
        "wall_s": wall,
        "events": sum(rec.counts),
        "events_expected": expected * spec["jobs"],
        "jobs_complete": sum(
            1 for c, last in zip(rec.counts, rec.last) if c == expected and last == "playbook_on_stats"
        ),
        "outcomes": sorted({f"{s}/{rc}" for s, rc in outcomes}),
        "p50_ms": None if not rec.latencies else 1000 * (_percentile(rec.latencies, 0.50) or 0.0),
        "p99_ms": None if not rec.latencies else 1000 * (_percentile(rec.latencies, 0.99) or 0.0),
        "latency_samples": len(rec.latencies),
        **({} if breakdown is None else {"breakdown_s": breakdown.totals, "breakdown_calls": breakdown.calls}),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }


# --- the driver: one fresh process per measurement, a table --------------------------


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # ansible-playbook must come from the interpreter running the benchmark.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": f"worker exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def _spread(ok: list[dict[str, Any]], key: str, scale: float) -> str:
    """`` (min-max)`` of ``key`` times ``scale`` over repetitions; empty for one."""
    values = [r[key] * scale for r in ok if r.get(key) is not None]
    if len(values) < 2:
        return ""
    return f" ({min(values):.0f}-{max(values):.0f})"


def breakdown_table(results: list[dict[str, Any]], impls: list[str]) -> str:
    """Medians per job (ms of host CPU) of the parts :class:`Breakdown` measures."""
    rows = [
        "| jobs | driver | implementation | event processing | spawn read/expect | spawn start+close "
        "| rest | total | waiting in event delivery |"
    ]
    rows.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    keys = sorted({(r["jobs"], r["driver"]) for r in results}, key=lambda k: (k[0], DRIVERS.index(k[1])))
    for jobs, driver in keys:
        for impl in impls:
            ok = [
                r for r in results if (r["jobs"], r["driver"], r["impl"]) == (jobs, driver, impl) and "breakdown_s" in r
            ]
            if not ok:
                continue

            def part(name: str, ok: list[dict[str, Any]] = ok, jobs: int = jobs) -> float:
                return statistics.median(r["breakdown_s"][name] for r in ok) * 1000 / jobs

            total = statistics.median(r["cpu_s"] for r in ok) * 1000 / jobs
            measured = part("events") + part("spawn_read") + part("spawn_start")
            rows.append(
                f"| {jobs} | {driver} | {LABELS[impl]} | {part('events'):.1f} ms | {part('spawn_read'):.1f} ms "
                f"| {part('spawn_start'):.1f} ms | {total - measured:.1f} ms | {total:.1f} ms "
                f"| {part('events_wait'):.0f} ms |"
            )
    return "\n".join(rows)


def table(results: list[dict[str, Any]], impls: list[str]) -> tuple[str, str, list[str]]:
    """(per-implementation table, ratio table, goal verdict lines)."""
    rows = ["| jobs | driver | implementation | host CPU / job | wall | events delivered | p50 latency | p99 latency |"]
    rows.append("|---:|---|---|---:|---:|---:|---:|---:|")
    ratios = ["| jobs | driver | host CPU, RunnerSpawn / stock | p99 latency, RunnerSpawn / stock |"]
    ratios.append("|---:|---|---:|---:|")
    verdict: list[str] = []
    keys = sorted({(r["jobs"], r["driver"]) for r in results}, key=lambda k: (k[0], DRIVERS.index(k[1])))
    for jobs, driver in keys:
        by_impl: dict[str, dict[str, Any]] = {}
        for impl in impls:
            group = [r for r in results if (r["jobs"], r["driver"], r["impl"]) == (jobs, driver, impl)]
            if not group:
                continue
            errors = [r["error"] for r in group if "error" in r]
            ok = [r for r in group if "error" not in r]
            if not ok:
                rows.append(f"| {jobs} | {driver} | {LABELS[impl]} | error: {errors[0][:80]} | | | | |")
                continue
            cpu = _median(ok, "cpu_s")
            summary = {
                "cpu_job": None if cpu is None else cpu / jobs,
                "wall": _median(ok, "wall_s"),
                "p50": _median(ok, "p50_ms"),
                "p99": _median(ok, "p99_ms"),
                "events": min(r["events"] for r in ok),
                "expected": ok[0]["events_expected"],
                "complete": all(r["jobs_complete"] == jobs for r in ok),
                "outcomes": sorted({o for r in ok for o in r["outcomes"]}),
            }
            by_impl[impl] = summary
            delivered = f"{summary['events']}/{summary['expected']}"
            if not summary["complete"] or summary["outcomes"] != ["successful/0"]:
                delivered += f" ({', '.join(summary['outcomes'])})"
            cpu_job = summary["cpu_job"]
            cpu_cell = "n/a" if cpu_job is None else f"{cpu_job * 1000:.0f} ms{_spread(ok, 'cpu_s', 1000 / jobs)}"
            rows.append(
                f"| {jobs} | {driver} | {LABELS[impl]} | {cpu_cell} "
                f"| {summary['wall']:.1f} s | {delivered} | {_ms(summary['p50'])} "
                f"| {_ms(summary['p99'])}{_spread(ok, 'p99_ms', 1)} |"
            )
        stock, ours = by_impl.get("stock"), by_impl.get("runner_spawn")
        if stock and ours:
            cpu_ratio = _ratio(ours["cpu_job"], stock["cpu_job"])
            p99_ratio = _ratio(ours["p99"], stock["p99"])
            ratios.append(f"| {jobs} | {driver} | {cpu_ratio} | {p99_ratio} |")
            if jobs == max(FULL_JOBS):
                met_cpu = ours["cpu_job"] is not None and ours["cpu_job"] <= 0.5 * stock["cpu_job"]
                met_p99 = ours["p99"] is not None and stock["p99"] is not None and ours["p99"] <= stock["p99"]
                met_all = ours["complete"] and ours["outcomes"] == ["successful/0"]
                verdict.append(
                    f"goal at {jobs} jobs, {driver}: host CPU <= 0.5x stock: {'met' if met_cpu else 'NOT met'} "
                    f"({cpu_ratio}); p99 <= stock: {'met' if met_p99 else 'NOT met'} ({p99_ratio}); "
                    f"every event delivered: {'yes' if met_all else 'NO'}"
                )
    return "\n".join(rows), "\n".join(ratios), verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 jobs of a 3-task playbook")
    parser.add_argument("--jobs", help="comma-separated fleet sizes (default 8,32,64; --quick: 2)")
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="threads,asyncio")
    parser.add_argument("--impls", default="stock,popen,runner_spawn", help="stock,popen,runner_spawn")
    parser.add_argument("--reps", type=int, default=1, help="repetitions per measurement (median)")
    parser.add_argument("--popen-max", type=int, default=POPEN_MAX_DEFAULT, help="largest fleet PopenSpawn is run with")
    parser.add_argument(
        "--breakdown", action="store_true", help="also split the host's CPU per job into its parts (thread CPU time)"
    )
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    try:
        sizes = [int(n) for n in args.jobs.split(",")] if args.jobs else list(QUICK_JOBS if args.quick else FULL_JOBS)
    except ValueError:
        parser.error(f"--jobs takes comma-separated whole numbers, e.g. 8,32,64; got {args.jobs!r}")
    if any(n < 1 for n in sizes):
        parser.error("--jobs: every fleet size must be at least 1")
    drivers = [d for d in args.drivers.split(",") if d]
    impls = [i for i in args.impls.split(",") if i]
    for d in drivers:
        if d not in DRIVERS:
            parser.error(f"--drivers: unknown driver {d!r}; choose from {', '.join(DRIVERS)}")
    for i in impls:
        if i not in LABELS:
            parser.error(f"--impls: unknown implementation {i!r}; choose from {', '.join(LABELS)}")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    debug_tasks = QUICK_DEBUG_TASKS if args.quick else FULL_DEBUG_TASKS
    sleep = QUICK_SLEEP if args.quick else FULL_SLEEP

    print(
        f"# fleet: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{debug_tasks + 2}-task playbook ({expected_events(debug_tasks)} events per job), reps {args.reps}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    turn = 0
    for jobs in sizes:
        for driver in drivers:
            for rep in range(args.reps):
                order = impls[turn % len(impls) :] + impls[: turn % len(impls)]  # rotate who goes first
                turn += 1
                for impl in order:
                    if impl == "popen" and jobs > args.popen_max:
                        continue
                    spec = {
                        "impl": impl,
                        "driver": driver,
                        "jobs": jobs,
                        "debug_tasks": debug_tasks,
                        "sleep": sleep,
                        "breakdown": args.breakdown,
                    }
                    t0 = time.monotonic()
                    result = measure(spec, timeout=120 + 10 * jobs)
                    results.append(result)
                    note = result.get("error") or (
                        f"cpu {result['cpu_s']:.2f}s wall {result['wall_s']:.1f}s "
                        f"events {result['events']}/{result['events_expected']} p99 {_ms(result['p99_ms'])} "
                        f"load {result['loadavg_start']:.1f}"
                    )
                    took = time.monotonic() - t0
                    print(
                        f"  {jobs:>3} {driver:<8} {LABELS[impl]:<14} rep {rep + 1}: {note} ({took:.0f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
    per_impl, ratios, verdict = table(results, impls)
    print(per_impl)
    print()
    print(ratios)
    if args.breakdown:
        print()
        print(breakdown_table(results, impls))
    skipped = [n for n in sizes if n > args.popen_max and "popen" in impls]
    if skipped:
        print(f"\nPopenSpawn not run at {', '.join(map(str, skipped))} jobs (it busy-polls; --popen-max to change).")
    if verdict:
        print()
        print("\n".join(verdict))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
