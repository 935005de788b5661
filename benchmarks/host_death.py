"""What is left of a job when its host dies, and what the watchdog costs.

Run::

    python benchmarks/host_death.py                  # about 1 minute on 2 cores
    python benchmarks/host_death.py --max-wait 75    # also see how long stock's survivors run

A host process (a child of this script, in a session of its own) calls
``ansible_runner.run()`` on a playbook of 3 localhost aliases (``connection: local``)
whose task touches a mark file and execs ``sleep 60``. Once all three tasks run, the host
is SIGKILLed (what the OOM killer does), and the job's processes (every process that
descended from the host, found through /proc while it ran; this script is a child
subreaper, so orphans stay its descendants) are counted every 10 ms. Hosts:

- ``stock``: ``pexpect.spawn``, as ansible-runner ships.
- ``stock + PR_SET_PDEATHSIG``: the same, with ``preexec_fn`` calling
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child: Python code between fork and exec,
  measured only as the alternative to the watchdog.
- ``runner-spawn, no watchdog``: ``runner_spawn.install()``, ``RUNNER_SPAWN_WATCHDOG=0``.
- ``runner-spawn``: ``runner_spawn.install()``.

Then: does PR_SET_PDEATHSIG fire when the *thread* that spawned the child exits while the
host lives; and what the watchdog costs (start in the host, its start, RSS and CPU, CPU
while idle, host time per job). Everything this script starts is killed by pid.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proctree import alive, become_subreaper, descendants, kill_exact

MODES = {
    "stock": "stock `pexpect.spawn`",
    "pdeathsig": "stock + `PR_SET_PDEATHSIG` (preexec_fn)",
    "nowatchdog": "runner-spawn, `RUNNER_SPAWN_WATCHDOG=0`",
    "patched": "runner-spawn",
}
PR_SET_PDEATHSIG = 1

#: The host: ``python -c HOST MODE PRIVATE_DATA_DIR``; prints {"host": pid} and runs the job.
HOST = """
import ctypes, json, os, signal, sys
mode, pdd = sys.argv[1], sys.argv[2]
import ansible_runner
if mode in ("patched", "nowatchdog"):
    import runner_spawn
    runner_spawn.install()
elif mode == "pdeathsig":
    import pexpect
    libc = ctypes.CDLL(None, use_errno=True)
    init = pexpect.spawn.__init__
    def with_pdeathsig(self, *args, **kwargs):
        kwargs["preexec_fn"] = lambda: libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        init(self, *args, **kwargs)
    pexpect.spawn.__init__ = with_pdeathsig
