"""An exception out of the supervising loop ends the job, before the exception goes on.

Each test runs a real ``ansible_runner.run()`` of a 3-host ``command: sleep 60``
playbook (ansible-playbook, 3 workers in sessions of their own, 3 sleeps) and makes
an exception unwind out of ``Runner.run()`` while the job runs. Runner never calls
``handle_termination`` on that path; the spawn must end the job itself. Stock
``pexpect.spawn`` is run beside it where that is cheap: it leaves the job running for
as long as the host holds the exception (its processes are then killed here, by pid).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ansible_runner
import pexpect
import pytest
from ansible_runner.exceptions import CallbackError

import runner_spawn
from runner_spawn import RunnerSpawn, TerminalSpawn
from tests import procs
from tests.conftest import JobDir

SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 60
"""
#: ansible-playbook, 3 workers and 3 sleeps: the job is running in full.
RUNNING = 7
#: How long the job's processes get to be gone once the exception is out (a bounded wait).
GONE_WITHIN = 2.0
IDENT = "abandoned"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process trees are read from /proc")


@contextlib.contextmanager
def runner_files_left_open() -> Iterator[None]:
    """Around dropping an exception out of Runner.run(): it leaves its stdout/stderr
    artifact files open on that path (stock too), and freeing them warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed file", ResourceWarning)
        yield
        gc.collect()


class Abandon(Exception):
    """What the test's signal handler raises: any exception from any handler."""


@contextlib.contextmanager
def spawn_mode(mode: str) -> Iterator[None]:
    """``stock``: ansible-runner as shipped; ``pipes``/``terminal``: runner_spawn installed."""
    if mode != "stock":
        runner_spawn.install(terminal=mode == "terminal")
    try:
        yield
    finally:
        if mode != "stock":
            runner_spawn.uninstall()


class FireWhenRunning:
    """A ``cancel_callback`` that never cancels; it calls ``fire`` once the whole job runs.

    Every process below this test process that it sees is recorded in ``seen``.
    """

    def __init__(self, fire: Callable[[], None]) -> None:
        self.before = procs.descendants()
        self.seen: dict[int, int] = {}
        self.fire: Callable[[], None] | None = fire

    def new(self) -> dict[int, int]:
        return {p: s for p, s in procs.descendants().items() if p not in self.before}

    def __call__(self) -> bool:
        running = self.new()
        self.seen.update(running)
        if len(running) >= RUNNING and self.fire is not None:
            fire, self.fire = self.fire, None
            fire()
        return False


def run_sleep_job(job_dir: JobDir, watcher: FireWhenRunning) -> Path:
    """Run the job; it must end in an exception (returned by the caller's pytest.raises)."""
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=3)
    ansible_runner.run(
        private_data_dir=str(pdd),
        playbook="site.yml",
        ident=IDENT,
        cancel_callback=watcher,
        settings={"pexpect_timeout": 0.5},
        quiet=True,
    )
    raise AssertionError("the job was expected to end in an exception")


def stdout_artifact(job_dir_root: Path) -> str:
    [path] = job_dir_root.glob(f"job*/artifacts/{IDENT}/stdout")
    return path.read_text()


def assert_job_gone(watcher: FireWhenRunning) -> None:
    assert len(watcher.seen) >= RUNNING, f"job tree not observed: {watcher.seen}"
    left = procs.wait_gone({**watcher.seen, **watcher.new()}, GONE_WITHIN)
    assert left == {}, f"job processes still running while the exception is out: {sorted(left)}"


def assert_read_output_kept(tmp_path: Path) -> None:
    """What was read before the exception (the play and task banners) is in the artifact."""
    stdout = stdout_artifact(tmp_path)
    assert "PLAY [all]" in stdout, stdout
    assert "TASK [command]" in stdout, stdout


