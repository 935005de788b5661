"""Job lifetime: the whole job ends with the job, and not one byte or event is lost."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ansible_runner
import pexpect
import pytest
from ansible_runner.interface import init_command_config

from runner_spawn import RunnerSpawn, _child, _tree, handle_runner_termination
from tests import procs
from tests.conftest import JobDir

# Also run by every session of the version matrix (noxfile.py).
pytestmark = pytest.mark.matrix

SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 60
"""


def artifact(r: ansible_runner.Runner, name: str) -> str:
    return (Path(r.config.artifact_dir) / name).read_bytes().decode()


class TreeWatcher:
    """Records every process below this test process while a job runs (a cancel_callback)."""

    def __init__(self, cancel_when_running: int | None = None) -> None:
        self.seen: dict[int, int] = {}
        self.before = procs.descendants()
        self.cancel_when_running = cancel_when_running

    def __call__(self) -> bool:
        running = {p: s for p, s in procs.descendants().items() if p not in self.before}
        self.seen.update(running)
        return self.cancel_when_running is not None and len(running) >= self.cancel_when_running


def run_sleep_job(job_dir: JobDir, watcher: TreeWatcher, **kwargs: Any) -> ansible_runner.Runner:
    pdd = job_dir(SLEEP_PLAYBOOK, hosts=3)
    return ansible_runner.run(
        private_data_dir=str(pdd),
        playbook="site.yml",
        cancel_callback=watcher,
        settings={"pexpect_timeout": 0.5, **kwargs.pop("settings", {})},
        quiet=True,
        **kwargs,
    )


def assert_whole_tree_ended(watcher: TreeWatcher) -> None:
    # The job ran: ansible-playbook, 3 workers (own sessions on 2.19+) and 3 sleeps at least.
    assert len(watcher.seen) >= 7, f"job tree not observed: {watcher.seen}"
    assert procs.wait_gone(watcher.seen, 30) == {}


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("patched")
def test_cancel_ends_whole_tree(job_dir: JobDir) -> None:
    watcher = TreeWatcher(cancel_when_running=7)  # ansible-playbook, 3 workers, 3 sleeps
    r = run_sleep_job(job_dir, watcher)
    assert (r.status, r.rc) == ("canceled", 254)
    assert_whole_tree_ended(watcher)


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("patched")
def test_job_timeout_ends_whole_tree(job_dir: JobDir) -> None:
    watcher = TreeWatcher()
    r = run_sleep_job(job_dir, watcher, timeout=10)
    assert (r.status, r.rc) == ("timeout", 254)
    assert_whole_tree_ended(watcher)


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("patched")
def test_idle_timeout_ends_whole_tree(job_dir: JobDir) -> None:
    watcher = TreeWatcher()
    r = run_sleep_job(job_dir, watcher, settings={"idle_timeout": 8})
    assert (r.status, r.rc) == ("timeout", 254)
    assert_whole_tree_ended(watcher)


def test_termination_spares_host_and_its_group() -> None:
    # A child in the host's own process group: stock killpg(getpgid(pid)) would kill the host.
    victim = subprocess.Popen(["sleep", "30"])
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        assert os.getpgid(victim.pid) == os.getpgrp()
        handle_runner_termination(victim.pid, grace=1.0)
        assert victim.wait(timeout=30) == -signal.SIGTERM
        assert bystander.poll() is None, "a process of the host's group outside the job was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_termination_refuses_host_and_ancestors(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="runner_spawn"):
        handle_runner_termination(os.getpid())
        handle_runner_termination(os.getppid())
        handle_runner_termination(0)
    assert len([r for r in caplog.records if "refusing" in r.getMessage()]) == 3


def test_termination_escalates_to_sigkill_and_removes_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = "trap '' TERM; (trap '' TERM; setsid sleep 60 & wait) & echo ready; wait"
    child = RunnerSpawn("sh", ["-c", script], encoding="utf-8")
    child.expect("ready")
    tree = wait_for_tree(child.pid, 2)  # the subshell and its setsid sleep
    pidfile.write_text(str(child.pid))
    handle_runner_termination(child.pid, pidfile=str(pidfile), grace=0.5)
    assert not pidfile.exists()
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.signalstatus == signal.SIGKILL
    assert procs.wait_gone(tree, 30) == {}


def wait_for_tree(root: int, size: int) -> dict[int, int]:
    """The processes below ``root`` once there are ``size`` of them (a generous deadline)."""
    deadline = time.monotonic() + 30
    while len(tree := procs.descendants(root)) < size:
        assert time.monotonic() < deadline, f"only {len(tree)} processes below {root}"
        time.sleep(0.02)
    return tree


