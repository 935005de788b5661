"""Activation without code changes: RUNNER_SPAWN_ACTIVATE, the start-up hook and ``runner-spawn run``.

The clients run for real and unchanged, stock and activated in the same test: the
``ansible-runner`` CLI, the streaming pipeline (transmit | worker | process),
ansible-rulebook 1.3.2 with a ``run_playbook`` action, and a program that starts
jobs from a thread pool. The proof that runner-spawn started a job is in
``/proc/PID/environ`` of the job's own processes: they carry ``RUNNER_SPAWN_JOB``
(the job marker) and never ``RUNNER_SPAWN_ACTIVATE``. A playbook task walks up from
its own shell through ansible's worker and ``ansible-playbook`` to the host process
and records each one's command line and ``RUNNER_SPAWN_*`` variables.

ansible-rulebook needs Java 17; with ``RUNNER_SPAWN_CLIENTS=required`` (set by
.ci/run) a missing Java or rulebook fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import pytest

from runner_spawn import activation
from tests import procs

HERE = Path(__file__).parent / "activation"
BIN = Path(sys.executable).parent
LOCALHOST = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
VAR = activation.VARIABLE
MARKER = "RUNNER_SPAWN_JOB"

pytestmark = pytest.mark.timeout(180)


# --- evidence from /proc ---------------------------------------------------------------------

PROBE_TASK = """\
    - name: probe
      shell: |
        p=$$
        while [ "$p" -gt 1 ]; do
          printf '%s\\t%s\\t%s\\n' "$p" "$(tr '\\0\\n' '  ' < /proc/$p/cmdline)" \\
            "$(tr '\\0' '\\n' < /proc/$p/environ | grep -E '^RUNNER_SPAWN_' | tr '\\n' ' ')" >> {out}.tmp
          p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2)
        done
        mv {out}.tmp {out}
"""


def probe_playbook(out: Path, then: str = "    - debug: msg=after-probe\n") -> str:
    """A playbook whose first task records its ancestry into ``out``, then ``then``."""
    return "- hosts: all\n  gather_facts: false\n  tasks:\n" + PROBE_TASK.format(out=out) + then


@dataclass
class Proc:
    pid: int
    cmdline: str
    variables: dict[str, str]


def read_probe(out: Path) -> tuple[list[Proc], Proc]:
    """(the job's processes, from the task's shell up to ansible-playbook; the host process)."""
    chain = []
    for line in out.read_text().splitlines():
        pid, cmdline, variables = [*line.split("\t"), "", ""][:3]
        chain.append(Proc(int(pid), cmdline, dict(v.split("=", 1) for v in variables.split())))
    top = max(i for i, p in enumerate(chain) if "ansible-playbook" in p.cmdline)
    return chain[: top + 1], chain[top + 1]


def assert_patched_job(out: Path, host_mode: str | None = "pipe") -> tuple[list[Proc], Proc]:
    """The job's processes carry the job marker and no activation variable; the host has it."""
    job, host = read_probe(out)
    assert len(job) >= 3, job  # shell, module, ..., ansible-playbook
    for p in job:
        assert MARKER in p.variables, f"job process without {MARKER}: {p}"
        assert not any(k.startswith(VAR) for k in p.variables), f"the activation reached the job: {p}"
    assert len({p.variables[MARKER] for p in job}) == 1, job
    if host_mode is not None:
        assert host.variables.get(VAR) == host_mode, host
    return job, host


def assert_stock_job(out: Path) -> None:
    job, _ = read_probe(out)
    assert len(job) >= 3 and not any(MARKER in p.variables for p in job), job


def job_events(artifact_dir: Path) -> list[tuple[str, str | None]]:
    """(event, task) of each event in ``job_events/``, in counter order."""
    events = []
    for path in (artifact_dir / "job_events").glob("*.json"):
        data = json.loads(path.read_text())
        events.append((data["counter"], data["event"], data.get("event_data", {}).get("task")))
    return [(e, t) for _, e, t in sorted(events)]


def make_pdd(root: Path, playbook: str) -> Path:
    (root / "project").mkdir(parents=True)
    (root / "inventory").mkdir()
    (root / "project" / "site.yml").write_text(playbook)
    (root / "inventory" / "hosts").write_text(LOCALHOST)
    return root


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kwargs)


