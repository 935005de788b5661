"""Jobs never outlive their host: the watchdog (runner_spawn._watchdog, started and fed by
runner_spawn._watchdog_client) ends them.

Every host here is a real process started by the test, in a session of its own, and
killed by its pid. The job's processes re-parent to this test process (a child
subreaper, see conftest.py) when the host dies, so they stay findable; whatever a test
started and is still running at its end is killed by pid (``started`` fixture).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner_spawn import RunnerSpawn, _child, _watchdog_client
from tests import bench, procs

host_death = bench.load("host_death")

MARKER = b"RUNNER_SPAWN_JOB="

#: A host driven line by line on stdin; answers one JSON line per command.
DRIVER = r"""
import json, os, signal, sys, time
import pexpect
import runner_spawn
from runner_spawn import _watchdog_client as client

def reply(**kw):
    print(json.dumps(kw), flush=True)

jobs = []
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "info":
        reply(pid=os.getpid(), watchdog=client.watchdog_pid())
    elif cmd == "spawn":
        argv = json.loads(arg)
        jobs.append(runner_spawn.RunnerSpawn(argv[0], argv[1:], encoding="utf-8"))
        reply(pid=jobs[-1].pid, watchdog=client.watchdog_pid())
    elif cmd == "finish":
        job = jobs[int(arg)]
        job.expect(pexpect.EOF, timeout=30)
        job.close()
        reply(status=job.exitstatus, output=job.before)
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:
            info = {"inherited_watchdog": client.watchdog_pid(), "inherited_socket": client._sock is not None}
            job = runner_spawn.RunnerSpawn("sleep", ["60"])
            info.update(pid=os.getpid(), job=job.pid, watchdog=client.watchdog_pid())
            with open(arg + ".tmp", "w") as f:
                json.dump(info, f)
            os.rename(arg + ".tmp", arg)
            time.sleep(120)
            os._exit(0)
        reply(fork=pid)
    elif cmd == "steal-socket":  # close the host's end behind its back; a pipe takes its number
        fd = client._sock.fileno()
        stolen_r, stolen_w = os.pipe()
        os.dup2(stolen_w, fd)
        os.set_blocking(stolen_r, False)
        reply(fd=fd)
    elif cmd == "stolen":
        try:
            reply(data=os.read(stolen_r, 4096).decode(errors="replace"))
        except BlockingIOError:
            reply(data="")
    elif cmd == "kill-watchdog":
        os.kill(client.watchdog_pid(), signal.SIGKILL)
        reply(ok=True)
    elif cmd == "kill-watchdog-and-spawn":  # no delay between the kill and the job start
        old = client.watchdog_pid()
        argv = json.loads(arg)
        os.kill(old, signal.SIGKILL)
        jobs.append(runner_spawn.RunnerSpawn(argv[0], argv[1:], encoding="utf-8"))
        reply(pid=jobs[-1].pid, old=old, watchdog=client.watchdog_pid())
    elif cmd == "stop-watchdog":
        os.kill(client.watchdog_pid(), signal.SIGSTOP)
        reply(ok=True)
    elif cmd == "exit":
        sys.exit(0)
"""


class Host:
    """A driven host process (:data:`DRIVER`) in a session of its own."""

    def __init__(self, env: dict[str, str] | None = None, prelude: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        # The only reader of stdout, and the one that closes it (at end of file: when the
        # host and any forked copy of it are gone); closing it from another thread would
        # wait for this read.
        stdout = self.proc.stdout
        assert stdout is not None
        with stdout:
            for line in stdout:
                self.lines.put(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        answer: dict[str, Any] = json.loads(self.lines.get(timeout=30))
        return answer

    def spawn(self, *argv: str) -> dict[str, Any]:
        return self.ask("spawn " + json.dumps(list(argv)))

    def kill(self) -> None:
        """SIGKILL the host (what the OOM killer does) and reap it."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # the host is gone
                self.proc.stdin.close()


class Started(list):  # type: ignore[type-arg]
    """Hosts (``append``) and other processes (``popens``) a test started."""

    popens: list[subprocess.Popen[bytes]]


@pytest.fixture
def started() -> Iterator[Started]:
    """What the test starts; afterwards every process the test started is killed by pid."""
    hosts = Started()
    hosts.popens = []
    before = procs.descendants()
    yield hosts
    for h in hosts:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()
        h.close()
    for p in hosts.popens:
        if p.poll() is None:
            p.kill()
        p.wait()
    procs.kill_all({p: s for p, s in procs.descendants().items() if p not in before})


def one(pid: int) -> dict[int, int]:
    """{pid: start time} of one running process, to check it later without pid reuse."""
    st = procs.stat(pid)
    assert st is not None and st[3] != "Z", f"pid {pid} does not run"
    return {pid: st[2]}


