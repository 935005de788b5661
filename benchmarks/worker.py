"""One measurement in this (fresh) process; prints one JSON object on stdout.

Usage: ``python benchmarks/worker.py CASE IMPL 'PARAMS_JSON'``. run.py starts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from impls import CountingSink, child_env, drive, spawn, use_in_runner

Result = dict[str, Any]


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited through
    exec from the parent's memory (a vfork-started process carries that over)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def quiet(impl: str, p: dict[str, Any]) -> Result:
    """Supervisor CPU per second while ``jobs`` quiet children run, one thread each.

    The window starts once every child is spawned and ``settle`` seconds passed;
    afterwards the children get SIGTERM (from their pid) so the run ends early.
    """
    jobs, window, settle = int(p["jobs"]), float(p["window"]), float(p["settle"])
    if p["kind"] == "sleep":
        argv = ["sleep", str(p["child_seconds"])]
    else:  # one line per second, a single process so SIGTERM ends all of it
        code = "import sys,time\nfor i in range(3600):\n print('line', i, flush=True); time.sleep(1)"
        argv = [sys.executable, "-I", "-S", "-c", code]
    env, cwd = child_env(), tempfile.gettempdir()
    children: list[Any] = []
    lock = threading.Lock()
    spawned = threading.Semaphore(0)
    errors: list[BaseException] = []

    def job() -> None:
        try:
            child = spawn(impl, argv, cwd, env)
        except BaseException as e:
            errors.append(e)
            spawned.release()
            return
        with lock:
            children.append(child)
        spawned.release()
        try:
            drive(child, CountingSink())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for _ in threads:
        spawned.acquire()
    time.sleep(settle)
    c0, w0 = time.process_time(), time.perf_counter()
    r0 = _cpu_self()
    time.sleep(window)
    c1, w1 = time.process_time(), time.perf_counter()
    r1 = _cpu_self()
    with lock:
        pids = [c.pid for c in children]
    for pid in pids:  # started by this process, not yet reaped: the pid is still theirs
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for t in threads:
        t.join(60)
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) failed: {errors[0]!r}")
    wall = w1 - w0
    return {"cpu_per_s": (c1 - c0) / wall, "rusage_cpu_per_s": (r1 - r0) / wall, "window": wall}


def throughput(impl: str, p: dict[str, Any]) -> Result:
    """A child ``cat``s a file of ``size`` bytes; what reaches the sink, how fast, at what cost."""
    path = p["file"]
    written = os.path.getsize(path)
    sink = CountingSink()
    env, cwd = child_env(), tempfile.gettempdir()
    rss0 = _peak_rss_mb()
    c0, w0 = time.process_time(), time.perf_counter()
    child = spawn(impl, ["cat", path], cwd, env)
    complete = drive(child, sink)
    c1, w1 = time.process_time(), time.perf_counter()
    rss1 = _peak_rss_mb()
    return {
        "mb_per_s": sink.chars / (w1 - w0) / 1e6,
        "lost": written - sink.chars,
        "final_expect_timed_out": not complete,
        "mem_growth_mb": rss1 - rss0,
        "cpu_s": c1 - c0,
        "mb_per_cpu_s": sink.chars / 1e6 / (c1 - c0),
        "wall_s": w1 - w0,
        "exitstatus": child.exitstatus,
    }


def latency(impl: str, p: dict[str, Any]) -> Result:
    """Spawn-to-close time of ``/bin/true`` driven as Runner drives it; median of ``k``."""
    hold: bytearray | None = None
    stop = [False]
    busy: list[threading.Thread] = []
    if p["variant"] == "memory":
        hold = bytearray(int(p["memory_bytes"]))
        page = resource.getpagesize()
        hold[::page] = b"\x01" * len(range(0, len(hold), page))  # touch every page
    elif p["variant"] == "threads":

        def spin() -> None:
            n = 0
            while not stop[0]:
                n += 1

        busy = [threading.Thread(target=spin, daemon=True) for _ in range(int(p["threads"]))]
        for t in busy:
            t.start()
    env = child_env()
    # Runner always passes cwd; "nocwd" shows what that costs (RunnerSpawn: a /bin/sh hop).
    cwd = None if p["variant"] == "nocwd" else tempfile.gettempdir()
    times, cpu = [], []
    try:
        for i in range(int(p["k"]) + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            child = spawn(impl, ["/bin/true"], cwd, env)
            drive(child, CountingSink())
            c1, t1 = time.process_time(), time.perf_counter()
            if child.exitstatus != 0:
                raise RuntimeError(f"/bin/true exited {child.exitstatus}")
            if i:  # the first spawn of a process pays one-time costs
                times.append(t1 - t0)
                cpu.append(c1 - c0)
        gil = []
        for _ in range(20 if busy else 0):
            t0 = time.perf_counter()
            time.sleep(0)  # releases the GIL and takes it back
            gil.append(time.perf_counter() - t0)
    finally:
        stop[0] = True
        for t in busy:
            t.join()
    result = {
        "ms": statistics.median(times) * 1000,
        "cpu_ms": statistics.median(cpu) * 1000,
        "all_ms": [t * 1000 for t in times],
        "peak_rss_mb": _peak_rss_mb(),
    }
    if gil:
        result["gil_ms"] = statistics.median(gil) * 1000
    return result


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: one
      command: "true"
    - name: two
      debug:
        msg: hello
    - name: three
      set_fact:
        x: 1
"""


def playbook(impl: str, p: dict[str, Any]) -> Result:
    """ansible_runner.run() of a 3-task localhost playbook: wall time and host CPU."""
    import ansible_runner

    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    use_in_runner(impl)
    with tempfile.TemporaryDirectory(prefix="rs-bench-") as tmp:
        pdd = Path(tmp)
        (pdd / "project").mkdir()
        (pdd / "inventory").mkdir()
        (pdd / "project" / "site.yml").write_text(PLAYBOOK)
        (pdd / "inventory" / "hosts").write_text(
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        )
        c0, w0 = _cpu_self(), time.perf_counter()
        r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
        c1, w1 = _cpu_self(), time.perf_counter()
        events = [e.get("event") for e in r.events]
        if r.rc != 0 or r.status != "successful" or "playbook_on_stats" not in events:
            out = r.stdout.read() if r.stdout else ""
            raise RuntimeError(f"playbook failed: rc={r.rc} status={r.status}\n{textwrap.shorten(out, 2000)}")
    return {"wall_s": w1 - w0, "cpu_s": c1 - c0, "events": len(events)}


CASES = {"quiet": quiet, "throughput": throughput, "latency": latency, "playbook": playbook}


def main() -> None:
    case, impl, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = CASES[case](impl, params)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