def activated_env(mode: str = "pipe", **more: str) -> dict[str, str]:
    return {**os.environ, VAR: mode, **more}


def stock_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_SPAWN_")}


def wait_for(path: Path, deadline: float, proc: subprocess.Popen[Any] | None = None) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before {path} appeared")
        assert time.monotonic() < end, f"{path} did not appear in {deadline} s"
        time.sleep(0.05)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def processes_with(variable: str, value: str) -> list[int]:
    """Pids of the processes whose environment holds ``variable=value``."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry))
    return found


# --- the start-up hook -------------------------------------------------------------------------

HOOK_REPORT = """\
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger("runner_spawn").addHandler(Keep())
hook = sys.modules.get("_runner_spawn_activate")
before = {"hook": None if hook is None else hook.state, "runner_spawn": "runner_spawn" in sys.modules,
          "ansible_runner": "ansible_runner" in sys.modules, "finders": len(sys.meta_path)}
import ansible_runner.runner as r
import runner_spawn
print(json.dumps({"before": before, "after": None if hook is None else hook.state,
                  "spawn": r.pexpect.spawn.__name__, "installed": runner_spawn.is_installed(),
                  "run_wrapped": hasattr(vars(r.Runner)["run"], "__wrapped__"),
                  "loader": type(r.__loader__).__name__, "finders": len(sys.meta_path), "records": records}))