def test_background_process_holding_pipe_does_not_stall_runner(tmp_path: Path) -> None:
    before_fds, before_threads = procs.open_fds(), threading.active_count()
    before = procs.descendants()
    import runner_spawn

    runner_spawn.install()
    try:
        r = init_command_config(
            "sh", cmdline_args=["-c", "sleep 30 & echo hi"], private_data_dir=str(tmp_path), quiet=True
        )
        r.run()
    finally:
        runner_spawn.uninstall()
    leftover = {p: s for p, s in procs.descendants().items() if p not in before}
    procs.kill_all(leftover)  # the background sleep, which a normal end leaves alone (as stock)
    # run() returned while the background process still held the pipe (it sleeps 30 s).
    assert len(leftover) == 1, "the background process should have been left running, as with stock"
    assert (r.status, r.rc) == ("successful", 0)
    assert artifact(r, "stdout") == "hi\n"
    assert procs.open_fds() == before_fds
    assert threading.active_count() == before_threads


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("patched")
def test_slow_event_handler_loses_nothing(job_dir: JobDir) -> None:
    tasks = "".join(f"\n    - name: task {i}\n      debug:\n        msg: step-{i}\n" for i in range(20))
    pdd = job_dir("- hosts: all\n  gather_facts: false\n  tasks:" + tasks)
    delivered: list[str] = []

    def slow(event: dict[str, Any]) -> bool:
        time.sleep(0.2)
        delivered.append(event["event"])
        return True

    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", event_handler=slow, quiet=True)
    assert (r.status, r.rc) == ("successful", 0)
    assert delivered[-1] == "playbook_on_stats"
    assert delivered == [e["event"] for e in r.events]
    assert delivered.count("runner_on_ok") == 20


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("patched")
def test_fifty_megabytes_reach_stdout_artifact(tmp_path: Path) -> None:
    code = "import sys\nw = sys.stdout.write\nfor i in range(500):\n    w(f'{i:08d}' + 'x' * 99991 + chr(10))\n"
    r = init_command_config(sys.executable, cmdline_args=["-c", code], private_data_dir=str(tmp_path), quiet=True)
    r.run()
    expected = "".join(f"{i:08d}" + "x" * 99991 + "\n" for i in range(500))
    assert (r.status, r.rc) == ("successful", 0)
    assert artifact(r, "stdout") == expected


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("patched")
def test_two_hundred_runs_leave_nothing_behind(tmp_path: Path) -> None:
    def one(i: int) -> None:
        r = init_command_config("echo", cmdline_args=[f"run-{i}"], private_data_dir=str(tmp_path / str(i)), quiet=True)
        r.run()
        assert (r.status, r.rc, artifact(r, "stdout")) == ("successful", 0, f"run-{i}\n")

    one(-1)  # warm-up: imports, lazily created objects
    fds, threads, kids = procs.open_fds(), threading.active_count(), procs.descendants()
    for i in range(200):
        one(i)
    assert procs.open_fds() == fds
    assert threading.active_count() == threads
    assert procs.descendants() == kids
    assert _child._children == {} or len(_child._children) == 0


def _sleeper() -> None:
    time.sleep(3)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("patched")
