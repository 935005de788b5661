"""Every way people drive ansible-runner, patched, against stock on the same machine.

Each test runs the same tiny job unpatched (stock ``pexpect.spawn`` on a terminal)
and patched (RunnerSpawn on pipes) and compares what callers see: status, rc, the
events and their order, ``stats``, the artifacts and the callbacks. Differences
by design are normalised away, and checked where they prove which path ran:

- a terminal turns ``\\n`` into ``\\r\\n``, so stock events carry ``\\r\\n`` and
  patched ones ``\\n`` only;
- ansible colours its output only on a terminal (when ``TERM`` names one with
  colours), so ANSI colour codes are removed before comparing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ansible_runner
import pexpect
import pytest
from ansible_runner.config.runner import RunnerConfig
from ansible_runner.interface import get_inventory, run_command

import runner_spawn
from runner_spawn import RunnerSpawn
from runner_spawn._container import without_tty
from runner_spawn.cli import main as cli_main
from runner_spawn.patch import runner_version as ansible_runner_version
from tests import procs
from tests.conftest import JobDir

T = TypeVar("T")

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - debug: msg=hello
    - command: echo from-command
"""

SLEEP_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 60
"""

LOCALHOST = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --- running the same thing stock and patched ---------------------------------------------


def stock_then_patched(job: Callable[[], T]) -> tuple[T, T]:
    """``job()`` without the patch, then with it installed."""
    assert not runner_spawn.is_installed()
    stock = job()
    runner_spawn.install()
    try:
        patched = job()
    finally:
        runner_spawn.uninstall()
    return stock, patched


def cli(*args: str) -> list[str]:
    """The documented CLI entry: ``python -m runner_spawn ansible-runner ARGS``."""
    return [sys.executable, "-m", "runner_spawn", "ansible-runner", *args]


def stock_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ansible_runner", *args]


class Calls:
    """Records the callbacks ansible-runner makes, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def handlers(self) -> dict[str, Any]:
        return {
            "status_handler": self.status,
            "event_handler": self.event,
            "artifacts_handler": self.artifacts,
            "finished_callback": self.finished,
        }

    def status(self, data: dict[str, Any], runner_config: Any) -> None:
        self.log.append(("status", data["status"], getattr(runner_config, "runner_mode", None)))

    def event(self, data: dict[str, Any]) -> bool:
        self.log.append(("event", data["event"], data.get("counter")))
        return True

    def artifacts(self, artifact_dir: str) -> None:
        self.log.append(("artifacts", os.path.isdir(artifact_dir)))

    def finished(self, runner: Any) -> None:
        self.log.append(("finished", runner.status))


def norm(text: str, subs: dict[str, str]) -> str:
    """``text`` without terminal artefacts (``\\r\\n``, colours) and run-specific strings."""
    text = ANSI.sub("", text.replace("\r\n", "\n"))
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def event_view(event: dict[str, Any], subs: dict[str, str]) -> tuple[Any, ...]:
    """What callers read from an event, minus uuids, pids and timestamps."""
    data = event.get("event_data", {})
    res = data.get("res") if isinstance(data.get("res"), dict) else {}
    fields = (data.get("play"), data.get("task"), data.get("host"), res.get("msg"), res.get("stdout"), res.get("rc"))
    return (
        event["event"],
        event.get("counter"),
        event.get("start_line"),
        event.get("end_line"),
        norm(event.get("stdout", ""), subs),
        *(norm(f, subs) if isinstance(f, str) else f for f in fields),
    )


def artifacts_view(artifact_dir: Path, subs: dict[str, str]) -> dict[str, Any]:
    """rc, status, stdout, job_events/ (counter, event) and the command, normalised."""
    events = []
    for path in (artifact_dir / "job_events").glob("*.json"):
        data = json.loads(path.read_text())
        events.append((int(path.name.split("-", 1)[0]), data["event"], norm(data.get("stdout", ""), subs)))
    command = json.loads((artifact_dir / "command").read_text())
    return {
        "rc": (artifact_dir / "rc").read_text(),
        "status": (artifact_dir / "status").read_text(),
        "stdout": norm((artifact_dir / "stdout").read_text(), subs),
        "job_events": sorted(events),
        "command": [norm(arg, subs) for arg in command["command"]],
        "cwd": norm(command["cwd"], subs),
    }


