"""Reproduce the fork hang of ``pexpect.spawn`` in a multithreaded host, and show who avoids it.

Run::

    python benchmarks/hazard.py --spawns 60

Each implementation (stock ``pexpect.spawn``, plain ``pexpect.popen_spawn.PopenSpawn``,
``runner_spawn.RunnerSpawn``) spawns ``echo`` N times in a host made hazardous by one
mechanism (see :class:`TelemetryExporter` and :class:`ConnectionPool`). Every spawn is
watched: one that has not finished after ``--watchdog`` seconds counts as a hang.

Every batch runs in a disposable worker process (``--worker``), in a session of its own:
the mechanisms install at-fork handlers and threads that cannot be removed again. A hung
``pexpect.spawn`` child is a forked copy of the worker that never exec'd; the worker finds
it among its own children (still running the Python executable) and SIGKILLs it by pid,
which lets the blocked spawn return. If a whole worker overruns, the orchestrator SIGKILLs
the worker's descendants (by pid) and the worker's process group. Nothing else is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

IMPLEMENTATIONS = ("pexpect.spawn", "PopenSpawn", "RunnerSpawn")
MECHANISMS = ("atfork", "gc")
MECHANISM_TEXT = {
    "atfork": "at-fork handler needs a lock a thread holds",
    "gc": "GC in child runs __del__ needing a held lock",
}
MARKER = "hazard-ok"

# --- the two mechanisms --------------------------------------------------------------


class TelemetryExporter:
    """Mechanism (a): a library's at-fork handler that needs a lock its own thread holds.

    Modelled on telemetry SDKs: a background thread exports a buffer under a lock, and
    an ``os.register_at_fork(after_in_child=...)`` handler resets that buffer under the
    same lock so the child starts clean. A fork taken while the thread holds the lock
    copies it locked into a child where no thread will ever release it: the handler
    blocks forever, before the child can exec.
    """

    def __init__(self, hold: float, free: float) -> None:
        self._lock = threading.Lock()
        self._buffer: list[object] = []
        self._hold, self._free = hold, free
        os.register_at_fork(after_in_child=self._reset_in_child)
        threading.Thread(target=self._export_loop, name="telemetry-export", daemon=True).start()

    def _export_loop(self) -> None:
        while True:
            with self._lock:
                self._buffer.clear()
                time.sleep(self._hold)  # exporting: the lock is held
            time.sleep(self._free)

    def _reset_in_child(self) -> None:
        with self._lock:
            self._buffer = []


class ConnectionPool:
    """Mechanism (b): GC in the forked child calls a ``__del__`` that needs a held lock.

    A connection pool returns a connection in ``__del__`` under the pool's lock; a
    maintenance thread holds that lock while it checks idle connections. A server
    thread keeps handling requests, and each leaves its connection in a reference
    cycle (request <-> handler state), so only the cyclic GC frees it. When a fork
    copies such garbage and the child then allocates enough to start a collection, the
    child runs ``__del__`` and blocks on the lock the maintenance thread held at fork
    time. What makes the child allocate is harmless: another library's at-fork
    handler that rebuilds a 300-entry cache.
    """

    def __init__(self, hold: float, free: float) -> None:
        self.lock = threading.RLock()
        self.idle: list[int] = []
        self._hold, self._free = hold, free
        self._next = 0
        os.register_at_fork(after_in_child=_rebuild_cache)
        threading.Thread(target=self._maintain, name="pool-maintenance", daemon=True).start()
        threading.Thread(target=self._serve, name="request-handler", daemon=True).start()

    def _maintain(self) -> None:
        while True:
            with self.lock:
                time.sleep(self._hold)  # health-checking idle connections
            time.sleep(self._free)

    def _serve(self) -> None:
        while True:
            self.handle_request()
            time.sleep(0.001)

    def checkout(self) -> PooledConnection:
        with self.lock:
            self._next += 1
            return PooledConnection(self, self.idle.pop() if self.idle else self._next)

    def handle_request(self) -> None:
        """Serve one request; its connection ends up in a reference cycle."""
        request = _Request(self.checkout())
        request.handler_state = {"request": request}


class PooledConnection:
    def __init__(self, pool: ConnectionPool, ident: int) -> None:
        self.pool, self.ident = pool, ident

    def __del__(self) -> None:
        with self.pool.lock:
            self.pool.idle.append(self.ident)


class _Request:
    def __init__(self, conn: PooledConnection) -> None:
        self.conn = conn
        self.handler_state: dict[str, object] = {}


_cache: list[list[int]] = []


def _rebuild_cache() -> None:
    """A harmless at-fork handler: rebuilds a small per-process cache (300 objects)."""
    global _cache
    _cache = [[] for _ in range(300)]


# --- one spawn per implementation ----------------------------------------------------


def _spawn_stock() -> str:
    import pexpect

    child = pexpect.spawn("echo", [MARKER], encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    out = str(child.before)
    child.close()
    return out if child.exitstatus == 0 else f"exit {child.exitstatus}/{child.signalstatus}: {out}"


def _spawn_popen() -> str:
    import pexpect
    from pexpect.popen_spawn import PopenSpawn

    child = PopenSpawn(["echo", MARKER], encoding="utf-8", timeout=30)
    try:
        child.expect(pexpect.EOF)
        out = str(child.before)
        code = child.wait()
    finally:
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                stream.close()
    return out if code == 0 else f"exit {code}: {out}"


def _spawn_runner() -> str:
    import pexpect

    from runner_spawn import RunnerSpawn

    child = RunnerSpawn("echo", [MARKER], encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    out = str(child.before)
    child.close()
    return out if child.exitstatus == 0 else f"exit {child.exitstatus}/{child.signalstatus}: {out}"


SPAWNERS: dict[str, Callable[[], str]] = {
    "pexpect.spawn": _spawn_stock,
    "PopenSpawn": _spawn_popen,
    "RunnerSpawn": _spawn_runner,
}

# --- processes, through /proc --------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of ``pid``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every descendant of ``root``."""
    kids: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                kids.setdefault(st[0], []).append((int(name), st[1]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in kids.get(stack.pop(), ()):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def kill_exact(procs: dict[int, int]) -> int:
    """SIGKILL each of ``procs`` (pid -> start time) that is still that same process."""
    killed = 0
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def _never_execd_children() -> dict[int, int]:
    """This process's children still running this Python executable: forked, never exec'd."""
    me = os.path.realpath(sys.executable)
    stuck = {}
    for pid, start in descendants(os.getpid()).items():
        st = _stat(pid)
        if st is None or st[0] != os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.path.realpath(f"/proc/{pid}/exe") == me:
                stuck[pid] = start
    return stuck


# --- the worker: one batch in a disposable process -----------------------------------


def run_worker(
    impl: str, mechanism: str, spawns: int, watchdog: float, stop_after_hangs: int, duty: float
) -> dict[str, object]:
    """Make this process hazardous with ``mechanism``, then spawn with ``impl`` ``spawns`` times."""
    spawn = SPAWNERS[impl]
    spawn()  # warm up (imports) before the host turns hazardous
    period = 0.004
    hold, free = period * duty, period * (1 - duty)
    if mechanism == "atfork":
        TelemetryExporter(hold, free)
    elif mechanism == "gc":
        ConnectionPool(hold, free)
    else:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    return _spawn_batch(impl, mechanism, spawn, spawns, watchdog, stop_after_hangs)


def _spawn_batch(
    impl: str, mechanism: str, spawn: Callable[[], str], spawns: int, watchdog: float, stop_after_hangs: int
) -> dict[str, object]:
    hangs = errors = killed = done = 0
    first_error = ""
    started = time.monotonic()
    for _ in range(spawns):
        if stop_after_hangs and hangs >= stop_after_hangs:
            break
        result: list[str] = []

        def attempt(result: list[str] = result) -> None:
            try:
                result.append(spawn())
            except Exception as e:
                result.append(f"{type(e).__name__}: {e}")

        thread = threading.Thread(target=attempt, name="spawn-attempt", daemon=True)
        thread.start()
        thread.join(watchdog)
        done += 1
        if thread.is_alive():
            hangs += 1
            # The blocked spawn waits for a forked copy of this process that never exec'd.
            for _ in range(50):
                killed += kill_exact(_never_execd_children())
                thread.join(0.1)
                if not thread.is_alive():
                    break
            if thread.is_alive():
                return _report(impl, mechanism, done, hangs, errors, killed, started, "a spawn stayed blocked")
            continue
        if not result or MARKER not in result[0]:
            errors += 1
            first_error = first_error or (result[0] if result else "no result")
    return _report(impl, mechanism, done, hangs, errors, killed, started, first_error)


def _report(
    impl: str, mechanism: str, done: int, hangs: int, errors: int, killed: int, started: float, note: str
) -> dict[str, object]:
    return {
        "impl": impl,
        "mechanism": mechanism,
        "spawns": done,
        "hangs": hangs,
        "errors": errors,
        "killed": killed,
        "seconds": round(time.monotonic() - started, 2),
        "note": note,
    }


# --- the orchestrator ----------------------------------------------------------------


@dataclass
class BatchResult:
    """hangs out of spawns for one implementation under one mechanism."""

    impl: str
    mechanism: str
    spawns: int
    hangs: int
    errors: int
    killed: int  # stuck forked copies the worker killed
    seconds: float
    note: str = ""


def run_batch(
    impl: str,
    mechanism: str,
    spawns: int,
    watchdog: float = 2.0,
    stop_after_hangs: int = 0,
    duty: float = 0.5,
    timeout: float | None = None,
) -> BatchResult:
    """Run one batch in a disposable worker process and return its counts.

    ``stop_after_hangs`` (0: never) ends the batch early once that many hangs were seen.
    ``timeout`` bounds the whole batch (default: enough for every spawn to hang).
    """
    if impl not in SPAWNERS:
        raise ValueError(f"unknown implementation {impl!r}")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--impl",
        impl,
        "--mechanism",
        mechanism,
        "--spawns",
        str(spawns),
        "--watchdog",
        str(watchdog),
        "--stop-after-hangs",
        str(stop_after_hangs),
        "--duty",
        str(duty),
    ]
    if timeout is None:
        timeout = 30 + spawns * (watchdog + 6)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_worker(proc)
        out, err = proc.communicate()
        return BatchResult(impl, mechanism, 0, 0, 0, 0, timeout, "worker overran; killed")
    finally:
        if proc.poll() is None:
            _kill_worker(proc)
            proc.wait()
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return BatchResult(impl, mechanism, 0, 0, 0, 0, 0.0, f"worker failed ({proc.returncode}): {err.strip()[-500:]}")
    data = json.loads(lines[-1])
    return BatchResult(**data)


def _kill_worker(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the worker's descendants (stuck copies live in sessions of their own), then its group."""
    kill_exact(descendants(proc.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def format_table(results: Sequence[BatchResult]) -> str:
    """hangs/N per implementation (rows) and mechanism (columns)."""
    mechs = [m for m in MECHANISMS if any(r.mechanism == m for r in results)]
    impls = [i for i in IMPLEMENTATIONS if any(r.impl == i for r in results)]
    by = {(r.impl, r.mechanism): r for r in results}
    width = max(len(MECHANISM_TEXT[m]) for m in mechs)
    lines = [f"{'':15}" + "".join(f" | {m + ': ' + MECHANISM_TEXT[m]:<{width + 8}}" for m in mechs)]
    lines.append("-" * len(lines[0]))
    for impl in impls:
        cells = []
        for m in mechs:
            r = by.get((impl, m))
            if r is None:
                cells.append("")
                continue
            pct = 100 * r.hangs / r.spawns if r.spawns else 0.0
            cell = f"{r.hangs}/{r.spawns} hung ({pct:.0f}%)"
            if r.errors:
                cell += f", {r.errors} errors"
            if r.note and (r.errors or not r.spawns):
                cell += f" [{r.note[:60]}]"
            cells.append(cell)
        lines.append(f"{impl:15}" + "".join(f" | {c:<{width + 8}}" for c in cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=60, help="spawns per implementation and mechanism")
    parser.add_argument("--watchdog", type=float, default=2.0, help="seconds before a spawn counts as hung")
    parser.add_argument("--impl", action="append", choices=IMPLEMENTATIONS, help="repeatable; default: all")
    parser.add_argument("--mechanism", action="append", choices=MECHANISMS, help="repeatable; default: all")
    parser.add_argument("--duty", type=float, default=0.5, help="share of the time the background lock is held")
    parser.add_argument("--stop-after-hangs", type=int, default=0, help="end a batch after this many hangs")
    parser.add_argument("--json", action="store_true", help="print one JSON object per batch instead of a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        report = run_worker(
            args.impl[0], args.mechanism[0], args.spawns, args.watchdog, args.stop_after_hangs, args.duty
        )
        print(json.dumps(report), flush=True)
        os._exit(0)  # daemon threads hold locks; do not wait for interpreter shutdown
    results = []
    for mech in args.mechanism or MECHANISMS:
        for impl in args.impl or IMPLEMENTATIONS:
            r = run_batch(impl, mech, args.spawns, args.watchdog, args.stop_after_hangs, args.duty)
            results.append(r)
            if args.json:
                print(json.dumps(asdict(r)), flush=True)
            else:
                print(
                    f"  {mech:7} {impl:14} {r.hangs}/{r.spawns} hung  ({r.seconds:.1f}s)", file=sys.stderr, flush=True
                )
    if not args.json:
        print(f"\nHangs per {args.spawns} spawns of `echo` (watchdog {args.watchdog:g}s, lock held {args.duty:.0%}):")
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