"""


def hook_report(env: dict[str, str]) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    proc = run([sys.executable, "-c", HOOK_REPORT], env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc


@pytest.mark.parametrize(("mode", "spawn"), [("pipe", "ActivatedRunnerSpawn"), ("terminal", "ActivatedTerminalSpawn")])
def test_hook_patches_on_import_of_ansible_runner_runner(mode: str, spawn: str) -> None:
    report, proc = hook_report(activated_env(mode))
    # Armed at start-up, with nothing of runner-spawn or ansible-runner imported yet...
    before = report["before"]
    assert (before["hook"], before["runner_spawn"], before["ansible_runner"]) == ("armed", False, False), report
    # ...then fired by the import: the patch is in, the hook is gone, the module's loader is its own.
    assert report["after"] == "fired" and report["installed"] and report["spawn"] == spawn, report
    assert report["run_wrapped"], report  # Runner.run ends its jobs when an exception leaves it
    assert report["finders"] == report["before"]["finders"] - 1, report
    assert report["loader"] == "SourceFileLoader", report
    assert report["records"] == [] and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("value", [None, ""])
def test_hook_stays_out_without_the_variable(value: str | None) -> None:
    env = stock_env() if value is None else {**stock_env(), VAR: value}
    report, _ = hook_report(env)
    assert report["before"]["hook"] is None and report["after"] is None
    assert not report["installed"] and report["spawn"] == "spawn", report


def test_unknown_mode_is_refused_on_stderr_and_in_the_logger() -> None:
    report, proc = hook_report(activated_env("pipes"))
    assert not report["installed"] and report["spawn"] == "spawn"
    (record,) = report["records"]
    assert "activation refused" in record and "Unknown mode 'pipes'" in record
    assert "RUNNER_SPAWN_ACTIVATE_STRICT=1 to make this fatal" in record
    assert record in proc.stderr


def test_strict_refusal_exits_78_before_the_program_goes_on() -> None:
    proc = run(
        [sys.executable, "-c", "import ansible_runner; print('went on')"],
        env=activated_env("x", **{activation.STRICT_VARIABLE: "1"}),
    )
    assert proc.returncode == activation.STRICT_EXIT == 78, proc
    assert "went on" not in proc.stdout
    assert "Unknown mode 'x'" in proc.stderr and "exiting with status 78" in proc.stderr


def test_unsupported_ansible_runner_is_refused(tmp_path: Path) -> None:
    info = tmp_path / "ansible_runner-2.2.1.dist-info"  # shadows the real metadata, first on sys.path
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ansible-runner\nVersion: 2.2.1\n")
    env = activated_env(PYTHONPATH=str(tmp_path))
    report, proc = hook_report(env)
    assert not report["installed"]
    assert "activation refused" in proc.stderr and "but 2.2.1 is installed" in proc.stderr
    strict = run([sys.executable, "-c", "import ansible_runner"], env={**env, activation.STRICT_VARIABLE: "yes"})
    assert strict.returncode == 78 and "but 2.2.1 is installed" in strict.stderr


def test_explicit_install_in_an_activated_process_keeps_one_mode() -> None:
    code = (
        "import runner_spawn; runner_spawn.install(terminal=True); "  # fires the hook: terminal, same mode
        "from ansible_runner import runner; print(runner.pexpect.spawn.__name__)\n"
        "try:\n    runner_spawn.install()\nexcept RuntimeError as e:\n    print(e)"
    )
    proc = run([sys.executable, "-c", code], env=activated_env("terminal"))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == "ActivatedTerminalSpawn"
    assert "already installed in terminal mode (by RUNNER_SPAWN_ACTIVATE=terminal)" in second


def test_runner_cli_entry_follows_the_variables_mode() -> None:
    # `runner-spawn ansible-runner` installs the patch itself; the hook got there first, in terminal mode.
    proc = run([sys.executable, "-m", "runner_spawn", "ansible-runner", "--version"], env=activated_env("terminal"))
    assert proc.returncode == 0 and proc.stderr == "", proc


def test_activated_spawn_keeps_the_variables_out_of_the_job() -> None:
    env = {"A": "1", VAR: "pipe", activation.STRICT_VARIABLE: "1"}
    assert activation.job_environment(env) == {"A": "1"}
    child = activation.ActivatedRunnerSpawn("/usr/bin/env", [], env=env, encoding="utf-8")
    try:
        child.expect(pexpect.EOF, timeout=30)
        seen = child.before.split()
    finally:
        child.close()
    assert "A=1" in seen and any(v.startswith(MARKER + "=") for v in seen)
    assert not any(v.startswith(VAR) for v in seen), seen


# --- runner-spawn run ----------------------------------------------------------------------------


def test_run_execs_the_command_with_the_variable_and_its_exit_status() -> None:
    script = 'echo "$$ ${RUNNER_SPAWN_ACTIVATE:-unset} ${RUNNER_SPAWN_ACTIVATE_STRICT:-unset}"; exit 7'
    for options, expected in (([], "pipe unset"), (["--terminal", "--strict"], "terminal 1")):
        proc = subprocess.Popen(
            [str(BIN / "runner-spawn"), "run", *options, "--", "sh", "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            env=stock_env(),
        )
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 7
        pid, rest = out.strip().split(" ", 1)
        assert int(pid) == proc.pid, "exec keeps the pid, so signals reach the command"
        assert rest == expected


def test_run_passes_signals_like_exec() -> None:
    ready = "ready"
    proc = subprocess.Popen(
        [
            str(BIN / "runner-spawn"),
            "run",
            "--",
            "sh",
            "-c",
            f"trap 'echo got-term; exit 3' TERM; echo {ready}; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == ready
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3 and "got-term" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["run"], 2, "no COMMAND given"),
        (["run", "--bogus", "x"], 2, "unknown option '--bogus'"),
        (["run", "--", "no-such-command-xyz"], 127, "no-such-command-xyz: command not found"),
        (["run", "--", "TMP/plain-file"], 126, "TMP/plain-file: cannot run it: Permission denied"),
    ],
)
def test_run_errors(args: list[str], status: int, message: str, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a program\n")
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    message = message.replace("TMP", str(tmp_path))
    proc = run([sys.executable, "-m", "runner_spawn", *args])
    assert proc.returncode == status, proc
    assert message in proc.stderr


def test_console_script_is_the_module() -> None:
    script = run([str(BIN / "runner-spawn"), "--help"])
    assert script.returncode == 0 and "runner-spawn run" in script.stdout
    assert script.stdout == run([sys.executable, "-m", "runner_spawn", "--help"]).stdout


# --- clients ------------------------------------------------------------------------------------


def test_ansible_runner_cli_stock_and_activated(tmp_path: Path) -> None:
    results = {}
    for name, prefix in (("stock", []), ("activated", [str(BIN / "runner-spawn"), "run", "--"])):
        pdd = make_pdd(tmp_path / name, probe_playbook(tmp_path / f"{name}.probe"))
        proc = run(
            [*prefix, str(BIN / "ansible-runner"), "run", str(pdd), "-p", "site.yml", "--ident", "job"], env=stock_env()
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[name] = job_events(pdd / "artifacts" / "job")
    assert_stock_job(tmp_path / "stock.probe")
    assert_patched_job(tmp_path / "activated.probe")
    assert results["activated"] == results["stock"]
    assert ("runner_on_ok", "probe") in results["stock"] and results["stock"][-1][0] == "playbook_on_stats"


def test_streaming_pipeline_only_the_worker_activated(tmp_path: Path) -> None:
    results = {}
    for name in ("stock", "activated"):
        pdd = make_pdd(tmp_path / name, probe_playbook(tmp_path / f"{name}.probe"))
        out_dir = tmp_path / f"{name}-processed"
        out_dir.mkdir()
        worker_env = activated_env() if name == "activated" else stock_env()
        transmit = subprocess.Popen(
            [str(BIN / "ansible-runner"), "transmit", str(pdd), "-p", "site.yml", "--ident", "job"],
            stdout=subprocess.PIPE,
            env=stock_env(),
        )
        # As receptor starts it for AWX: a keepalive thread runs while the worker spawns.
        worker = subprocess.Popen(
            [str(BIN / "ansible-runner"), "worker", "--keepalive-seconds", "1"],
            stdin=transmit.stdout,
            stdout=subprocess.PIPE,
            env=worker_env,
        )
        process = subprocess.Popen(
            [str(BIN / "ansible-runner"), "process", str(out_dir), "--ident", "job"],
            stdin=worker.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=stock_env(),
        )
        assert transmit.stdout is not None and worker.stdout is not None
        transmit.stdout.close()
        worker.stdout.close()
        out, _ = process.communicate(timeout=120)
        assert [worker.wait(60), transmit.wait(60), process.returncode] == [0, 0, 0], out
        results[name] = job_events(out_dir / "artifacts" / "job")
    assert_stock_job(tmp_path / "stock.probe")
    _, host = assert_patched_job(tmp_path / "activated.probe")
    assert "worker" in host.cmdline
    assert results["activated"] == results["stock"] and ("runner_on_ok", "probe") in results["stock"]


def test_thread_pool_program_under_runner_spawn_run(tmp_path: Path) -> None:
    reports = {}
    for name, prefix in (("stock", []), ("activated", [str(BIN / "runner-spawn"), "run", "--"])):
        pdds = [str(make_pdd(tmp_path / f"{name}{i}", probe_playbook(tmp_path / f"{name}{i}.probe"))) for i in range(3)]
        result = tmp_path / f"{name}.json"
        proc = subprocess.Popen([*prefix, sys.executable, str(HERE / "app.py"), str(result), *pdds], env=stock_env())
        assert proc.wait(timeout=150) == 0
        reports[name] = json.loads(result.read_text())
        assert reports[name]["pid"] == proc.pid  # runner-spawn run exec'd the program
    assert reports["stock"]["spawn"] == "pexpect.pty_spawn.spawn"
    assert reports["activated"]["spawn"] == "runner_spawn.activation.ActivatedRunnerSpawn"
    for i in range(3):
        assert_stock_job(tmp_path / f"stock{i}.probe")
        assert_patched_job(tmp_path / f"activated{i}.probe")
    strip = [{k: v for k, v in r.items() if k != "pdd"} for r in reports["stock"]["results"]]
    assert strip == [{k: v for k, v in r.items() if k != "pdd"} for r in reports["activated"]["results"]]
    assert all(r["status"] == "successful" for r in reports["activated"]["results"])


# --- ansible-rulebook ---------------------------------------------------------------------------

RULEBOOK = """\
- name: activation
  hosts: all
  sources:
    - eda.builtin.range:
        limit: 1
  rules:
    - name: run the playbook
      condition: event.i == 0
      action:
        run_playbook:
          name: site.yml