def in_supervising_loop(frame: types.FrameType | None) -> bool:
    """True when ``frame`` is in the spawn's (or pexpect's) code, under Runner.run()."""
    runner_file = f"{os.sep}ansible_runner{os.sep}runner.py"
    while frame is not None:
        name = frame.f_code.co_filename
        if name.endswith(runner_file):
            return False  # reached Runner's own code: the frames above are not the spawn's
        if f"{os.sep}runner_spawn{os.sep}" in name or f"{os.sep}pexpect{os.sep}" in name:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def alarm_raises(exc: type[BaseException]) -> Iterator[Callable[[], None]]:
    """A SIGALRM handler raising ``exc`` while the supervising loop runs; yields the arming function.

    The timer is re-armed when the signal lands outside the spawn's code (in Runner's
    own loop, between two calls): the contract is about exceptions out of the spawn.
    """

    def handler(signum: int, frame: types.FrameType | None) -> None:
        if not in_supervising_loop(frame):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        raise exc("raised by a SIGALRM handler")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield lambda: signal.setitimer(signal.ITIMER_REAL, 0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test.

    ``ansible_runner.run()`` without a ``cancel_callback`` installs its own and never
    restores it, so an earlier test in this process may have left it.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def sigint_from_a_thread() -> None:
    """SIGINT to this process from another thread, 50 ms from now (as a Ctrl-C would come)."""
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()


# pytest-timeout's default method uses SIGALRM itself.
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("mode", ["pipes", "terminal"])
def test_signal_handler_exception_ends_job(job_dir: JobDir, tmp_path: Path, mode: str) -> None:
    with alarm_raises(Abandon) as arm, spawn_mode(mode):
        watcher = FireWhenRunning(arm)
        with pytest.raises(Abandon) as held:
            run_sleep_job(job_dir, watcher)
        # The exception, its traceback and Runner.run()'s frames (with the spawn) are
        # still referenced here, as Celery keeps a failed task's traceback.
        assert_job_gone(watcher)
        assert held.value is not None
        with runner_files_left_open():
            del held
    assert_read_output_kept(tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pipes", "terminal"])
def test_keyboard_interrupt_with_own_cancel_callback_ends_job(job_dir: JobDir, tmp_path: Path, mode: str) -> None:
    # With a cancel_callback of its own, ansible_runner.run() leaves SIGINT alone:
    # Ctrl-C raises KeyboardInterrupt inside Runner.run().
    with default_sigint(), spawn_mode(mode):
        watcher = FireWhenRunning(sigint_from_a_thread)
        with pytest.raises(KeyboardInterrupt) as held:
            run_sleep_job(job_dir, watcher)
        assert_job_gone(watcher)
        assert held.traceback  # held while checked
        with runner_files_left_open():
            del held
    assert_read_output_kept(tmp_path)


@pytest.mark.timeout(120)
def test_keyboard_interrupt_contrast_with_stock(job_dir: JobDir, tmp_path: Path) -> None:
    """Stock leaves the whole job running while the exception is held; runner-spawn ends it."""
    with default_sigint():
        stock = FireWhenRunning(sigint_from_a_thread)
        with pytest.raises(KeyboardInterrupt) as held:
            run_sleep_job(job_dir, stock)
        try:
            still_running = procs.alive(stock.new())
            # Stock: nothing ends the job while the host holds the exception (at least
            # ansible-playbook and the 3 sleeps run on).
            assert len(still_running) >= 4, f"stock was expected to leave the job running: {still_running}"
        finally:
            # Dropped, stock's pty is closed by its finalizer (which kills and reaps
            # ansible-playbook); whatever of its tree is left is killed here, by pid.
            with runner_files_left_open():
                del held
            procs.kill_all({**stock.seen, **stock.new()})
        with spawn_mode("pipes"):
            patched = FireWhenRunning(sigint_from_a_thread)
            with pytest.raises(KeyboardInterrupt) as held:
                run_sleep_job(job_dir, patched)
            assert_job_gone(patched)
            assert held.traceback
            with runner_files_left_open():
                del held


@pytest.mark.timeout(120, method="thread")
def test_exception_dropped_frees_spawn_and_job_stays_ended(job_dir: JobDir, tmp_path: Path) -> None:
    """Held or dropped, the job is gone; once dropped, the spawn is freed without a cyclic collection."""
    spawns: list[weakref.ref[Any]] = []

    class Tracked(RunnerSpawn):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            spawns.append(weakref.ref(self))

    gc.disable()
    try:
        with alarm_raises(Abandon) as arm:
            runner_spawn.install()
            import ansible_runner.runner as runner_module

            installed = runner_module.pexpect.spawn
            runner_module.pexpect.spawn = Tracked
            try:
                watcher = FireWhenRunning(arm)
                with pytest.raises(Abandon) as held:
                    run_sleep_job(job_dir, watcher)
                assert_job_gone(watcher)
                assert [ref() is not None for ref in spawns] == [True]  # held: the frames keep it
                with runner_files_left_open():
                    del held
                    assert [ref() is None for ref in spawns] == [True]  # dropped: freed at once
            finally:
                runner_module.pexpect.spawn = installed
                runner_spawn.uninstall()
    finally:
        gc.enable()
    assert procs.alive(watcher.seen) == {}
    assert_read_output_kept(tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls", [RunnerSpawn, TerminalSpawn])
def test_spawn_dropped_while_job_runs_ends_job(job_dir: JobDir, cls: type[RunnerSpawn]) -> None:
    """No exception at all: the last reference to a running spawn goes; the job ends then."""
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=3)
    before = procs.descendants()
    gc.disable()
    try:
        child = cls(
            "ansible-playbook",
            ["-i", "inventory/hosts", "project/site.yml"],
            cwd=str(pdd),
            encoding="utf-8",
            timeout=None,
        )
        ref = weakref.ref(child)
        seen: dict[int, int] = {}
        while len(seen) < RUNNING:
            child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.2)
            assert child.isalive(), child.before
            seen.update({p: s for p, s in procs.descendants().items() if p not in before})
            seen = procs.alive(seen)
        del child
        assert ref() is None, "the spawn was not freed when its last reference went"
    finally:
        gc.enable()
    assert procs.wait_gone({**seen, **{p: s for p, s in procs.descendants().items() if p not in before}}, 2.0) == {}


@pytest.mark.timeout(60, method="thread")
def test_repeating_signal_does_not_interrupt_the_ending(caplog: pytest.LogCaptureFixture) -> None:
    """A handler raising again and again while the job is being ended: the job still ends
    whole, and the first exception is the one that comes out."""
    raised: list[Abandon] = []

    def handler(signum: int, frame: types.FrameType | None) -> None:
        raised.append(Abandon(f"number {len(raised)}"))
        if len(raised) == 5:  # well within the ending (0.5 s grace), then quiet
            signal.setitimer(signal.ITIMER_REAL, 0)
        raise raised[-1]

    # A tree that ignores SIGTERM, so the ending needs its grace period and SIGKILL.
    script = "trap '' TERM; (trap '' TERM; setsid sleep 60 & wait) & echo ready; wait"
    child = RunnerSpawn("sh", ["-c", script], encoding="utf-8")
    child.delayafterterminate = 0.5
    child.expect("ready")
    tree: dict[int, int] = {}
    while len(tree) < 2:  # the subshell and sleep
        time.sleep(0.01)  # polling a condition, bounded by the test's timeout
        tree = procs.descendants(child.pid)
    tree[child.pid] = procs.descendants()[child.pid]
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.02)  # then every 20 ms
        with pytest.raises(Abandon) as out:
            child.expect(pexpect.EOF, timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert out.value is raised[0]
    assert len(raised) > 1, "the handler fired only once; the test did not exercise a second exception"
    assert procs.alive(tree) == {}
    child.close()
    assert child.signalstatus == signal.SIGKILL


GEVENT_HOST = r"""
from gevent import monkey

monkey.patch_all()

import json, sys
import gevent
import ansible_runner
import runner_spawn
from tests import procs

runner_spawn.install()
before = procs.descendants()
seen = {}

def job_process(pid):
    # Every process of a job carries the RUNNER_SPAWN_JOB marker (the host's watchdog does not).
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(v.startswith(b"RUNNER_SPAWN_JOB=") for v in f.read().split(b"\0"))
    except OSError:
        return False

def fire_when_running():
    running = {p: s for p, s in procs.descendants().items() if p not in before and job_process(p)}
    seen.update(running)
    if len(running) >= %(running)d and not getattr(fire_when_running, "fired", False):
        fire_when_running.fired = True
        gevent.Timeout(0.05).start()  # raised in this greenlet, inside Runner.run()
    return False

try:
    ansible_runner.run(private_data_dir=sys.argv[1], playbook="site.yml", cancel_callback=fire_when_running,
                       settings={"pexpect_timeout": 0.5}, quiet=True)
except gevent.Timeout as e:
    held = e  # the exception and its frames stay referenced
    left = procs.wait_gone(seen, %(gone)f)
    print(json.dumps({"raised": type(e).__name__, "seen": len(seen), "left": sorted(left)}))
"""


@pytest.mark.timeout(120)
def test_gevent_timeout_ends_job(job_dir: JobDir, tmp_path: Path) -> None:
    pytest.importorskip("gevent", reason="gevent comes with the test extra")
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=3)
    script = tmp_path / "gevent_host.py"
    script.write_text(GEVENT_HOST % {"running": RUNNING, "gone": GONE_WITHIN})
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(script), str(pdd)], capture_output=True, text=True, timeout=100, cwd=root, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["raised"] == "Timeout", report
    assert report["seen"] >= RUNNING, report
    assert report["left"] == [], f"gevent's Timeout left the job running: {report}\n{proc.stderr[-3000:]}"