print(json.dumps({"host": os.getpid()}), flush=True)
r = ansible_runner.run(private_data_dir=pdd, playbook="site.yml", quiet=True)
print(json.dumps({"status": r.status, "rc": r.rc}), flush=True)
"""


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_watchdog(pid: int) -> bool:
    """Whether ``pid`` runs runner_spawn's watchdog (a host's helper, not part of a job)."""
    return any(arg.endswith("_watchdog.py") for arg in cmdline(pid)[:5])


def make_job(root: Path, hosts: int = 3, seconds: int = 60) -> Path:
    """A private_data_dir: ``hosts`` localhost aliases whose task marks itself, then sleeps."""
    pdd = Path(tempfile.mkdtemp(prefix="host-death-", dir=root))
    (pdd / "project").mkdir()
    (pdd / "inventory").mkdir()
    (pdd / "marks").mkdir()
    (pdd / "project" / "site.yml").write_text(
        textwrap.dedent(f"""
        - hosts: all
          gather_facts: false
          tasks:
            - shell: touch {pdd}/marks/{{{{ inventory_hostname }}}}; exec sleep {seconds}
        """)
    )
    (pdd / "inventory" / "hosts").write_text(
        "".join(
            f"host{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}\n"
            for i in range(hosts)
        )
    )
    return pdd


def start_host(mode: str, pdd: Path) -> subprocess.Popen[str]:
    """Start a host in a session of its own (so that signals for ours never reach it)."""
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.pop("RUNNER_SPAWN_WATCHDOG", None)
    if mode == "nowatchdog":
        env["RUNNER_SPAWN_WATCHDOG"] = "0"
    return subprocess.Popen(
        [sys.executable, "-c", HOST, mode, str(pdd)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def wait_running(pdd: Path, hosts: int, host: subprocess.Popen[str], timeout: float) -> None:
    """Wait until every task has touched its mark (the sleeps run)."""
    deadline = time.monotonic() + timeout
    while len(os.listdir(pdd / "marks")) < hosts:
        if host.poll() is not None:
            raise RuntimeError(f"the host exited early: {host.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tasks not running after {timeout} s")
        time.sleep(0.02)


@dataclass
class Death:
    """One host killed: how many job processes ran, how many were left when."""

    mode: str
    procs: int
    left_2s: int
    gone_after: float | None  # seconds until none was left; None: some outlived max_wait
    left_at_end: list[str]  # command names of those that outlived max_wait
    watchdog_gone: bool | None  # whether the watchdog exited too (None: there was none)


def kill_host(host: subprocess.Popen[str], max_wait: float) -> Death:
    """SIGKILL ``host`` and watch its job's processes for up to ``max_wait`` seconds."""
    tree = descendants(host.pid)
    watchdogs = {p: s for p, s in tree.items() if is_watchdog(p)}
    job = {p: s for p, s in tree.items() if p not in watchdogs}
    names = {p: os.path.basename((cmdline(p) or ["?"])[0]) for p in job}
    os.kill(host.pid, signal.SIGKILL)
    killed = time.monotonic()
    host.wait()
    left_2s, gone_after = -1, None
    while True:
        now = time.monotonic() - killed
        left = alive(job)
        if left_2s < 0 and now >= 2.0:
            left_2s = len(left)
        if not left:
            gone_after = now
            break
        if now > max_wait:
            break
        time.sleep(0.01)
    if left_2s < 0:
        left_2s = 0
    survivors = sorted(names[p] for p in alive(job))
    wd_gone = None if not watchdogs else not alive(watchdogs)
    if watchdogs:  # it ends the job, then exits: give it the same bound
        deadline = time.monotonic() + max_wait
        while alive(watchdogs) and time.monotonic() < deadline:
            time.sleep(0.01)
        wd_gone = not alive(watchdogs)
    kill_exact({**job, **watchdogs, **descendants(os.getpid())})
    return Death("", len(job), left_2s, gone_after, survivors, wd_gone)


def host_death(mode: str, root: Path, max_wait: float) -> Death:
    """One run: a host in ``mode`` running the 3-host sleep playbook, SIGKILLed mid-task."""
    pdd = make_job(root)
    host = start_host(mode, pdd)
    try:
        wait_running(pdd, 3, host, 120)
        time.sleep(0.3)  # every worker is past its fork
        death = kill_host(host, max_wait)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        assert host.stdout is not None
        host.stdout.close()
    death.mode = mode
    return death


def pdeathsig_thread_exit() -> bool:
    """Whether a PR_SET_PDEATHSIG child dies when the thread that spawned it exits
    (the host still running). Spawns ``sleep 30`` from a short-lived thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: list[subprocess.Popen[bytes]] = []

    def spawn() -> None:
        box.append(
            subprocess.Popen(["sleep", "30"], preexec_fn=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
        )

    t = threading.Thread(target=spawn)
    t.start()
    t.join()
    child = box[0]
    try:
        child.wait(timeout=2)
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


#: Measures the watchdog in a fresh host: ``python -c COST``; prints one JSON line.
COST = """
import json, os, socket, sys, time, fcntl, termios, struct
import runner_spawn
from runner_spawn import _watchdog_client as client
assert client.watchdog_pid() is None
marker = client.new_marker()
t0 = time.perf_counter()
client.watch(marker)            # starts it and waits for its answer: what the first job pays
started = time.perf_counter() - t0
pid = client.watchdog_pid()
def unread():                      # bytes the watchdog has not read yet
    return struct.unpack("i", fcntl.ioctl(client._sock.fileno(), termios.TIOCOUTQ, b"\\0" * 4))[0]