def marker_of(pid: int) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e[len(MARKER) :].decode() for e in env if e.startswith(MARKER))


def marked(prefix: str) -> dict[int, int]:
    """{pid: start} of every running process whose job marker starts with ``prefix``."""
    needle = MARKER + prefix.encode()
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(needle) for e in env):
                found.update(procs.alive({int(name): (procs.stat(int(name)) or (0, 0, 0, ""))[2]}))
    return found


def decoy(marker: str, started: Started) -> dict[int, int]:
    """A ``sleep 60`` carrying ``marker``, started by the test itself (not a job of any host)."""
    p = subprocess.Popen(["sleep", "60"], env={**os.environ, "RUNNER_SPAWN_JOB": marker}, start_new_session=True)
    started.popens.append(p)
    return one(p.pid)


def wait_gone(what: dict[int, int], timeout: float = 10.0) -> dict[int, int]:
    left = procs.wait_gone(what, timeout)
    procs.reap_orphans(what)
    return left


# --- a real ansible_runner.run() host, SIGKILLed mid-playbook -------------------------------


def kill_mid_playbook(mode: str, tmp_path: Path) -> tuple[dict[int, int], dict[int, int], str | None]:
    """Run the 3-host ``sleep 60`` playbook in a host (benchmarks/host_death.py), SIGKILL
    the host once every task runs; (job processes, watchdogs, job marker prefix)."""
    pdd = host_death.make_job(tmp_path)
    host = host_death.start_host(mode, pdd)
    try:
        host_death.wait_running(pdd, 3, host, 90)
        time.sleep(0.3)  # every worker is past its fork
        tree = procs.descendants(host.pid)
        watchdogs = {p: s for p, s in tree.items() if host_death.is_watchdog(p)}
        job = {p: s for p, s in tree.items() if p not in watchdogs}
        # ansible-playbook, 3 workers (sessions of their own on ansible-core 2.19+), 3 sleeps at least
        assert len(job) >= 7, f"job tree not observed: {job}"
        prefix = None
        if mode == "patched":
            prefix = marker_of(next(iter(job))).rsplit("-", 1)[0] + "-"
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=10)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        assert host.stdout is not None
        host.stdout.close()
    return job, watchdogs, prefix


@pytest.mark.matrix
@pytest.mark.timeout(120)
def test_sigkilled_host_leaves_no_job_process(tmp_path: Path, started: Started) -> None:
    job, watchdogs, prefix = kill_mid_playbook("patched", tmp_path)
    assert len(watchdogs) == 1
    assert wait_gone(job) == {}, "job processes outlived the host"
    assert prefix is not None and marked(prefix) == {}
    assert wait_gone(watchdogs) == {}, "the watchdog did not exit after ending the job"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["stock", "pdeathsig", "nowatchdog"])
def test_without_watchdog_jobs_outlive_the_host(mode: str, tmp_path: Path, started: Started) -> None:
    """Recorded for the README (benchmarks/host_death.py has the table): no assertion on
    how many survive, only that the test cleans them up."""
    job, watchdogs, _ = kill_mid_playbook(mode, tmp_path)
    assert watchdogs == {}
    left = procs.wait_gone(job, 2.0)
    print(f"{mode}: {len(left)} of {len(job)} job processes left 2 s after the host's death")
    procs.kill_all(left)
    procs.reap_orphans(job)


# --- the watchdog's contract, with plain jobs -------------------------------------------------


@pytest.mark.timeout(60)
def test_watchdog_starts_lazily_alone_in_its_session_and_exits_with_the_host(started: Started) -> None:
    host = Host()
    started.append(host)
    assert host.ask("info")["watchdog"] is None  # runner_spawn imported and installed: no watchdog yet
    first = host.spawn("true")
    wd = first["watchdog"]
    assert wd is not None
    assert host.ask("finish 0")["status"] == 0
    assert host.spawn("true")["watchdog"] == wd  # one per host process
    st = procs.stat(wd)
    assert st is not None and st[0] == host.pid and st[1] == wd, "not the host's child, or not a session leader"
    # While it starts, Python has its script open; then it holds 0 (the socket), 1 and 2 only.
    deadline = time.monotonic() + 10
    while (fds := sorted(int(fd) for fd in os.listdir(f"/proc/{wd}/fd"))) != [0, 1, 2]:
        assert time.monotonic() < deadline, f"the watchdog holds fds {fds}"
        time.sleep(0.02)
    assert os.readlink(f"/proc/{wd}/fd/0").startswith("socket:")
    assert os.readlink(f"/proc/{wd}/fd/1") == os.readlink(f"/proc/{wd}/fd/2") == os.devnull
    assert Path(f"/proc/{wd}/environ").read_bytes() == b""
    watchdog = one(wd)
    assert host.ask("finish 1")["status"] == 0
    host.send("exit")
    assert host.proc.wait(timeout=10) == 0
    assert wait_gone(watchdog) == {}, "the watchdog outlived a host that exited normally"


