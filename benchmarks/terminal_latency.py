"""Spawn latency of terminal mode against pipe mode and stock ``pexpect.spawn``.

Run::

    python benchmarks/terminal_latency.py --runs 200

Each run starts ``/bin/true`` with the arguments ``Runner.run()`` passes
(``ignore_sighup=True``, ``echo=False``, text mode, and a ``cwd`` unless
``--no-cwd``), reads to end of output, closes, and checks the exit status. Three
times are taken from the constructor call: when it returns (the host thread is
blocked until then), when ``expect(EOF)`` returns (the exit is seen), and when
``close()`` returns (``pexpect.spawn.close()`` sleeps ``delayafterclose``, 0.1 s).
The three spawn classes take turns, so load from other processes on the machine
hits them alike. Prints medians and 90th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pexpect

from runner_spawn import RunnerSpawn, TerminalSpawn

SPAWNS: dict[str, Callable[..., Any]] = {
    "terminal (TerminalSpawn)": TerminalSpawn,
    "pipe (RunnerSpawn)": RunnerSpawn,
    "stock (pexpect.spawn)": pexpect.spawn,
}


POINTS = ("started", "exit seen", "closed")


def one_run(spawn: Callable[..., Any], cwd: str | None) -> tuple[float, float, float]:
    """Seconds from the constructor call to: it returning, EOF, close() returning."""
    t0 = time.perf_counter()
    child = spawn("/bin/true", [], cwd=cwd, ignore_sighup=True, echo=False, encoding="utf-8", codec_errors="replace")
    t1 = time.perf_counter()
    child.expect(pexpect.EOF, timeout=10)
    t2 = time.perf_counter()
    child.close()
    t3 = time.perf_counter()
    if child.exitstatus != 0:
        raise RuntimeError(f"{spawn}: /bin/true exited with {child.exitstatus}, signal {child.signalstatus}")
    return t1 - t0, t2 - t0, t3 - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="spawns per class (default 200)")
    parser.add_argument("--no-cwd", action="store_true", help="no cwd: no /bin/sh in front of pipe/terminal mode")
    parser.add_argument(
        "--heap-mb", type=int, default=0, help="touch this much memory in the host first (fork copies its page tables)"
    )
    opts = parser.parse_args()
    ballast = b"x" * (opts.heap_mb << 20)  # noqa: F841 - kept alive on purpose
    cwd = None if opts.no_cwd else os.getcwd()
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SPAWNS}
    for spawn in SPAWNS.values():  # warm up imports and caches
        one_run(spawn, cwd)
    for _ in range(opts.runs):
        for name, spawn in SPAWNS.items():
            times[name].append(one_run(spawn, cwd))
    print(
        f"/bin/true, {opts.runs} runs each, cwd {'not set' if cwd is None else 'set'}, "
        f"host heap +{opts.heap_mb} MB: median / p90 in ms"
    )
    print(f"{'spawn':26}" + "".join(f"{point:>20}" for point in POINTS))
    for name, runs in times.items():
        cells = []
        for i in range(len(POINTS)):
            ms = sorted(run[i] * 1000 for run in runs)
            cells.append(f"{statistics.median(ms):9.2f} /{ms[min(len(ms) - 1, int(len(ms) * 0.9))]:8.2f}")
        print(f"{name:26}" + "".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
