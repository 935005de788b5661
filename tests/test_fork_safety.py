"""Fork safety: the hazard harness finds stock pexpect's hang and none with RunnerSpawn.

Also: no Python at-fork callback runs during a patched ``ansible_runner.run()``, and a
concurrent fork of the host cannot block a RunnerSpawn.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time
from multiprocessing.process import BaseProcess

import pexpect
import pytest

from runner_spawn import RunnerSpawn
from tests import bench
from tests.conftest import JobDir

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux /proc and fork semantics")


hazard = bench.load("hazard")


@pytest.mark.parametrize("mechanism", hazard.MECHANISMS)
def test_harness_detects_stock_pexpect_hang(mechanism: str) -> None:
    # Stock hangs on roughly 10-50% of spawns here; 80 tries without one would be a
    # harness that has stopped reproducing the hazard. The batch ends at the first hang.
    # A hang lasts until the harness kills the stuck copy: a watchdog of 3 s, not 1, keeps
    # a spawn that is only slow on a loaded machine from counting as one.
    r = hazard.run_batch("pexpect.spawn", mechanism, spawns=80, watchdog=3.0, stop_after_hangs=1, timeout=110)
    assert r.hangs == 1, r
    assert r.killed >= 1, r  # the stuck forked copy was found and killed


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mechanism", hazard.MECHANISMS)
def test_runner_spawn_never_hangs(mechanism: str) -> None:
    # A hang never ends by itself: 30 s before a spawn counts as one tells a hang from a
    # spawn that is slow because the machine is busy.
    r = hazard.run_batch("RunnerSpawn", mechanism, spawns=200, watchdog=30.0, timeout=150)
    assert (r.spawns, r.hangs, r.errors, r.killed) == (200, 0, 0, 0), r


ATFORK_PROBE = """
import json, os, sys
import ansible_runner, runner_spawn

forks = [0]
os.register_at_fork(before=lambda: forks.__setitem__(0, forks[0] + 1))
report = {}
for mode, pdd in (("stock", sys.argv[1]), ("patched", sys.argv[2])):
    if mode == "patched":
        runner_spawn.install()
    forks[0] = 0
    r = ansible_runner.run(private_data_dir=pdd, playbook="site.yml", quiet=True)
    report[mode] = {"forks": forks[0], "status": r.status, "rc": r.rc}
print(json.dumps(report))
"""

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - debug:
        msg: hello
"""


def test_no_python_fork_callback_during_patched_run(job_dir: JobDir) -> None:
    # In a child interpreter: an at-fork callback cannot be unregistered.
    stock, patched = job_dir(PLAYBOOK), job_dir(PLAYBOOK)
    out = subprocess.run(
        [sys.executable, "-c", ATFORK_PROBE, str(stock), str(patched)],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["stock"]["status"] == report["patched"]["status"] == "successful", report
    assert report["stock"]["forks"] >= 1, report  # pexpect.spawn forks through Python
    assert report["patched"]["forks"] == 0, report


@pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")
def test_concurrent_fork_of_host_cannot_block_spawn() -> None:
    """A host thread keeps forking (multiprocessing "fork") while another spawns 50 children.

    The forked copies live until the test lets them go: a spawn that waited for one of
    them would never finish, and the spawning thread would still be blocked.
    """
    ctx = multiprocessing.get_context("fork")
    release = ctx.Event()
    stop = threading.Event()
    forked: list[BaseProcess] = []
    fork_times: list[float] = []
    results: list[tuple[int, str, int | None, int | None]] = []
    failures: list[BaseException] = []

    def keep_forking() -> None:
        try:
            while not stop.is_set() and len(forked) < 1000:
                p = ctx.Process(target=release.wait, args=(150,), daemon=True)
                p.start()
                forked.append(p)
                fork_times.append(time.monotonic())
                time.sleep(0.005)
        except BaseException as e:  # pragma: no cover - reported by the assert below
            failures.append(e)

    def spawn_children() -> None:
        try:
            for i in range(50):
                cmd, args = ("echo", [f"child-{i}-" + "x" * 200]) if i % 3 else ("false", [])
                child = RunnerSpawn(cmd, args, encoding="utf-8", timeout=30)
                child.expect(pexpect.EOF)
                child.close()
                results.append((i, str(child.before), child.exitstatus, child.signalstatus))
        except BaseException as e:  # pragma: no cover - reported by the assert below
            failures.append(e)

    forker = threading.Thread(target=keep_forking, name="forker")
    spawner = threading.Thread(target=spawn_children, name="spawner")
    forker.start()
    try:
        while len(forked) < 3 and forker.is_alive():  # forks are under way before spawning
            time.sleep(0.01)
        start = time.monotonic()
        spawner.start()
        spawner.join(60)
        end = time.monotonic()
        blocked = spawner.is_alive()
    finally:
        stop.set()
        forker.join(30)
        release.set()  # a blocked spawn, if any, ends with the copies
        spawner.join(60)
        for p in forked:
            p.join(5)
            if p.exitcode is None:  # pragma: no cover
                p.kill()
                p.join(5)
            p.close()
    assert not failures, failures
    assert not blocked, "spawning thread still blocked after 60 s: a spawn waited for a forked copy"
    assert sum(start <= t <= end for t in fork_times) >= 5, "the host did not fork while spawning"
    assert len(results) == 50
    for i, out, exitstatus, signalstatus in results:
        if i % 3:
            assert (out, exitstatus, signalstatus) == (f"child-{i}-" + "x" * 200 + "\n", 0, None)
        else:
            assert (out, exitstatus, signalstatus) == ("", 1, None)


def test_harness_table_lists_every_batch() -> None:
    rows = [
        hazard.BatchResult("pexpect.spawn", "atfork", 10, 4, 0, 4, 1.0),
        hazard.BatchResult("RunnerSpawn", "atfork", 10, 0, 0, 0, 1.0),
        hazard.BatchResult("RunnerSpawn", "gc", 10, 0, 0, 0, 1.0),
    ]
    table = hazard.format_table(rows)
    assert "4/10 hung (40%)" in table
    assert table.count("0/10 hung (0%)") == 2
