"""Ending a job that floods its output: the end-of-output contract (README "End of output").

1. A job that exits by itself: everything it wrote reaches ``logfile_read``, at any
   sink speed, and the final ``expect(EOF)`` returns EOF.
2. A job that Runner ended (cancel, job_timeout, idle_timeout): ``Runner.run()``
   returns ('canceled'|'timeout', 254) as stock does and never raises TIMEOUT; what
   was handed over ends at a line boundary (no half event).
3. Once the child has exited and its end of output is known or ready on the pipe,
   no ``expect()`` returns TIMEOUT.

Slow sinks are made deterministic with handlers that sleep per call; no test asserts
a duration.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ansible_runner
import pexpect
import pytest
from ansible_runner.config.runner import RunnerConfig
from ansible_runner.runner import Runner

import runner_spawn
from runner_spawn import RunnerSpawn, TerminalSpawn
from tests import procs
from tests.conftest import JobDir
from tests.runner_loop import RUNNER_KW

LINE = "0123456789abcdefghijklmnopqrstuvwxyz"  # every output line of the flooding commands
MODES = ["pipe", "terminal"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """runner-spawn installed in pipe mode (RunnerSpawn) or terminal mode (TerminalSpawn)."""
    runner_spawn.install(terminal=request.param == "terminal")
    try:
        yield request.param
    finally:
        runner_spawn.uninstall()


@pytest.fixture
def busy_load() -> Iterator[None]:
    """Two busy-looping processes beside the test (a loaded 2-core machine); killed by pid after."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def cancel_after(seconds: float) -> Callable[[], bool]:
    """A cancel_callback that asks to cancel once ``seconds`` have passed since its first call."""
    start: list[float] = []

    def cancel() -> bool:
        start.append(time.monotonic())
        return start[-1] - start[0] > seconds

    return cancel


def assert_no_half_event(events: list[dict[str, Any]], line: str | None = None) -> None:
    """No event carries part of a line: no event token fragment, and (for ``line`` output) whole lines."""
    for e in events:
        stdout = e.get("stdout", "")
        assert "\x1b[K" not in stdout, f"a cut event token was handed over: {stdout[:200]!r}"
        if line is not None and e.get("event") == "verbose":
            assert stdout.rstrip("\r") == line, f"a half line was handed over: {stdout!r}"


# --- ansible-runner's own two long-running tests, reproduced ----------------------------


def ansible_runner_test_config(tmp_path: Path, command: list[str]) -> RunnerConfig:
    """The RunnerConfig of ansible-runner's test_run_command_long_running(_children)."""
    rc = RunnerConfig(str(tmp_path))
    rc.suppress_ansible_output = True
    rc.expect_passwords = {pexpect.TIMEOUT: None, pexpect.EOF: None}
    rc.cwd = str(tmp_path)
    rc.env = {}
    rc.job_timeout = 10
    rc.idle_timeout = 0
    rc.pexpect_timeout = 2.0
    rc.pexpect_use_poll = True
    rc.command = command
    return rc


ANSIBLE_RUNNER_COMMANDS = {"yes": ["yes"], "children": ["bash", "-c", "(yes)"]}


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("patched")
@pytest.mark.parametrize("command", list(ANSIBLE_RUNNER_COMMANDS))
def test_ansible_runner_long_running(tmp_path: Path, command: str) -> None:
    rc = ansible_runner_test_config(tmp_path, ANSIBLE_RUNNER_COMMANDS[command])
    assert Runner(config=rc).run() == ("timeout", 254)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.usefixtures("patched", "busy_load")
@pytest.mark.parametrize("command", list(ANSIBLE_RUNNER_COMMANDS))
def test_ansible_runner_long_running_loaded(tmp_path: Path, command: str) -> None:
    rc = ansible_runner_test_config(tmp_path, ANSIBLE_RUNNER_COMMANDS[command])
    assert Runner(config=rc).run() == ("timeout", 254)