# --- exceptions out of Runner.run() from between the spawn's calls ------------------------


class Interrupt(BaseException):
    """An asynchronous exception that is not an ``Exception`` (as ``KeyboardInterrupt``):
    Runner's ``except Exception`` around ``cancel_callback`` lets it through as it is."""


def raise_from_callback() -> None:
    raise RuntimeError("the cancel callback failed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pipes", "terminal"])
def test_raising_cancel_callback_ends_job(job_dir: JobDir, tmp_path: Path, mode: str) -> None:
    """Runner closes the stdout artifact and raises CallbackError from its loop, between the
    spawn's calls: the job is ended before CallbackError leaves Runner.run()."""
    with spawn_mode(mode):
        watcher = FireWhenRunning(raise_from_callback)
        with pytest.raises(CallbackError) as held:
            run_sleep_job(job_dir, watcher)
        assert isinstance(held.value.__cause__, RuntimeError)  # the exception itself, unchanged
        assert_job_gone(watcher)
        with runner_files_left_open():
            del held
    assert_read_output_kept(tmp_path)


@pytest.mark.timeout(120)
def test_raising_cancel_callback_contrast_with_stock(job_dir: JobDir) -> None:
    """Stock leaves the whole job running while CallbackError is held."""
    stock = FireWhenRunning(raise_from_callback)
    with pytest.raises(CallbackError) as held:
        run_sleep_job(job_dir, stock)
    try:
        still_running = procs.alive(stock.new())
        assert len(still_running) >= 4, f"stock was expected to leave the job running: {still_running}"
    finally:
        with runner_files_left_open():
            del held
        procs.kill_all({**stock.seen, **stock.new()})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["pipes", "terminal"])
