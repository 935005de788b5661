"""Real ansible-runner jobs through the patch: the behaviour Runner.run() relies on."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ansible_runner
import pexpect
import pytest

from tests.conftest import JobDir

# Also run by every session of the version matrix (noxfile.py).
pytestmark = pytest.mark.matrix

OK_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      command: echo hello-from-task
    - name: show
      debug:
        msg: finished
"""


def stdout_of(runner: ansible_runner.Runner) -> str:
    return (Path(runner.config.artifact_dir) / "stdout").read_bytes().decode()


def events(runner: ansible_runner.Runner) -> list[str]:
    return [e["event"] for e in runner.events]


@pytest.mark.usefixtures("patched")
def test_successful_playbook(job_dir: JobDir) -> None:
    pdd = job_dir(OK_PLAYBOOK)
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
    assert (r.status, r.rc) == ("successful", 0)
    names = events(r)
    assert names[0] == "playbook_on_start" and names[-1] == "playbook_on_stats"
    assert names.count("runner_on_ok") == 2
    counters = [e["counter"] for e in r.events]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    stdout = stdout_of(r)
    assert "TASK [say hello]" in stdout and "PLAY RECAP" in stdout
    assert "\r\n" not in stdout
    artifacts = Path(r.config.artifact_dir)
    assert (artifacts / "rc").read_text() == "0"
    assert len(list((artifacts / "job_events").glob("*.json"))) == len(names)
    assert r.stats["ok"] == {"host0": 2}


@pytest.mark.usefixtures("patched")
def test_failing_task(job_dir: JobDir) -> None:
    pdd = job_dir("""
        - hosts: all
          gather_facts: false
          tasks:
            - command: /bin/false
    """)
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
    assert (r.status, r.rc) == ("failed", 2)
    assert "runner_on_failed" in events(r)
    assert events(r)[-1] == "playbook_on_stats"


# A become plugin that records the become password it was given, so the test can see
# that the answer to the -K prompt reached ansible.
RECORDING_BECOME = '''
import os

from ansible.plugins.become import BecomeBase

DOCUMENTATION = """
name: recordpass
short_description: records the become password (test only)
description: records the become password (test only)
options:
  become_pass:
    description: the password
    vars:
      - name: ansible_become_password
"""


class BecomeModule(BecomeBase):
    name = "recordpass"

    def build_become_command(self, cmd, shell):
        super().build_become_command(cmd, shell)
        with open(os.environ["RECORD_BECOME_PASS"], "w") as f:
            f.write(self.get_option("become_pass") or "")
        return self._build_success_command(cmd, shell)
'''


@pytest.mark.usefixtures("patched")
def test_become_password_prompt_answered(job_dir: JobDir, tmp_path: Path) -> None:
    record = tmp_path / "become-pass"
    pdd = job_dir(
        """
        - hosts: all
          gather_facts: false
          become: true
          become_method: recordpass
          tasks:
            - command: echo under-become
        """,
        extra_files={"project/become_plugins/recordpass.py": RECORDING_BECOME},
    )
    r = ansible_runner.run(
        private_data_dir=str(pdd),
        playbook="site.yml",
        cmdline="-K",
        envvars={"RECORD_BECOME_PASS": str(record)},
        passwords={r"^BECOME password.*:\s*?$": "s3cr3t-answer"},
        quiet=True,
    )
    assert "BECOME password" in stdout_of(r)
    assert (r.status, r.rc) == ("successful", 0)
    assert record.read_text() == "s3cr3t-answer"


@pytest.mark.usefixtures("patched")
def test_vault_password_prompt_answered(job_dir: JobDir) -> None:
    pdd = job_dir("""
        - hosts: all
          gather_facts: false
          tasks:
            - debug:
                msg: "vault ok"
    """)
    r = ansible_runner.run(
        private_data_dir=str(pdd),
        playbook="site.yml",
        cmdline="--ask-vault-pass",
        passwords={r"^Vault password:\s*?$": "vault-pw"},
        quiet=True,
    )
    assert (r.status, r.rc) == ("successful", 0)
    assert "Vault password" in stdout_of(r)


@pytest.mark.usefixtures("patched")
def test_missing_binary_rc_127(job_dir: JobDir) -> None:
    pdd = job_dir(OK_PLAYBOOK)
    r = ansible_runner.run(
        private_data_dir=str(pdd), playbook="site.yml", binary="no-such-ansible-playbook", quiet=True
    )
    assert (r.status, r.rc) == ("failed", 127)
    assert "The command was not found or was not executable: no-such-ansible-playbook" in stdout_of(r)


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("patched")
def test_eight_playbooks_from_asyncio_worker_threads(job_dir: JobDir) -> None:
    dirs = [job_dir(OK_PLAYBOOK) for _ in range(8)]

    async def main() -> list[ansible_runner.Runner]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=8) as pool:
            jobs = [
                loop.run_in_executor(
                    pool, lambda d=d: ansible_runner.run(private_data_dir=str(d), playbook="site.yml", quiet=True)
                )
                for d in dirs
            ]
            return list(await asyncio.gather(*jobs))

    runners = asyncio.run(main())
    assert [(r.status, r.rc) for r in runners] == [("successful", 0)] * 8
    assert all(events(r)[-1] == "playbook_on_stats" for r in runners)


def _count_at_fork_calls(job_dir: JobDir) -> int:
    calls: list[int] = []
    os.register_at_fork(before=lambda: calls.append(1))
    pdd = job_dir(OK_PLAYBOOK)
    before = len(calls)
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
    assert r.status == "successful"
    return len(calls) - before


def test_no_python_at_fork_callback_when_patched(job_dir: JobDir, patched: None) -> None:
    assert _count_at_fork_calls(job_dir) == 0


def test_at_fork_callback_fires_when_unpatched(job_dir: JobDir) -> None:
    assert _count_at_fork_calls(job_dir) >= 1


@pytest.mark.usefixtures("patched")
def test_event_data_identical_to_artifacts(job_dir: JobDir) -> None:
    pdd = job_dir(OK_PLAYBOOK)
    r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
    on_disk = sorted(
        (json.loads(p.read_text()) for p in (Path(r.config.artifact_dir) / "job_events").glob("*.json")),
        key=lambda e: e["counter"],
    )
    assert [e["uuid"] for e in on_disk] == [e["uuid"] for e in r.events]


def test_runner_spawn_is_what_runner_uses(patched: None) -> None:
    import ansible_runner.runner as runner_module

    from runner_spawn import RunnerSpawn

    assert runner_module.pexpect.spawn is RunnerSpawn
    assert pexpect.spawn is not RunnerSpawn