"""


@pytest.fixture
def rulebook() -> str:
    """The ansible-rulebook command, or skip (fail with RUNNER_SPAWN_CLIENTS=required)."""
    if os.environ.get("RUNNER_SPAWN_CLIENTS") == "skip":
        pytest.skip("RUNNER_SPAWN_CLIENTS=skip")
    command = shutil.which("ansible-rulebook", path=str(BIN))
    missing = [what for what, ok in (("ansible-rulebook", command), ("java", shutil.which("java"))) if not ok]
    if missing:
        message = (
            f"{' and '.join(missing)} not installed "
            "(pip install -e '.[clients]'; apt-get install openjdk-17-jre-headless)"
        )
        if os.environ.get("RUNNER_SPAWN_CLIENTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    assert command is not None
    return command


@pytest.fixture
def event_sink(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A websocket endpoint for the rulebook's event log: (url, file of received messages)."""
    out = tmp_path / "events.jsonl"
    sink = subprocess.Popen([sys.executable, str(HERE / "ws_sink.py"), str(out)])
    try:
        wait_for(out.with_suffix(".port"), 60, sink)
        yield f"ws://127.0.0.1:{out.with_suffix('.port').read_text()}/", out
    finally:
        sink.terminate()
        sink.wait(30)


def rulebook_dir(root: Path, playbook: str) -> Path:
    root.mkdir()
    (root / "rulebook.yml").write_text(RULEBOOK)
    (root / "site.yml").write_text(playbook)
    (root / "inventory.yml").write_text(
        textwrap.dedent(f"""\
            all:
              hosts:
                localhost:
                  ansible_connection: local
                  ansible_python_interpreter: {sys.executable}
            """)
    )
    return root