def test_signal_handler_exception_inside_cancel_callback_ends_job(job_dir: JobDir, tmp_path: Path, mode: str) -> None:
    """A signal handler raises while the main thread is inside ``cancel_callback``, not in the spawn."""
    landed: list[str] = []

    def handler(signum: int, frame: types.FrameType | None) -> None:
        landed.append("spawn" if in_supervising_loop(frame) else "elsewhere")
        raise Interrupt("raised by a SIGUSR1 handler")

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with spawn_mode(mode):
            # raise_signal() runs the handler before it returns, in the callback's frame.
            watcher = FireWhenRunning(lambda: signal.raise_signal(signal.SIGUSR1))
            with pytest.raises(Interrupt) as held:
                run_sleep_job(job_dir, watcher)
            assert landed == ["elsewhere"]
            assert str(held.value) == "raised by a SIGUSR1 handler"
            assert_job_gone(watcher)
            with runner_files_left_open():
                del held
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert_read_output_kept(tmp_path)


@pytest.mark.timeout(120)
def test_exception_before_the_loop_ends_job(job_dir: JobDir) -> None:
    """An exception lands in Runner.run() right after the spawn started the job, before
    Runner's loop (or any of the spawn's reads) runs: the job is ended."""
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=3)
    before = procs.descendants()
    seen: dict[int, int] = {}

    class InterruptedAfterStart(RunnerSpawn):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.update({p: s for p, s in procs.descendants().items() if p not in before})
            raise Interrupt("right after the job started")

    runner_spawn.install()
    import ansible_runner.runner as runner_module

    installed = runner_module.pexpect.spawn
    runner_module.pexpect.spawn = InterruptedAfterStart
    try:
        with pytest.raises(Interrupt) as held:
            ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
        assert seen, "the job was not observed"
        job = {**seen, **{p: s for p, s in procs.descendants().items() if p not in before}}
        assert procs.wait_gone(job, GONE_WITHIN) == {}, "the job runs on while the exception is held"
        with runner_files_left_open():
            del held
    finally:
        runner_module.pexpect.spawn = installed
        runner_spawn.uninstall()