@pytest.mark.timeout(60)
def test_watchdog_ends_only_running_jobs_of_its_host(started: Started) -> None:
    host = Host()
    started.append(host)
    running = one(host.spawn("sleep", "60")["pid"])
    # A job whose shell runs a child with an emptied environment: found as a descendant.
    shell = host.spawn("sh", "-c", "env -i sleep 60; exit 0")["pid"]
    time.sleep(0.3)
    env_cleared = procs.descendants(shell)
    assert len(env_cleared) == 1
    # A job that ended normally, leaving a background process on purpose: left running.
    host.spawn("sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!")
    background = one(int(host.ask("finish 2")["output"].strip()))
    marker = marker_of(next(iter(running)))
    prefix = marker.rsplit("-", 1)[0] + "-"
    pid, token = prefix.split("-")[:2]
    decoys = {}
    for other in (
        f"{prefix}999999",  # this host's prefix, never a job
        f"{marker}0",  # a running job's marker, extended
        f"{pid}-{token}",  # the prefix without its number
        f"{pid}-{'0' * len(token)}-{marker.rsplit('-', 1)[1]}",  # another token: another host process
        f"x{marker}",
    ):
        decoys.update(decoy(other, started))
    watchdog = one(host.ask("info")["watchdog"])

    host.kill()
    assert wait_gone({**running, **one(shell), **env_cleared}) == {}
    assert wait_gone(watchdog) == {}
    assert procs.alive(decoys) == decoys, "the watchdog ended a process that is no job of its host"
    assert procs.alive(background) == background, "the watchdog ended a reaped job's background process"


@pytest.mark.timeout(60)
def test_forked_copy_of_the_host_neither_holds_nor_inherits_the_watchdog(tmp_path: Path, started: Started) -> None:
    host = Host()
    started.append(host)
    job = one(host.spawn("sleep", "60")["pid"])
    report = tmp_path / "fork.json"
    copy = one(host.ask(f"fork {report}")["fork"])
    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline, "the forked copy did not report"
        time.sleep(0.02)
    info = json.loads(report.read_text())
    assert info["inherited_watchdog"] is None and info["inherited_socket"] is False
    assert info["watchdog"] is not None  # its own, for its own job
    copy_job = one(info["job"])
    assert marker_of(info["job"]).split("-")[:2] != marker_of(next(iter(job))).split("-")[:2]

    host.kill()  # the copy still runs: it must not keep the host's watchdog from seeing that
    assert wait_gone(job) == {}
    assert procs.alive(copy_job) == copy_job, "the host's watchdog ended the forked copy's job"
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_gone(copy) == {}
    assert wait_gone(copy_job) == {}


#: Runs of each watchdog-race test; ``RUNNER_SPAWN_RACE_RUNS=200`` for a long check under load.
RACE_RUNS = int(os.environ.get("RUNNER_SPAWN_RACE_RUNS", "2"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(RACE_RUNS))
def test_killed_watchdog_is_reaped_and_replaced_with_every_running_job(run: int, started: Started) -> None:
    host = Host()
    started.append(host)
    first = host.spawn("sleep", "60")
    old = first["watchdog"]
    host.ask("kill-watchdog")
    second = host.spawn("sleep", "60")
    assert second["watchdog"] not in (None, old)
    st = procs.stat(old)
    assert st is None or st[0] != host.pid, "the killed watchdog was not reaped"
    jobs = {**one(first["pid"]), **one(second["pid"])}
    host.kill()
    assert wait_gone(jobs) == {}, "the new watchdog did not end the job started before it"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(RACE_RUNS))
def test_watchdog_killed_right_before_a_job_start_is_replaced_at_that_start(run: int, started: Started) -> None:
    """The race: the watchdog is SIGKILLed and, with no delay, the next job starts while
    the dying watchdog's socket still accepts messages and its pidfd has not reported the
    exit yet. The job start must find out (no answer) and start a new watchdog with every
    running job, so that both jobs end when the host dies right after."""
    host = Host()
    started.append(host)
    first = host.spawn("sleep", "60")
    second = host.ask("kill-watchdog-and-spawn " + json.dumps(["sleep", "60"]))
    assert second["old"] == first["watchdog"]
    assert second["watchdog"] not in (None, second["old"]), "the job start took the killed watchdog for alive"
    jobs = {**one(first["pid"]), **one(second["pid"])}
    watchdog = one(second["watchdog"])
    host.kill()
    assert wait_gone(jobs) == {}, "a job outlived its host"
    assert wait_gone(watchdog) == {}