def playbook_events(messages: Path, since: int) -> list[tuple[str, str | None]]:
    """(event, task) of the AnsibleEvent messages after line ``since``."""
    events = []
    for line in messages.read_text().splitlines()[since:]:
        data = json.loads(line)
        if data.get("type") == "AnsibleEvent":
            event = data["event"]
            events.append((event["counter"], event["event"], event.get("event_data", {}).get("task")))
    return [(e, t) for _, e, t in sorted(events)]


@pytest.mark.timeout(420)
def test_ansible_rulebook_stock_and_activated(tmp_path: Path, rulebook: str, event_sink: tuple[str, Path]) -> None:
    url, messages = event_sink
    results = {}
    for name, env in (("stock", stock_env()), ("activated", activated_env())):
        env = {**env, "PYTHONWARNINGS": "always::DeprecationWarning"}
        root = rulebook_dir(tmp_path / name, probe_playbook(tmp_path / f"{name}.probe"))
        since = len(messages.read_text().splitlines()) if messages.exists() else 0
        proc = run(
            [rulebook, "--rulebook", "rulebook.yml", "-i", "inventory.yml", "--websocket-url", url],
            env=env,
            cwd=root,
            timeout=200,  # a JVM and a playbook; slow on a loaded 2-core machine
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Python 3.12+ warns when a threaded process forks; stock forks from the rulebook's thread pool.
        # (ansible-playbook's own worker fork warns too, in both modes: not the host's doing.)
        assert "use of forkpty() may lead to deadlocks" not in proc.stderr or name == "stock", proc.stderr
        results[name] = playbook_events(messages, since)
    assert_stock_job(tmp_path / "stock.probe")
    assert_patched_job(tmp_path / "activated.probe")
    assert results["activated"] == results["stock"]
    assert ("runner_on_ok", "probe") in results["stock"] and results["stock"][-1][0] == "playbook_on_stats"


def test_ansible_rulebook_shutdown_ends_the_running_job(tmp_path: Path, rulebook: str) -> None:
    probe = tmp_path / "probe"
    root = rulebook_dir(tmp_path / "rb", probe_playbook(probe, then="    - command: sleep 120\n"))
    proc = subprocess.Popen(
        [rulebook, "--rulebook", "rulebook.yml", "-i", "inventory.yml"],
        cwd=root,
        env=activated_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = ""
    try:
        wait_for(probe, 120, proc)
        job, _ = assert_patched_job(probe)
        marker = job[0].variables[MARKER]
        # The probe has finished: wait until `sleep 120` runs in the job (it carries the marker).
        end = time.monotonic() + 60
        while not any(b"sleep" in cmdline(pid) for pid in processes_with(MARKER, marker)):
            assert time.monotonic() < end, "the sleep task did not start"
            time.sleep(0.05)
        proc.terminate()
        assert proc.wait(timeout=90) is not None
        end = time.monotonic() + 30
        while processes_with(MARKER, marker):
            assert time.monotonic() < end, f"job processes left: {processes_with(MARKER, marker)}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = {pid: st[2] for pid in (processes_with(MARKER, marker) if marker else []) if (st := procs.stat(pid))}
        procs.kill_all(left)


# --- a real wheel in a fresh virtualenv, beside a user's own sitecustomize and .pth files ----------

USER_CHECK = """\
import builtins, json, os, sys
import ansible_runner
import ansible_runner.runner as r
import runner_spawn, user_module
result = ansible_runner.run(private_data_dir=sys.argv[1], playbook="site.yml", quiet=True) if sys.argv[1:] else None
print(json.dumps({
    "user_pth": [os.environ.get("USER_PTH_FIRST"), os.environ.get("USER_PTH_LAST")],
    "sitecustomize": getattr(builtins, "SITECUSTOMIZE_RAN", False),
    "user_module": user_module.NAME,
    "spawn": r.pexpect.spawn.__name__,
    "runner_spawn": runner_spawn.__file__,
    "status": result and result.status,
}))
"""


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with runner-spawn installed from a freshly built wheel (its dependencies from ours)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    project = Path(__file__).parent.parent
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(project / name, source / name)
    shutil.copytree(project / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(source)])
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("runner_spawn-*.whl")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ]
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    (site_packages,) = venv.glob("lib/python*/site-packages")
    # ansible-runner, pexpect...: a plain path line, so none of our environment's .pth files run there.
    (site_packages / "zz_test_dependencies.pth").write_text(sysconfig_purelib() + "\n")
    # The user's own .pth files, before and after ours, and a path entry.
    user_dir = root / "user"
    user_dir.mkdir()
    (user_dir / "user_module.py").write_text("NAME = 'user-module'\n")
    (site_packages / "aaa_user.pth").write_text("import os; os.environ['USER_PTH_FIRST'] = 'ran'\n")
    (site_packages / "zzz_user.pth").write_text(f"import os; os.environ['USER_PTH_LAST'] = 'ran'\n{user_dir}\n")
    return venv


