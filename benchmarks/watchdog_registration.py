"""What registering a job with the watchdog costs the host, per job start, idle and loaded.

Run::

    python benchmarks/watchdog_registration.py                # about 30 s on 2 cores
    python benchmarks/watchdog_registration.py --src OTHER/src  # another checkout, to compare

A fresh host process (``python -c HOST``, with ``--src`` first on ``sys.path``) starts its
watchdog, then registers and unregisters ``--jobs`` markers one after the other: the
host-side work of every job start and reap (``watch()`` then ``unwatch()``), without the
job's own ``posix_spawn``. It reports the median, mean and 99th percentile of one pair,
in microseconds. "loaded" runs the same beside ``--busy`` busy-loop shells (``while :; do :;
done``) that this script starts and kills by pid. Each figure is the median over
``--runs`` fresh hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: ``python -c HOST SRC JOBS``: prints one JSON line of per-pair times in seconds.
HOST = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
try:
    from runner_spawn import _watchdog_client as client  # the host side in its own module
except ImportError:
    from runner_spawn import _watchdog as client  # older layout: both sides in one module
client.ensure_started()
jobs = int(sys.argv[2])
times = []
for _ in range(jobs):
    m = client.new_marker()
    t0 = time.perf_counter()
    client.watch(m)
    client.unwatch(m)
    times.append(time.perf_counter() - t0)
print(json.dumps({"module": client.__name__, "times": times}))
"""


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` busy-loop shells for the block's duration, killed by pid afterwards."""
    loops = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in loops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def one_host(src: Path, jobs: int) -> tuple[str, float, float, float]:
    """(module, median, mean, p99) of one fresh host's watch+unwatch pairs, in microseconds."""
    proc = subprocess.run(
        [sys.executable, "-c", HOST, str(src), str(jobs)], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    times = sorted(t * 1e6 for t in result["times"])
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return result["module"], statistics.median(times), statistics.mean(times), p99


def measure(src: Path, jobs: int, runs: int) -> tuple[str, float, float, float]:
    rows = [one_host(src, jobs) for _ in range(runs)]
    return rows[0][0], *(statistics.median(r[i] for r in rows) for i in (1, 2, 3))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=SRC, help="the src/ directory to import runner_spawn from")
    parser.add_argument("--jobs", type=int, default=2000, help="watch+unwatch pairs per host (default 2000)")
    parser.add_argument("--runs", type=int, default=5, help="fresh hosts per figure (default 5)")
    parser.add_argument("--busy", type=int, default=2, help="busy loops beside the loaded runs (default 2)")
    parser.add_argument("--quick", action="store_true", help="200 pairs, 2 hosts")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.jobs, opts.runs = 200, 2
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, src {opts.src}")
    print(f"\nhost time per job start + reap (watch + unwatch), {opts.jobs} jobs, median of {opts.runs} hosts\n")
    print("| machine | module | median | mean | p99 |")
    print("|---|---|---|---|---|")
    for label, n in (("idle", 0), (f"{opts.busy} busy loops", opts.busy)):
        with busy_loops(n):
            module, med, mean, p99 = measure(opts.src, opts.jobs, opts.runs)
        print(f"| {label} | {module} | {med:.1f} us | {mean:.1f} us | {p99:.1f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