def ticks():                        # its CPU time so far, in ns (/proc/PID/schedstat)
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])
def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])
start_ticks, rss = ticks(), rss_kb()
time.sleep(float(sys.argv[1]))
idle_ticks = ticks() - start_ticks
n = 2000
t0 = time.perf_counter()
for _ in range(n):
    m = client.new_marker()
    client.watch(m)
    client.unwatch(m)
per_job = (time.perf_counter() - t0) / n
while unread():
    time.sleep(0.0005)
print(json.dumps({"started": started, "start_ns": start_ticks, "rss_kb": rss,
                  "idle_ns": idle_ticks, "per_job": per_job, "jobs_ns": ticks() - start_ticks - idle_ticks}))
"""


def watchdog_cost(runs: int, idle: float) -> list[dict[str, float]]:
    out = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", COST, str(idle)], capture_output=True, text=True, timeout=60 + idle, check=True
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="host deaths per mode (default 3)")
    parser.add_argument("--max-wait", type=float, default=10.0, help="seconds to watch the survivors (default 10)")
    parser.add_argument("--cost-runs", type=int, default=10, help="fresh hosts for the cost figures (default 10)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of watchdog idle CPU measured (default 10)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="1 run, max wait 3 s, 2 cost runs of 1 s idle")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.runs, opts.max_wait, opts.cost_runs, opts.idle = 1, 3.0, 2, 1.0
    become_subreaper()
    from importlib.metadata import version

    print(
        f"Python {sys.version.split()[0]}, ansible-runner {version('ansible-runner')}, "
        f"ansible-core {version('ansible-core')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(f"\nhost SIGKILLed while 3 tasks run `sleep 60`; {opts.runs} runs each, watched {opts.max_wait:g} s\n")
    print("| host | job processes at the kill | left 2 s after | all gone after | watchdog exited |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in opts.modes.split(","):
            deaths = [host_death(mode, Path(tmp), opts.max_wait) for _ in range(opts.runs)]
            gone = [d.gone_after for d in deaths if d.gone_after is not None]
            survivors = sorted({name for d in deaths for name in d.left_at_end})
            gone_text = (
                f"{statistics.median(gone):.2f} s (max {max(gone):.2f})"
                if len(gone) == len(deaths)
                else f"> {opts.max_wait:g} s ({', '.join(survivors)})"
            )
            wd = {d.watchdog_gone for d in deaths}
            wd_text = "-" if wd == {None} else ("yes" if wd == {True} else "NO")
            print(
                f"| {MODES[mode]} | {'/'.join(str(d.procs) for d in deaths)} | "
                f"{'/'.join(str(d.left_2s) for d in deaths)} | {gone_text} | {wd_text} |"
            )
    print(
        "\nPR_SET_PDEATHSIG: child killed when the thread that spawned it exits, host alive: "
        f"{'yes' if pdeathsig_thread_exit() else 'no'}"
    )
    costs = watchdog_cost(opts.cost_runs, opts.idle)

    def med(key: str, scale: float = 1.0) -> float:
        return statistics.median(c[key] * scale for c in costs)

    print(f"\nwatchdog cost, median of {opts.cost_runs} fresh hosts:")
    print(
        f"- first job: watch() starts it (posix_spawn) and waits until it has read the job: "
        f"{med('started', 1000):.1f} ms in the host"
    )
    print(f"- its CPU to start: {med('start_ns', 1e-6):.1f} ms; RSS {med('rss_kb') / 1024:.1f} MiB")
    print(f"- its CPU while idle for {opts.idle:g} s: {med('idle_ns', 1e-3):.0f} us")
    print(
        f"- per job, in the host: {med('per_job', 1e6):.1f} us (watch, confirmed, + unwatch; "
        "benchmarks/watchdog_registration.py has it loaded); "
        f"watchdog CPU per job: {med('jobs_ns', 1e-3 / 2000):.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