def sysconfig_purelib() -> str:
    return sysconfig.get_paths()["purelib"]


def test_wheel_install_activates_beside_user_sitecustomize_and_pth(wheel_venv: Path, tmp_path: Path) -> None:
    assert (wheel_venv / "bin" / "runner-spawn").is_file()
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "sitecustomize.py").write_text("import builtins\nbuiltins.SITECUSTOMIZE_RAN = True\n")
    pdd = make_pdd(tmp_path / "pdd", probe_playbook(tmp_path / "probe"))
    env = {**stock_env(), "PYTHONPATH": str(custom)}
    command = [
        str(wheel_venv / "bin" / "runner-spawn"),
        "run",
        "--",
        str(wheel_venv / "bin" / "python"),
        "-c",
        USER_CHECK,
    ]
    proc = run([*command, str(pdd)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["user_pth"] == ["ran", "ran"] and report["sitecustomize"] is True
    assert report["user_module"] == "user-module"
    assert report["spawn"] == "ActivatedRunnerSpawn" and report["status"] == "successful"
    assert report["runner_spawn"].startswith(str(wheel_venv)), report
    assert_patched_job(tmp_path / "probe")
    # The same files without the variable: the user's files still run, and nothing is patched.
    proc = run([str(wheel_venv / "bin" / "python"), "-c", USER_CHECK], env=env)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["user_pth"] == ["ran", "ran"] and report["sitecustomize"] is True and report["spawn"] == "spawn"


def test_wheel_install_doctor_reports_activation(wheel_venv: Path) -> None:
    doctor = run([str(wheel_venv / "bin" / "runner-spawn"), "doctor"], env=activated_env("terminal"))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        f"hook file       {next(wheel_venv.glob('lib/python*/site-packages'))}/runner_spawn_activate.pth"
        in doctor.stdout
    )
    assert (
        "verdict         ON: Python processes of this environment install runner-spawn in terminal mode"
        in doctor.stdout
    )
    assert "patch installed in this process: yes (RUNNER_SPAWN_ACTIVATE=terminal, terminal mode)" in doctor.stdout