@pytest.mark.timeout(60)
def test_stopped_watchdog_is_replaced_at_the_next_job_start(started: Started) -> None:
    """A SIGSTOPped watchdog does not answer: the next job start waits a bounded time
    (ANSWER_WAIT), then SIGKILLs and reaps it, and a new one holds every running job."""
    host = Host()
    started.append(host)
    first = host.spawn("sleep", "60")
    host.ask("stop-watchdog")
    second = host.spawn("sleep", "60")
    assert second["watchdog"] not in (None, first["watchdog"])
    st = procs.stat(first["watchdog"])
    assert st is None or st[0] != host.pid, "the stopped watchdog was not reaped"
    jobs = {**one(first["pid"]), **one(second["pid"])}
    host.kill()
    assert wait_gone(jobs) == {}, "the new watchdog did not end the job started before it"


@pytest.mark.timeout(60)
def test_host_that_closes_the_socket_behind_our_back(started: Started) -> None:
    """End of file with the host alive (it closed its fds, as a daemonising host does):
    the old watchdog ends the running jobs, whose pipes are broken as well; the host never
    writes to the fd number that now names another file, and starts a new watchdog."""
    host = Host()
    started.append(host)
    first = host.spawn("sleep", "60")
    old, running = one(first["watchdog"]), one(first["pid"])
    host.ask("steal-socket")
    assert wait_gone(old) == {}
    assert wait_gone(running) == {}
    second = host.spawn("sleep", "60")
    assert second["watchdog"] not in (None, first["watchdog"])
    st = procs.stat(first["watchdog"])
    assert st is None or st[0] != host.pid, "the old watchdog was not reaped"
    assert host.ask("stolen")["data"] == ""
    job = one(second["pid"])
    host.kill()
    assert wait_gone(job) == {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["default-timeout", "gevent"])
def test_watchdog_in_hosts_that_change_sockets(host: str, started: Started) -> None:
    """socket.setdefaulttimeout() and gevent's monkey.patch_all() make new sockets
    non-blocking; the watchdog still blocks in read until the host dies."""
    if host == "gevent":
        pytest.importorskip("gevent")
        prelude = "from gevent import monkey; monkey.patch_all()\n"
    else:
        prelude = "import socket; socket.setdefaulttimeout(5)\n"
    h = Host(prelude=prelude)
    started.append(h)
    answer = h.spawn("sleep", "60")
    job, watchdog = one(answer["pid"]), one(answer["watchdog"])
    time.sleep(0.5)
    assert procs.alive({**job, **watchdog}) == {**job, **watchdog}
    h.kill()
    assert wait_gone(job) == {}
    assert wait_gone(watchdog) == {}


@pytest.mark.timeout(60)
def test_opt_out_starts_no_watchdog(started: Started) -> None:
    host = Host(env={_watchdog_client.OPT_OUT_VAR: "0"})
    started.append(host)
    answer = host.spawn("sleep", "60")
    assert answer["watchdog"] is None
    job = one(answer["pid"])
    host.kill()
    assert procs.wait_gone(job, 1.0) == job  # nothing ends it; the fixture does


def test_watch_returns_once_the_watchdog_has_read_the_marker() -> None:
    """watch() waits for the watchdog's answer: by then nothing the host sent is unread."""
    assert _watchdog_client.watchdog_pid() is not None  # conftest started it for this process
    sock = _watchdog_client._sock
    assert sock is not None

    def unread() -> int:  # bytes this process sent that the watchdog has not read yet
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])

    for _ in range(20):
        marker = _watchdog_client.new_marker()
        _watchdog_client.watch(marker)
        assert unread() == 0, "watch() returned before the watchdog read the marker"
        _watchdog_client.unwatch(marker)


def test_reaped_and_failed_jobs_are_unwatched() -> None:
    assert _watchdog_client.watchdog_pid() is not None  # conftest started it for this process
    child = RunnerSpawn("sleep", ["60"])
    marker = marker_of(child.pid)
    assert marker in _watchdog_client._active
    child.close(force=True)
    assert marker not in _watchdog_client._active, "still watched after close()"
    before = set(_watchdog_client._active)
    with pytest.raises(FileNotFoundError):
        _child.Child(["/nonexistent/program"], dict(os.environ), None)  # posix_spawn fails
    assert _watchdog_client._active == before, "a job that never started is still watched"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_benchmark_prints_the_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(bench.BENCHMARKS / "host_death.py"), "--quick", "--modes", "patched,nowatchdog"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "| 0 |" in rows["runner-spawn"], proc.stdout
    assert "RUNNER_SPAWN_WATCHDOG=0" in "".join(rows), proc.stdout
    assert "watchdog cost" in proc.stdout and "per job, in the host" in proc.stdout, proc.stdout
