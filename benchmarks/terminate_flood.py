"""Ending a job that floods its output: from termination to Runner.run() returning.

Usage::

    python benchmarks/terminate_flood.py                 # 3 repetitions, job_timeout 3 s
    python benchmarks/terminate_flood.py --quick         # 1 repetition, no load rows
    python benchmarks/terminate_flood.py --job-timeout 10 --command "bash -c (yes)"

The job is ansible-runner's own long-running test (``yes`` under a RunnerConfig with
suppress_ansible_output, expect_passwords {TIMEOUT, EOF}, pexpect_timeout 2, poll),
ended by job_timeout or by a cancel_callback. Each measurement runs in a fresh worker
process in a session of its own (plain PopenSpawn's job shares its host's process
group, so stock ``handle_termination`` kills the host: the row says so). Load rows run
two busy-looping processes beside the worker. Reported per implementation: the
median seconds from ``handle_termination`` being called to ``run()`` returning, and
the characters handed to Runner after it was called.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from impls import IMPLS, LABELS  # noqa: E402

#: The issue's contract: RunnerSpawn returns within stock's time plus this.
ALLOWANCE = 0.5


def worker(impl: str, end: str, command: list[str], job_timeout: float) -> dict[str, Any]:
    """Run the job under Runner with ``impl``; measure around handle_termination."""
    import pexpect
    from ansible_runner.config.runner import RunnerConfig
    from ansible_runner.runner import Runner
    from ansible_runner.utils import OutputEventFilter
    from impls import use_in_runner

    use_in_runner(impl)
    state: dict[str, Any] = {"chars": 0, "term_at": None, "chars_at_term": 0}
    write = OutputEventFilter.write

    def counting_write(self: Any, data: str) -> None:
        state["chars"] += len(data)
        write(self, data)

    OutputEventFilter.write = counting_write  # type: ignore[method-assign]
    terminate = Runner.handle_termination

    def timed_terminate(pid: int, *args: Any, **kwargs: Any) -> None:
        if state["term_at"] is None:
            state["term_at"], state["chars_at_term"] = time.monotonic(), state["chars"]
        terminate(pid, *args, **kwargs)

    Runner.handle_termination = timed_terminate  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory() as tmp:
        rc = RunnerConfig(tmp)
        rc.suppress_ansible_output = True
        rc.expect_passwords = {pexpect.TIMEOUT: None, pexpect.EOF: None}
        rc.cwd = tmp
        rc.env = {}
        rc.idle_timeout = 0
        rc.pexpect_timeout = 2.0
        rc.pexpect_use_poll = True
        rc.command = command
        cancel = None
        if end == "job_timeout":
            rc.job_timeout = job_timeout
        else:
            rc.job_timeout = 0
            started = time.monotonic()

            def cancel() -> bool:
                return time.monotonic() - started > job_timeout

        start = time.monotonic()
        error = None
        result: Any = None
        try:
            result = Runner(config=rc, cancel_callback=cancel).run()
        except Exception as e:  # what escapes run() is the finding
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        done = time.monotonic()
    term_at = state["term_at"]
    return {
        "status": None if result is None else list(result),
        "error": error,
        "total": done - start,
        "term_to_return": None if term_at is None else done - term_at,
        "after_term": state["chars"] - state["chars_at_term"],
    }


def run_one(impl: str, end: str, command: list[str], job_timeout: float) -> dict[str, Any]:
    args = [sys.executable, __file__, "--worker", impl, end, str(job_timeout), json.dumps(command)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, start_new_session=True, cwd=str(HERE))
    if proc.returncode < 0:
        return {"error": f"host killed by {signal.Signals(-proc.returncode).name}"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


class BusyLoad:
    """``n`` busy-looping processes, killed by pid on exit."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyLoad:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def cell(results: list[dict[str, Any]]) -> str:
    """Median seconds (and characters after termination), or what went wrong."""
    errors = [r["error"] for r in results if r.get("error")]
    times = [r["term_to_return"] for r in results if not r.get("error") and r.get("term_to_return") is not None]
    if not times:
        return errors[0] if errors else "n/a"
    chars = statistics.median(r["after_term"] for r in results if not r.get("error"))
    text = f"{statistics.median(times):.2f} s ({chars:,.0f} ch)"
    if errors:
        text += f"; {len(errors)}/{len(results)}: {errors[0]}"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, no load rows")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; quick: 1)")
    ap.add_argument("--job-timeout", type=float, default=3.0, help="seconds before job_timeout or cancel (3)")
    ap.add_argument("--command", default="yes", help='the flooding job (default "yes")')
    ap.add_argument("--loads", default="0,2", help="busy processes beside the job, comma-separated (0,2)")
    ap.add_argument("--json", help="also write every raw measurement to this file")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, end, job_timeout, command = args.worker
        print(json.dumps(worker(impl, end, json.loads(command), float(job_timeout))))
        return 0

    reps = args.reps or (1 if args.quick else 3)
    loads = [0] if args.quick else [int(n) for n in args.loads.split(",")]
    command = args.command.split()
    if command[:2] == ["bash", "-c"]:
        command = ["bash", "-c", " ".join(command[2:])]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    job = " ".join(command)
    print(f"# job: {job}; ended after {args.job_timeout:g} s; {reps} repetition(s); {os.cpu_count()} cpus")
    for load in loads:
        for end in ("job_timeout", "cancel"):
            key = f"{end}, load {load}"
            raw[key] = {impl: [] for impl in IMPLS}
            with BusyLoad(load):
                for rep in range(reps):
                    order = IMPLS[rep % len(IMPLS) :] + IMPLS[: rep % len(IMPLS)]
                    for impl in order:
                        raw[key][impl].append(run_one(impl, end, command, args.job_timeout))
            print(f"# {key}: done", file=sys.stderr)

    print()
    print(f"| ended by | {' | '.join(LABELS[i] for i in IMPLS)} | RunnerSpawn / stock | RunnerSpawn - stock |")
    print("|---|" + "---|" * (len(IMPLS) + 2))
    worst_excess = 0.0
    for key, by_impl in raw.items():
        cells = [cell(by_impl[i]) for i in IMPLS]
        ours = [r["term_to_return"] for r in by_impl["runner_spawn"] if r.get("term_to_return") is not None]
        stock = [r["term_to_return"] for r in by_impl["stock"] if r.get("term_to_return") is not None]
        ratio = diff = "n/a"
        if ours and stock:
            m_ours, m_stock = statistics.median(ours), statistics.median(stock)
            ratio = f"{m_ours / m_stock:.1f}x" if m_stock > 0 else "n/a"
            diff = f"{m_ours - m_stock:+.2f} s"
            worst_excess = max(worst_excess, max(ours) - min(stock))
        print(f"| {key} | {' | '.join(cells)} | {ratio} | {diff} |")
    print()
    print("Seconds from handle_termination to run() returning (median); ch: characters handed to Runner after it.")
    for key, by_impl in raw.items():
        totals = {
            LABELS[i]: f"{statistics.median(r['total'] for r in by_impl[i] if 'total' in r):.2f} s"
            for i in IMPLS
            if any("total" in r for r in by_impl[i])
        }
        print(f"run() from start, {key}: {totals}")
    statuses = {
        key: {tuple(r["status"]) for r in by_impl["runner_spawn"] if r.get("status")} for key, by_impl in raw.items()
    }
    print(f"RunnerSpawn statuses: {statuses}")
    print(f"RunnerSpawn worst run minus stock's best: {worst_excess:+.2f} s (contract: +{ALLOWANCE} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    errors = [r for by_impl in raw.values() for r in by_impl["runner_spawn"] if r.get("error")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