def runner_view(runner: Any, pdd: Path, calls: Calls, more_subs: dict[str, str] | None = None) -> dict[str, Any]:
    subs = {str(pdd): "PDD", str(runner.config.ident): "IDENT", **(more_subs or {})}
    return {
        "status": runner.status,
        "rc": runner.rc,
        "events": [event_view(e, subs) for e in runner.events],
        "stats": runner.stats,
        "artifacts": artifacts_view(Path(runner.config.artifact_dir), subs),
        "calls": calls.log,
    }


def assert_on_pipes(stdout: str) -> None:
    """The job's output went through a pipe: ``\\n`` line ends only."""
    assert "\n" in stdout and "\r" not in stdout


def assert_terminal_vs_pipes(stock_stdout: str, patched_stdout: str) -> None:
    """Stock output went through a terminal (``\\r\\n``), patched output through a pipe."""
    assert "\r\n" in stock_stdout
    assert_on_pipes(patched_stdout)


def raw_stdout(events: Any) -> str:
    return "".join(e.get("stdout", "") + "\n" for e in events)


def only_artifact_dir(pdd: Path) -> Path:
    (found,) = [p for p in (pdd / "artifacts").iterdir() if p.is_dir()]
    return found


# --- ansible_runner.run() and run_async() ---------------------------------------------------


def test_run_playbook_matches_stock(job_dir: JobDir) -> None:
    def job() -> tuple[dict[str, Any], str]:
        pdd, calls = job_dir(PLAYBOOK), Calls()
        r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, **calls.handlers())
        return runner_view(r, pdd, calls), raw_stdout(r.events)

    (stock, stock_raw), (patched, patched_raw) = stock_then_patched(job)
    assert patched["status"] == "successful" and patched["rc"] == 0
    assert patched["stats"]["ok"] == {"host0": 2} and patched["stats"]["changed"] == {"host0": 1}
    assert [c[0] for c in patched["calls"]][-2:] == ["artifacts", "finished"]
    assert patched == stock
    assert_terminal_vs_pipes(stock_raw, patched_raw)


def test_run_module_with_host_pattern_matches_stock(job_dir: JobDir) -> None:
    def job() -> tuple[dict[str, Any], str]:
        pdd, calls = job_dir("", hosts=0, extra_files={"inventory/local": LOCALHOST}), Calls()
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            module="command",
            module_args="echo hi",
            host_pattern="localhost",
            quiet=True,
            **calls.handlers(),
        )
        return runner_view(r, pdd, calls), raw_stdout(r.events)

    (stock, stock_raw), (patched, patched_raw) = stock_then_patched(job)
    assert patched["status"] == "successful" and patched["rc"] == 0
    assert any(e[0] == "runner_on_ok" and e[9] == "hi" for e in patched["events"])
    assert patched == stock
    assert_terminal_vs_pipes(stock_raw, patched_raw)


def test_run_role_from_roles_path_matches_stock(job_dir: JobDir) -> None:
    role = {"roles/hello/tasks/main.yml": "- debug: msg=from-role\n- command: echo role-command\n"}

    def job() -> tuple[dict[str, Any], str]:
        pdd, calls = job_dir("", extra_files=role), Calls()
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            role="hello",
            roles_path=str(pdd / "roles"),  # not a list: with role=, ansible-runner mangles lists
            role_skip_facts=True,
            quiet=True,
            **calls.handlers(),
        )
        return runner_view(r, pdd, calls), raw_stdout(r.events)

    (stock, stock_raw), (patched, patched_raw) = stock_then_patched(job)
    assert patched["status"] == "successful" and patched["rc"] == 0
    assert any(e[0] == "runner_on_ok" and e[8] == "from-role" for e in patched["events"])
    assert patched == stock
    assert_terminal_vs_pipes(stock_raw, patched_raw)