# --- a slow sink, deterministic ----------------------------------------------------------


def slow_handler(seconds: float) -> Callable[[dict[str, Any]], bool]:
    """An event_handler that takes ``seconds`` per event (and keeps every event)."""

    def handler(event: dict[str, Any]) -> bool:
        time.sleep(seconds)
        return True

    return handler


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", ["job_timeout", "cancel"])
def test_slow_sink_flood_ended_by_runner_returns(tmp_path: Path, mode: str, end: str) -> None:
    """At 2 ms an event, one pipe of LINE is 1800 events: longer than the final expect's 5 s."""
    kwargs: dict[str, Any] = {"timeout": 3} if end == "job_timeout" else {"cancel_callback": cancel_after(3)}
    _, _, rc = ansible_runner.run_command(
        executable_cmd="yes",
        cmdline_args=[LINE],
        private_data_dir=str(tmp_path),
        ident="flood",
        event_handler=slow_handler(0.002),
        quiet=True,
        **kwargs,
    )
    artifacts = tmp_path / "artifacts" / "flood"
    status = (artifacts / "status").read_text()
    assert (status, rc) == ("timeout" if end == "job_timeout" else "canceled", 254)
    stdout = (artifacts / "stdout").read_bytes()
    assert stdout, "nothing the job wrote was kept"
    assert stdout.endswith(b"\n")
    events = [e for e in _events(artifacts)]
    assert events and all(e["event"] == "verbose" for e in events)
    assert_no_half_event(events, LINE)


def _events(artifacts: Path) -> Iterator[dict[str, Any]]:
    import json

    for path in sorted((artifacts / "job_events").glob("*.json"), key=lambda p: int(p.name.split("-")[0])):
        yield json.loads(path.read_text())


@pytest.mark.timeout(120)
def test_slow_sink_job_that_exits_delivers_every_line(tmp_path: Path, mode: str) -> None:
    """2000 lines, written at once, at 4 ms an event: 8 s of handing over after the job exited."""
    n = 2000
    _, _, rc = ansible_runner.run_command(
        executable_cmd="seq",
        cmdline_args=["1", str(n)],
        private_data_dir=str(tmp_path),
        ident="seq",
        event_handler=slow_handler(0.004),
        quiet=True,
    )
    artifacts = tmp_path / "artifacts" / "seq"
    assert ((artifacts / "status").read_text(), rc) == ("successful", 0)
    lines = (artifacts / "stdout").read_bytes().decode().split()
    assert lines == [str(i) for i in range(1, n + 1)]
    assert len(list(_events(artifacts))) == n


# --- cancel, job_timeout and idle_timeout through ansible_runner.run and run_command --------

# Each item's result is an event (its encoded data is a few KiB): a task that floods.
FLOOD_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: flood
      debug:
        msg: "{{ item }} 0123456789abcdefghijklmnopqrstuvwxyz"
      loop: "{{ range(100000) | list }}"
"""

QUIET_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: quiet
      command: sleep 60
"""

#: How each end is asked for: Runner settings, or a cancel_callback; and the status it gives.
#: pexpect_timeout 1 makes Runner look at its clocks and the callback every second.
ENDS: dict[str, tuple[dict[str, int], str]] = {
    "cancel": ({}, "canceled"),
    "job_timeout": ({"job_timeout": 3}, "timeout"),
    "idle_timeout": ({"idle_timeout": 3}, "timeout"),
}


def end_kwargs(end: str, tmp: Path) -> dict[str, Any]:
    """Keyword arguments for ansible_runner.run/run_command that end the job by ``end``.

    Settings go to ``tmp/env/settings`` (``tmp`` is the private_data_dir), which both
    interfaces read.
    """
    settings, _ = ENDS[end]
    env = tmp / "env"
    env.mkdir(exist_ok=True)
    (env / "settings").write_text("".join(f"{k}: {v}\n" for k, v in {"pexpect_timeout": 1, **settings}.items()))
    return {"cancel_callback": cancel_after(3)} if end == "cancel" else {}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", list(ENDS))