def test_jobs_complete_while_host_keeps_forking(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    stop = threading.Event()
    started: list[multiprocessing.process.BaseProcess] = []

    def forker() -> None:
        while not stop.is_set():
            p = ctx.Process(target=_sleeper)
            p.start()
            started.append(p)
            stop.wait(0.05)

    t = threading.Thread(target=forker)
    t.start()
    try:
        for i in range(10):
            code = f"import sys\nfor n in range(300):\n    print('{i}-line', n)\n"
            r = init_command_config(
                sys.executable, cmdline_args=["-c", code], private_data_dir=str(tmp_path / str(i)), quiet=True
            )
            r.run()
            expected = "".join(f"{i}-line {n}\n" for n in range(300))
            assert (r.status, r.rc, artifact(r, "stdout")) == ("successful", 0, expected)
    finally:
        stop.set()
        t.join()
        for p in started:
            p.terminate()
            p.join()


def test_spawn_drain_with_slow_logfile_delivers_everything() -> None:
    class Slow(io.StringIO):
        def write(self, s: str) -> int:
            time.sleep(0.05)
            return super().write(s)

    code = "import sys\nfor n in range(50):\n    sys.stdout.write(str(n % 10) * 1000 + chr(10))\n"
    child = RunnerSpawn(sys.executable, ["-c", code], encoding="utf-8", maxread=4096)
    child.logfile_read = sink = Slow()
    child.wait()  # the child has exited; all its output waits in the pipe
    child.expect(pexpect.EOF, timeout=0.2)  # far less than the time the sink needs
    child.close()
    assert sink.getvalue() == "".join(str(n % 10) * 1000 + "\n" for n in range(50))


def test_close_with_background_holder_leaves_no_fd_or_thread() -> None:
    fds, threads = procs.open_fds(), threading.active_count()
    before = procs.descendants()
    child = RunnerSpawn("sh", ["-c", "sleep 30 & echo hi"], encoding="utf-8")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    leftover = {p: s for p, s in procs.descendants().items() if p not in before}
    procs.kill_all(leftover)
    assert child.before == "hi\n"
    assert procs.open_fds() == fds
    assert threading.active_count() == threads


def test_memory_independent_of_output_size() -> None:
    import tracemalloc

    code = "import sys\nfor n in range(300):\n    sys.stdout.write('y' * 99999 + chr(10))\n"
    child = RunnerSpawn(sys.executable, ["-c", code], encoding="utf-8", codec_errors="replace")
    received = [0]

    class Counter:
        def write(self, s: str) -> None:
            received[0] += len(s)

        def flush(self) -> None:
            pass

    child.logfile_read = Counter()
    tracemalloc.start()
    try:
        while child.isalive():
            child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=5, searchwindowsize=100)
        child.expect(pexpect.EOF, timeout=30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        child.close()
    assert received[0] == 300 * 100_000
    assert peak < 8 * 2**20, f"supervisor kept {peak / 2**20:.1f} MiB for 30 MB of output"


def test_logs_never_contain_passwords_or_env_values(caplog: pytest.LogCaptureFixture) -> None:
    secret_env, password = "env-secret-value-123", "prompt-password-456"
    env = {**os.environ, "SOME_TOKEN": secret_env}
    with caplog.at_level(logging.DEBUG, logger="runner_spawn"):
        child = RunnerSpawn(
            "sh", ["-c", "printf 'Password: '; read p; exec 0<&-; sleep 0.2"], env=env, encoding="utf-8"
        )
        child.expect("Password: ")
        child.sendline(password)
        child.expect(pexpect.EOF, timeout=30)
        child.sendline(password)  # stdin closed now: logged as not sent, without the text
        child.close()
        handle_runner_termination(child.pid)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert password not in text and secret_env not in text


def test_proc_handle_guards_against_pid_reuse() -> None:
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    info = _tree.read_proc(child.pid)
    assert info is not None
    stale = _tree.ProcInfo(info.pid, info.ppid, info.pgid, info.sid, info.start - 1, False)
    handle = _tree.ProcHandle(stale)  # same pid, other start time: another process
    try:
        assert not handle.alive()
        handle.signal(signal.SIGKILL)
        assert child.poll() is None, "a process that only shares the pid was signalled"
    finally:
        handle.close()
        child.kill()
        child.wait()


def test_termination_finds_escaped_descendants_by_job_marker() -> None:
    # A descendant in a session of its own whose parent is gone (as an ansible-core
    # worker forked just as ansible-playbook handles SIGTERM): no parent link and no
    # session leads to it, only the job's environment.
    before = procs.descendants()
    child = RunnerSpawn("sh", ["-c", "(setsid sleep 60 &); echo ready; sleep 60"], encoding="utf-8")
    child.expect("ready")

    def escaped_now() -> dict[int, int]:
        return {
            p: s
            for p, s in procs.descendants().items()
            if p not in before and p != child.pid and procs.stat(p)[0] == os.getpid()  # type: ignore[index]
        }

    deadline = time.monotonic() + 30
    while len(escaped := escaped_now()) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(escaped) == 1, "the setsid'd sleep should have been re-parented to this (subreaper) process"
    handle_runner_termination(child.pid, grace=0.5)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert procs.wait_gone(escaped, 30) == {}
    procs.reap_orphans(escaped)


def test_job_environment_carries_its_marker() -> None:
    child = RunnerSpawn("sh", ["-c", 'echo "$RUNNER_SPAWN_JOB"'], encoding="utf-8")
    child.expect(pexpect.EOF)
    child.close()
    assert child.before.strip() == child._child.marker