def test_run_async_matches_stock_run(job_dir: JobDir) -> None:
    # Stock runs synchronously: on Python 3.12+ stock pexpect.spawn in a thread warns
    # (forkpty in a multi-threaded process), which -W error turns into a failed run.
    pdd, calls = job_dir(PLAYBOOK), Calls()
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, **calls.handlers())
    stock = runner_view(r, pdd, calls)

    runner_spawn.install()
    try:
        pdd, calls = job_dir(PLAYBOOK), Calls()
        thread, r = ansible_runner.run_async(
            private_data_dir=str(pdd), playbook="site.yml", quiet=True, **calls.handlers()
        )
        thread.join(90)
        assert not thread.is_alive()
    finally:
        runner_spawn.uninstall()
    patched = runner_view(r, pdd, calls)
    assert patched["status"] == "successful"
    assert patched == stock
    assert_on_pipes(raw_stdout(r.events))


FAKE_BWRAP = """\
#!/bin/sh
# Stands in for bubblewrap (not installed here): runs the command in --chdir's directory.
[ "$1" = --version ] && { echo "bubblewrap (stand-in)"; exit 0; }
while [ "$#" -gt 0 ]; do
    if [ "$1" = --chdir ]; then cd "$2" || exit 126; shift 2; exec "$@"; fi
    shift
done
exit 127
"""