def test_playbook_ended_by_runner(job_dir: JobDir, mode: str, end: str) -> None:
    # A flooding task is never idle: idle_timeout ends a quiet one.
    pdd = job_dir(QUIET_PLAYBOOK if end == "idle_timeout" else FLOOD_PLAYBOOK)
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, **end_kwargs(end, pdd))
    assert (r.status, r.rc) == (ENDS[end][1], 254)
    events = list(r.events)
    assert events and events[0]["event"] == "playbook_on_start"
    # ansible's callback writes an event token in several write() calls; the SIGTERM that
    # ends the job can interrupt ansible-playbook between them (its handler raises there),
    # so the job itself may leave one half token as its last output. Anywhere before the
    # end, a fragment would be a cut made on the host's side.
    tail = len(events) - 2
    assert_no_half_event(events[:tail])
    for e in events[tail:]:
        if "\x1b[K" in e.get("stdout", ""):
            assert e["event"] == "verbose", f"a parsed event carries a token fragment: {e}"
    if end != "idle_timeout":
        assert sum(e["event"] == "runner_item_on_ok" for e in events) > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", list(ENDS))
def test_run_command_ended_by_runner(tmp_path: Path, mode: str, end: str) -> None:
    if end == "idle_timeout":
        # A flood with no line end makes no event, so Runner sees it as idle.
        command, args = "sh", ["-c", f"yes {LINE} | tr -d '\\n'"]
    else:
        command, args = "yes", [LINE]
    _, _, rc = ansible_runner.run_command(
        executable_cmd=command,
        cmdline_args=args,
        private_data_dir=str(tmp_path),
        ident="job",
        quiet=True,
        **end_kwargs(end, tmp_path),
    )
    artifacts = tmp_path / "artifacts" / "job"
    assert ((artifacts / "status").read_text(), rc) == (ENDS[end][1], 254)
    assert_no_half_event(list(_events(artifacts)), None if end == "idle_timeout" else LINE)


# --- the spawns themselves ---------------------------------------------------------------