def job_marker(pid: int) -> str | None:
    """The job marker (RUNNER_SPAWN_JOB) in ``pid``'s environment, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RUNNER_SPAWN_JOB="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


@pytest.mark.timeout(180)
def test_exception_in_one_run_leaves_a_parallel_run_alone(job_dir: JobDir) -> None:
    """Two Runner.run() calls in two threads: CallbackError out of one ends its own job only;
    the other job runs on until it is cancelled as usual."""
    before = procs.descendants()

    def jobs() -> dict[str, dict[int, int]]:
        out: dict[str, dict[int, int]] = {}
        for pid, start in procs.descendants().items():
            marker = None if pid in before else job_marker(pid)
            if marker is not None:
                out.setdefault(marker, {})[pid] = start
        return out

    seen: dict[str, dict[int, int]] = {}

    def fail_when_both_run() -> bool:
        running = jobs()
        for marker, found in running.items():
            seen.setdefault(marker, {}).update(found)
        if len(running) == 2 and all(len(found) >= RUNNING for found in running.values()):
            raise RuntimeError("the cancel callback failed")
        return False

    cancel_other = threading.Event()
    other: dict[str, Any] = {}

    def run_other(pdd: Path) -> None:
        try:
            r = ansible_runner.run(
                private_data_dir=str(pdd),
                playbook="site.yml",
                cancel_callback=cancel_other.is_set,
                settings={"pexpect_timeout": 0.5},
                quiet=True,
            )
            other["status"] = r.status
        except BaseException as e:  # pragma: no cover - reported below
            other["error"] = e

    with spawn_mode("pipes"):
        thread = threading.Thread(target=run_other, args=(job_dir(SLEEP_PLAYBOOK, hosts=3),))
        thread.start()
        try:
            with pytest.raises(CallbackError) as held:
                ansible_runner.run(
                    private_data_dir=str(job_dir(SLEEP_PLAYBOOK, hosts=3)),
                    playbook="site.yml",
                    cancel_callback=fail_when_both_run,
                    settings={"pexpect_timeout": 0.5},
                    quiet=True,
                )
            assert len(seen) == 2, f"two jobs were not observed: {seen}"
            left = {marker: procs.wait_gone(found, GONE_WITHIN) for marker, found in seen.items()}
            assert sorted(len(still) >= RUNNING for still in left.values()) == [False, True], left
            ended = [marker for marker, still in left.items() if not still]
            assert len(ended) == 1, f"the failed run's job was not ended: {left}"
            assert thread.is_alive(), other
        finally:
            cancel_other.set()
            thread.join(60)
        assert other == {"status": "canceled"}
        assert all(procs.wait_gone(found, GONE_WITHIN) == {} for found in seen.values())
        with runner_files_left_open():
            del held