@pytest.mark.skipif(
    tuple(int(n) for n in ansible_runner_version().split(".")[:2]) < (2, 4),
    reason="ansible-runner < 2.4 fails before it starts the job (copytree into the directory it just made)",
)
def test_directory_isolation_matches_stock(job_dir: JobDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ansible-runner copies the project for directory isolation only when it sandboxes
    # the job (process_isolation with bwrap); bwrap's part here is --chdir into the copy.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bwrap").write_text(FAKE_BWRAP)
    (bin_dir / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    base = tmp_path / "isolation"
    base.mkdir()
    playbook = PLAYBOOK + '    - debug: msg="{{ playbook_dir }}"\n'

    def job() -> tuple[dict[str, Any], str, str]:
        pdd, calls = job_dir(playbook), Calls()
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            playbook="site.yml",
            process_isolation=True,
            process_isolation_executable="bwrap",
            directory_isolation_base_path=str(base),
            quiet=True,
            **calls.handlers(),
        )
        copy = [e["event_data"]["res"]["msg"] for e in r.events if e["event"] == "runner_on_ok"][-1]
        # The copy of the project the job ran in has a random name: compare it as COPY.
        return runner_view(r, pdd, calls, {copy: "COPY"}), raw_stdout(r.events), copy

    (stock, stock_raw, stock_copy), (patched, patched_raw, patched_copy) = stock_then_patched(job)
    # Each job ran in its own copy of the project under the base path, removed afterwards.
    assert stock_copy != patched_copy
    for copy in (stock_copy, patched_copy):
        assert Path(copy).parent == base and not Path(copy).exists()
    assert "--chdir" in patched["artifacts"]["command"] and "COPY" in patched["artifacts"]["command"]
    assert patched["status"] == "successful"
    assert patched == stock
    assert_terminal_vs_pipes(stock_raw, patched_raw)


# --- the command interfaces in pexpect mode ----------------------------------------------------


def test_run_command_pexpect_matches_stock(job_dir: JobDir, tmp_path: Path) -> None:
    pdd = job_dir(PLAYBOOK)
    # Not runner_mode="pexpect": CommandConfig refuses that without input_fd (ansible-runner
    # 2.3 and 2.4); for ansible-playbook pexpect is the default, which the calls record.
    out_dirs = iter(tmp_path / f"cmd{i}" for i in range(2))

    def job() -> tuple[tuple[Any, ...], list[tuple[Any, ...]], str]:
        calls, events = Calls(), []
        handlers = calls.handlers()
        handlers["event_handler"] = lambda e: events.append(e) or calls.event(e)
        out, err, rc = run_command(
            "ansible-playbook",
            [str(pdd / "project" / "site.yml"), "-i", str(pdd / "inventory")],
            private_data_dir=str(next(out_dirs)),
            quiet=True,
            **handlers,
        )
        return (norm(out, {}), err, rc), calls.log, raw_stdout(events)

    (stock, stock_calls, stock_raw), (patched, patched_calls, patched_raw) = stock_then_patched(job)
    assert patched[2] == 0 and "ok=2" in patched[0]
    assert ("status", "successful", "pexpect") in patched_calls
    assert patched == stock
    assert patched_calls == stock_calls
    assert_terminal_vs_pipes(stock_raw, patched_raw)


INVENTORY_SCRIPT = """\
#!PYTHON
import json, sys
# Whether the job has a terminal: stock ansible-inventory runs on one, patched on pipes.
hostvars = {"host0": {"on_terminal": sys.stdin.isatty()}}
print(json.dumps({"_meta": {"hostvars": hostvars}, "web": {"hosts": ["host0"], "vars": {"color": "blue"}}}))
""".replace("PYTHON", sys.executable)


def test_get_inventory_pexpect_matches_stock(tmp_path: Path) -> None:
    script = tmp_path / "inventory.py"
    script.write_text(INVENTORY_SCRIPT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def job() -> tuple[Any, Any, list[tuple[Any, ...]]]:
        calls = Calls()
        out, err = get_inventory(
            "list", [str(script)], response_format="json", runner_mode="pexpect", quiet=True, **calls.handlers()
        )
        return out, err, calls.log

    (stock, stock_err, stock_calls), (patched, patched_err, patched_calls) = stock_then_patched(job)
    assert stock["_meta"]["hostvars"]["host0"].pop("on_terminal") is True
    assert patched["_meta"]["hostvars"]["host0"].pop("on_terminal") is False
    assert patched["web"] == {"hosts": ["host0"]}
    assert patched["_meta"]["hostvars"]["host0"] == {"color": "blue"}
    assert (patched, patched_err) == (stock, stock_err)
    assert ("status", "successful", "pexpect") in patched_calls
    assert patched_calls == stock_calls


# --- streaming: transmit -> worker -> process -------------------------------------------------


def _process_stream(stream: bytes, pdd: Path) -> dict[str, Any]:
    calls, events = Calls(), []
    handlers = calls.handlers()
    handlers["event_handler"] = lambda e: events.append(e) or calls.event(e)
    p = ansible_runner.run(
        streamer="process", _input=io.BytesIO(stream), private_data_dir=str(pdd), quiet=True, **handlers
    )
    subs = {str(pdd): "PDD"}
    artifact_dir = Path(p.artifact_dir)
    (stats,) = [e["event_data"] for e in events if e["event"] == "playbook_on_stats"]
    return {
        "status": p.status,
        "rc": p.rc,
        "events": [event_view(e, subs) for e in events],
        "stats": {k: stats.get(k) for k in ("ok", "changed", "failures", "dark", "skipped", "processed")},
        "calls": calls.log,
        "artifacts": {k: v for k, v in artifacts_view(artifact_dir, subs).items() if k not in ("command", "cwd")},
        "raw": raw_stdout(events),
    }


@pytest.mark.timeout(240)  # three playbook runs and a worker subprocess
def test_streaming_pipeline_in_process_and_worker_subprocess(job_dir: JobDir, tmp_path: Path) -> None:
    pdd = job_dir(PLAYBOOK)
    with open(tmp_path / "transmit.stream", "w+b") as out:  # transmit needs a real file
        t = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", streamer="transmit", _output=out)
        assert t.status == "unstarted"
        out.seek(0)
        job = out.read()

    counter = iter(range(10))

    def worker_in_process() -> bytes:
        wdir = tmp_path / f"worker{next(counter)}"
        with open(wdir.with_suffix(".stream"), "w+b") as wout:
            w = ansible_runner.run(streamer="worker", _input=io.BytesIO(job), _output=wout, private_data_dir=str(wdir))
            assert (w.status, w.rc) == ("successful", 0)
            wout.seek(0)
            return wout.read()

    stock_stream, patched_stream = stock_then_patched(worker_in_process)
    # ansible-runner worker as a subprocess, the patch installed through the CLI entry.
    sub = subprocess.run(
        cli("worker", "--private-data-dir", str(tmp_path / "worker-sub")),
        input=job,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert sub.returncode == 0, sub.stderr.decode(errors="replace")

    stock, patched, from_subprocess = (
        _process_stream(stream, tmp_path / f"process{i}")
        for i, stream in enumerate((stock_stream, patched_stream, sub.stdout))
    )
    assert_terminal_vs_pipes(stock.pop("raw"), patched.pop("raw"))
    assert_on_pipes(from_subprocess.pop("raw"))  # the patch was active in the worker subprocess
    assert patched["status"] == "successful"
    assert patched["stats"]["ok"] == {"host0": 2}
    assert [c[0] for c in patched["calls"]][-2:] == ["artifacts", "finished"]
    assert patched == stock
    assert from_subprocess == stock


# --- the ansible-runner command line ----------------------------------------------------------


def _cli_view(result: subprocess.CompletedProcess[str], pdd: Path) -> dict[str, Any]:
    artifact_dir = only_artifact_dir(pdd)
    subs = {str(pdd): "PDD", artifact_dir.name: "IDENT"}
    events = [json.loads(p.read_text()) for p in (artifact_dir / "job_events").glob("*.json")]
    events.sort(key=lambda e: e["counter"])
    return {
        "exit": result.returncode,
        "printed": norm(result.stdout, subs),
        "events": [event_view(e, subs) for e in events],
        "artifacts": artifacts_view(artifact_dir, subs),
        "raw": raw_stdout(events),
    }


def test_cli_run_matches_stock_cli(job_dir: JobDir) -> None:
    runs = []
    for command in (stock_cli, cli):
        pdd = job_dir(PLAYBOOK)
        result = subprocess.run(
            command("run", str(pdd), "-p", "site.yml"), capture_output=True, text=True, timeout=90, check=False
        )
        runs.append(_cli_view(result, pdd))
    stock, patched = runs
    assert_terminal_vs_pipes(stock.pop("raw"), patched.pop("raw"))
    assert patched["exit"] == 0 and patched["artifacts"]["status"] == "successful"
    assert "ok=2" in patched["printed"]
    assert patched == stock


def test_cli_main_installs_patch_and_returns_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert cli_main(["--version"]) == 0
        assert runner_spawn.is_installed()
        assert capsys.readouterr().out.strip() == ansible_runner_version()
        assert cli_main([]) == 2  # argparse: a command is required
        assert "usage: ansible-runner" in capsys.readouterr().err
    finally:
        runner_spawn.uninstall()


def test_cli_main_runs_nothing_when_the_patch_cannot_be_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runner_spawn.patch, "runner_version", lambda: "2.99.0")  # a release not yet supported
    assert cli_main(["--version"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "2.99.0" in err and "Pin ansible-runner" in err
    assert err.startswith("runner-spawn supports ansible-runner") and "runner-spawn: runner-spawn" not in err
    assert not runner_spawn.is_installed()


def _wait_for(predicate: Callable[[], T], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_cli_start_daemon_keeps_patch_and_stop_ends_its_tree(job_dir: JobDir) -> None:
    pdd = job_dir(SLEEP_PLAYBOOK)
    pidfile = pdd / "pid"
    started = subprocess.run(cli("start", str(pdd), "-p", "site.yml"), capture_output=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr

    def daemon_pid() -> int:
        try:
            return int(pidfile.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    daemon = _wait_for(daemon_pid, 30)
    assert daemon, "the daemon wrote no pidfile"
    daemon_stat = procs.stat(daemon)
    assert daemon_stat is not None
    tree: dict[int, int] = {}
    try:

        def sleeping() -> bool:
            tree.update(procs.descendants(daemon))
            return any(_cmdline(pid) == b"sleep\x0060\x00" for pid in tree)

        assert _wait_for(sleeping, 60), "the job's task never started"
        # The patch lives on in the daemon: its job was started by RunnerSpawn, on pipes.
        # (The daemon's other child is its job watchdog, runner_spawn._watchdog.)
        (job,) = [
            pid
            for pid in tree
            if (procs.stat(pid) or (0, 0, 0, ""))[0] == daemon and b"_watchdog.py" not in _cmdline(pid)
        ]
        assert os.readlink(f"/proc/{job}/fd/1").startswith("pipe:")
        assert os.readlink(f"/proc/{job}/fd/0").startswith("pipe:")

        stopped = subprocess.run(cli("stop", str(pdd)), capture_output=True, timeout=60, check=False)
        assert stopped.returncode == 0, stopped.stderr
        tree[daemon] = daemon_stat[2]
        assert procs.wait_gone(tree, 15) == {}
        assert not pidfile.exists()
        artifact_dir = only_artifact_dir(pdd)
        assert (artifact_dir / "status").read_text() == "canceled"
        assert (artifact_dir / "rc").read_text() == "254"
    finally:
        tree[daemon] = daemon_stat[2]
        procs.kill_all(tree)
        # The daemon's first child (its session leader) exited and was re-parented to us.
        procs.reap_orphans({daemon_stat[1]: 0, **tree})


# --- process_isolation: the container command ------------------------------------------------------

IMAGE = "quay.io/example/ee:1"


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_container_command_built_by_runner_loses_only_tty(tmp_path: Path, engine: str) -> None:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "site.yml").write_text("- hosts: all\n")
    config = RunnerConfig(
        private_data_dir=str(tmp_path),
        playbook="site.yml",
        process_isolation=True,
        process_isolation_executable=engine,
        container_image=IMAGE,
        cmdline="-t deploy",  # ansible-playbook's own -t (--tags) must survive
        ident="job",
    )
    config.prepare()
    built = list(config.command)
    assert built[:5] == [engine, "run", "--rm", "--tty", "--interactive"]

    spawned = without_tty(built)
    image = built.index(IMAGE)
    assert spawned[: spawned.index(IMAGE)] == [
        engine,
        "run",
        "--rm",
        "--interactive",
        "--env",
        "PYTHONUNBUFFERED",
        *built[5:image],
    ]
    assert spawned[spawned.index(IMAGE) :] == built[image:]
    assert built[image + 1 : image + 4] == ["ansible-playbook", "-t", "deploy"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["docker", "--config=/auth", "run", "--rm", "-it", IMAGE], ["docker", "--config=/auth", "run", "--rm", "-i"]),
        (["/usr/bin/podman", "run", "-t", "-i", IMAGE], ["/usr/bin/podman", "run", "-i"]),
        (["podman", "run", "--rm", "-i", IMAGE, "ansible-playbook", "-t", "x"], None),
        (["podman", "exec", "--tty", "c1", "sh"], None),
        (["ansible-playbook", "-t", "x", "--tty"], None),
        (["bwrap", "--tty", "ansible-playbook"], None),
    ],
)
def test_without_tty_touches_only_a_container_runs_leading_flags(argv: list[str], expected: list[str] | None) -> None:
    result = without_tty(argv)
    if expected is None:
        assert result == argv
    else:
        assert result == [*expected, "--env", "PYTHONUNBUFFERED", IMAGE]


FAKE_ENGINE = """\
#!/bin/sh
# Stands in for a container engine: reports how it was started, then exits 0.
for arg in "$@"; do echo "ARG $arg"; done
if [ -t 0 ]; then echo "STDIN terminal"; else echo "STDIN pipe"; fi
echo "UNBUFFERED ${PYTHONUNBUFFERED:-unset}"
"""


@pytest.fixture
def fake_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``podman`` and ``docker`` on PATH that print their argv, stdin kind and env."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name in ("podman", "docker"):
        path = bin_dir / name
        path.write_text(FAKE_ENGINE)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    return bin_dir


def _engine_report(text: str) -> tuple[list[str], str, str]:
    lines = text.replace("\r\n", "\n").splitlines()
    args = [line[4:] for line in lines if line.startswith("ARG ")]
    (stdin,) = [line.split()[1] for line in lines if line.startswith("STDIN ")]
    (unbuffered,) = [line.split()[1] for line in lines if line.startswith("UNBUFFERED ")]
    return args, stdin, unbuffered


@pytest.mark.parametrize("engine", ["podman", "docker"])
def test_process_isolation_run_execs_engine_without_tty(job_dir: JobDir, fake_engines: Path, engine: str) -> None:
    def job() -> tuple[str, int, list[str], str, str]:
        pdd = job_dir(PLAYBOOK)
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            playbook="site.yml",
            process_isolation=True,
            process_isolation_executable=engine,
            container_image=IMAGE,
            ident="job",
            quiet=True,
        )
        args, stdin, unbuffered = _engine_report((Path(r.config.artifact_dir) / "stdout").read_text())
        return r.status, r.rc, [a.replace(str(pdd), "PDD") for a in args], stdin, unbuffered

    stock, patched = stock_then_patched(job)
    assert stock[:2] == patched[:2] == ("successful", 0)
    stock_args, patched_args = stock[2], patched[2]
    assert "--tty" in stock_args and stock[3] == "terminal" and stock[4] == "unset"
    # Patched: the engine runs on pipes, without --tty, and passes PYTHONUNBUFFERED
    # (set by RunnerSpawn in the engine's environment) into the container.
    assert "--tty" not in patched_args and patched[3] == "pipe" and patched[4] == "1"
    expected = list(stock_args)
    tty = expected.index("--tty")
    assert expected[tty + 1] == "--interactive"
    expected[tty : tty + 2] = ["--interactive", "--env", "PYTHONUNBUFFERED"]
    assert patched_args == expected


def test_spawn_that_gives_a_terminal_can_keep_the_flag(fake_engines: Path) -> None:
    class KeepsTty(RunnerSpawn):
        drop_container_tty = False

    argv = ["run", "--rm", "--tty", "--interactive", IMAGE, "true"]
    for cls, kept in ((RunnerSpawn, False), (KeepsTty, True)):
        child = cls("podman", argv, encoding="utf-8")
        try:
            child.expect(pexpect.EOF)
            args, _, _ = _engine_report(child.before)
            assert ("--tty" in args) is kept
            assert ("--tty" in child.args) is kept
        finally:
            child.close()


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed")
def test_docker_cli_refuses_tty_on_pipes_and_accepts_patched_command(
    job_dir: JobDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon is never reached, so no image is pulled and nothing runs: the docker CLI
    # checks the terminal before it connects.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/runner-spawn-test.sock")
    no_tty = "the input device is not a TTY"

    class KeepsTty(RunnerSpawn):
        drop_container_tty = False

    child = KeepsTty("docker", ["run", "--rm", "--tty", "--interactive", IMAGE, "true"], encoding="utf-8")
    try:
        child.expect(pexpect.EOF, timeout=60)
        assert no_tty in child.before
    finally:
        child.close()

    def job() -> tuple[str, int, str]:
        pdd = job_dir(PLAYBOOK)
        r = ansible_runner.run(
            private_data_dir=str(pdd),
            playbook="site.yml",
            process_isolation=True,
            process_isolation_executable="docker",
            container_image=IMAGE,
            quiet=True,
        )
        return r.status, r.rc, (Path(r.config.artifact_dir) / "stdout").read_text()

    stock, patched = stock_then_patched(job)
    # Both get past the terminal check and fail only for want of a daemon.
    assert no_tty not in stock[2] and no_tty not in patched[2]
    assert "Cannot connect to the Docker daemon" in patched[2]
    assert patched[:2] == stock[:2] and patched[0] == "failed"


@pytest.fixture(autouse=True)
def _unpatched() -> Iterator[None]:
    """Each test starts unpatched and must end so; the state before is restored."""
    was_installed = runner_spawn.is_installed()
    runner_spawn.uninstall()
    yield
    assert not runner_spawn.is_installed()
    if was_installed:
        runner_spawn.install()
