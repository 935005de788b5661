"""The patch against the real ansible-runner and ansible-core of this environment.

Every test here runs in each session of the version matrix (noxfile.py): a playbook,
cancel and timeout through the replaced ``Runner.handle_termination`` (ansible-runner
2.3 calls it with ``is_cancel=``, 2.4 without), and, on Python 3.12+, a run from a
worker thread of a threaded host under ``-W error::DeprecationWarning``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import ansible_runner
import pytest

from runner_spawn import patch
from tests.conftest import JobDir

pytestmark = pytest.mark.matrix

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      command: echo hello-from-task
"""

# Each host's task leaves a mark once it runs: a cancel after both marks finds every
# process of the job started (none is being forked at that moment). A task that was not
# ended leaves a second mark when its sleep is over.
SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: sleep
      shell: "touch MARKS/{{ inventory_hostname }} && sleep 30 && touch MARKS/../finished-{{ inventory_hostname }}"
"""

FORKPTY_WARNING = "use of forkpty() may lead to deadlocks in the child"


@pytest.fixture
def terminations(monkeypatch: pytest.MonkeyPatch, patched: None) -> list[dict[str, Any]]:
    """Calls that reached the replacement of Runner.handle_termination, with their arguments."""
    calls: list[dict[str, Any]] = []
    real = patch.handle_runner_termination

    def spy(pid: int, pidfile: str | None = None, is_cancel: bool = True) -> None:
        calls.append({"pid": pid, "pidfile": pidfile, "is_cancel": is_cancel})
        real(pid, pidfile=pidfile, is_cancel=is_cancel)

    monkeypatch.setattr(patch, "handle_runner_termination", spy)
    return calls


@pytest.mark.usefixtures("patched")
def test_playbook(job_dir: JobDir) -> None:
    r = ansible_runner.run(private_data_dir=str(job_dir(PLAYBOOK, hosts=2)), playbook="site.yml", quiet=True)
    assert (r.status, r.rc) == ("successful", 0)
    names = [e["event"] for e in r.events]
    assert names[0] == "playbook_on_start" and names[-1] == "playbook_on_stats"
    assert names.count("runner_on_ok") == 2
    assert r.stats["ok"] == {"host0": 1, "host1": 1}
    artifacts = Path(r.config.artifact_dir)
    assert (artifacts / "status").read_text() == "successful"
    assert "TASK [say hello]" in (artifacts / "stdout").read_text()


def run_sleep_job(job_dir: JobDir, marks: Path, **kwargs: Any) -> ansible_runner.Runner:
    marks.mkdir()
    r = ansible_runner.run(
        private_data_dir=str(job_dir(SLEEP_PLAYBOOK.replace("MARKS", str(marks)), hosts=2)),
        playbook="site.yml",
        quiet=True,
        settings={"pexpect_timeout": 0.2},
        **kwargs,
    )
    # The tasks were ended: none got to the end of its sleep.
    assert sorted(p.name for p in marks.parent.glob("finished-*")) == []
    return r


def test_cancel(job_dir: JobDir, tmp_path: Path, terminations: list[dict[str, Any]]) -> None:
    marks = tmp_path / "marks"
    r = run_sleep_job(job_dir, marks, cancel_callback=lambda: len(list(marks.iterdir())) == 2)
    assert (r.status, r.rc) == ("canceled", 254)
    assert len(terminations) == 1
    assert terminations[0]["is_cancel"] is True
    # the autouse fixture checks that no process of the job is left


def test_job_timeout(job_dir: JobDir, tmp_path: Path, terminations: list[dict[str, Any]]) -> None:
    marks = tmp_path / "marks"

    def until_tasks_run(event: dict[str, Any]) -> bool:
        # Runner checks the timeout between events: hold it until every task runs.
        deadline = time.monotonic() + 90
        while event.get("event") == "runner_on_start" and len(list(marks.iterdir())) < 2:
            assert time.monotonic() < deadline, "tasks did not start"
            time.sleep(0.05)
        return True

    r = run_sleep_job(job_dir, marks, timeout=3, event_handler=until_tasks_run)
    assert (r.status, r.rc) == ("timeout", 254)
    assert len(terminations) == 1
    runner_minor = patch._version_tuple(patch.runner_version())
    # ansible-runner 2.3 says is_cancel=False for a timeout; 2.4 passes nothing (default True).
    assert terminations[0]["is_cancel"] is (runner_minor >= (2, 4))


THREADED_HOST = textwrap.dedent(
    """
    import sys, threading
    import ansible_runner, runner_spawn

    if sys.argv[2] == "patched":
        runner_spawn.install()
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="service-thread").start()  # a host with threads
    result = []

    def job():
        r = ansible_runner.run(private_data_dir=sys.argv[1], playbook="site.yml", quiet=True)
        result.append((r.status, r.rc))

    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    stop.set()
    print(result)
    """
)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python < 3.12 does not warn about forkpty() with threads")
@pytest.mark.parametrize("mode", ["patched", "stock"])
def test_threaded_host_no_forkpty_warning(job_dir: JobDir, mode: str) -> None:
    pdd = job_dir(PLAYBOOK)
    # Patched: any DeprecationWarning in the host is an error. Stock: shown, to prove it happens.
    action = "error" if mode == "patched" else "always"
    proc = subprocess.run(
        [sys.executable, "-W", f"{action}::DeprecationWarning", "-c", THREADED_HOST, str(pdd), mode],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[('successful', 0)]", proc.stderr
    if mode == "patched":
        assert "forkpty" not in proc.stderr
    else:
        assert FORKPTY_WARNING in proc.stderr