class SlowSink:
    """A logfile_read that takes ``delay`` seconds per write and keeps what it got."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        time.sleep(self.delay)
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.parts).replace("\r\n", "\n")


SPAWNS: dict[str, type[RunnerSpawn]] = {"pipe": RunnerSpawn, "terminal": TerminalSpawn}


#: Lines of `seq` that fit in the pipe / the terminal without a reader, so the job exits.
UNREAD_CAPACITY = {"pipe": 10000, "terminal": 2000}


@pytest.mark.matrix
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", MODES)
def test_spawn_exited_job_every_byte_at_any_sink_speed(kind: str) -> None:
    """Clause 1: all output waits after the exit; 0.1 s per 2000 characters runs far past the timeout."""
    n = UNREAD_CAPACITY[kind]
    child = SPAWNS[kind]("seq", ["1", str(n)], **RUNNER_KW)
    sink = SlowSink(0.1)
    child.logfile_read = sink
    assert child._child.has_exited(20)
    assert child.expect(pexpect.EOF, timeout=0.2) == 0
    child.close()
    assert sink.text().split() == [str(i) for i in range(1, n + 1)]
    assert len(sink.parts) > 2
    assert child.output_dropped == 0


@pytest.mark.matrix
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", MODES)
@pytest.mark.parametrize("how", ["terminate", "handle_runner_termination"])
def test_spawn_ended_by_host_cuts_at_a_line_end(kind: str, how: str) -> None:
    """Clause 2: the job is ended while a full pipe waits; EOF, not TIMEOUT, and whole lines only."""
    child = SPAWNS[kind]("yes", [LINE], **RUNNER_KW)
    sink = SlowSink(0.005)
    child.logfile_read = sink
    child.expect([pexpect.TIMEOUT], timeout=0.5)  # reads while the pipe refills behind it
    if how == "terminate":
        assert child.terminate(force=True)
    else:
        runner_spawn.handle_runner_termination(child.pid)
    assert not child.isalive()
    assert child.expect(pexpect.EOF, timeout=0) == 0
    child.close()
    text = sink.text()
    assert text.endswith("\n") and set(text.splitlines()) == {LINE}
    assert child.output_dropped > 0
    assert (child.exitstatus, child.signalstatus) == (None, 15)


@pytest.mark.matrix
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", MODES)
def test_spawn_no_timeout_once_the_end_is_ready(kind: str) -> None:
    """Clause 3: an exited child with its output and end of output waiting: timeout=0 still gives EOF."""
    child = SPAWNS[kind]("printf", ["abc\\ndef"], **RUNNER_KW)
    child.wait()
    assert child._child.has_exited(0)
    assert child.expect(pexpect.EOF, timeout=0) == 0
    assert child.before.replace("\r\n", "\n") == "abc\ndef"
    child.close()


@pytest.mark.matrix
@pytest.mark.timeout(30)
def test_spawn_no_timeout_after_the_grace_for_other_holders() -> None:
    """Clause 3, another holder: once drain_grace has passed, the end is due: EOF at timeout=0."""
    child = RunnerSpawn("sh", ["-c", "(sleep 2) & echo hi"], drain_grace=0.2, **RUNNER_KW)
    child.wait()
    time.sleep(0.3)
    assert child.expect(pexpect.EOF, timeout=0) == 0
    assert child.before == "hi\n"
    child.close()


@pytest.mark.matrix
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", MODES)
def test_spawn_running_job_timeout_between_slices(kind: str) -> None:
    """A running job's flood does not hold expect() past its timeout for more than a slice;
    what was read and not handed over is handed over by the next call, in order."""
    child = SPAWNS[kind]("seq", ["1", "100000000"], **RUNNER_KW)
    sink = SlowSink(0.05)
    child.logfile_read = sink
    calls = 0
    while len(sink.parts) < 6:
        assert child.expect([pexpect.TIMEOUT], timeout=0.01) == 0
        calls += 1
    child.close()
    assert calls >= 3, "each expect() handed over more than one slice after its timeout"
    numbers = [int(n) for n in sink.text().split("\n")[:-1]]
    assert numbers == list(range(1, len(numbers) + 1))


class FailingSink:
    """A logfile_read whose writes fail, as Runner's artifact does on a full disk."""

    def write(self, text: str) -> None:
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", MODES)
def test_spawn_sink_error_ends_the_whole_tree(kind: str) -> None:
    """A raising logfile_read ends the job (a worker in a session of its own too), then the error goes on."""
    before = procs.descendants()
    child = SPAWNS[kind]("sh", ["-c", "setsid sleep 60 & exec yes"], **RUNNER_KW)
    child.logfile_read = FailingSink()
    with pytest.raises(OSError, match="No space left"):
        child.expect(pexpect.EOF, timeout=10)
    assert not child.isalive()
    assert procs.alive(procs.descendants()).keys() <= before.keys()  # the setsid'd sleep ended too
    child.close()


@pytest.mark.timeout(60)
def test_spawn_terminate_force_ends_the_whole_tree() -> None:
    before = procs.descendants()
    child = RunnerSpawn("sh", ["-c", "setsid sleep 60 & exec sleep 60"], **RUNNER_KW)
    deadline = time.monotonic() + 30
    while len(procs.descendants().keys() - before.keys()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(procs.descendants().keys() - before.keys()) >= 2, "the job's two sleeps did not start"
    assert child.terminate(force=True)
    assert procs.alive(procs.descendants()).keys() <= before.keys()
    assert (child.exitstatus, child.signalstatus) == (None, 15)
    child.close()
