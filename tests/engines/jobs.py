"""The jobs every engine test runs: one ansible-runner run per private_data_dir.

The test process makes each private_data_dir (:func:`make_job`); a task in a worker runs
it (:func:`run_job`). Each job's ``env/envvars`` carries ``ENGINE_TEST_JOB=<token>``, so
every process of the job, stock or patched, is found by its environment
(:func:`job_processes`), wherever the engine's processes went.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import ansible_runner
import ansible_runner.runner

TOKEN_VAR = "ENGINE_TEST_JOB"

#: 3 tasks on one host: a job that succeeds.
OK_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - debug: msg=one
    - command: "true"
    - debug: msg=three
"""

#: ``sleep 60`` on 3 localhost aliases: ansible-playbook, 3 workers, their task processes.
SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - command: sleep 60
"""

# Python-level forks in this process (os.fork, pty.fork: what Python 3.12+ warns about in
# a threaded process); posix_spawn and vfork run no at-fork callbacks.
_forks = [0]
os.register_at_fork(before=lambda: _forks.__setitem__(0, _forks[0] + 1))


class JobFailed(Exception):
    """The playbook run did not succeed (a task raises it so the engine records a failure)."""


def make_job(root: Path, token: str, playbook: str, hosts: int = 1) -> Path:
    """A private_data_dir under ``root`` whose job carries ``token`` in its environment."""
    pdd = root / token
    (pdd / "project").mkdir(parents=True)
    (pdd / "inventory").mkdir()
    (pdd / "env").mkdir()
    (pdd / "project" / "site.yml").write_text(textwrap.dedent(playbook))
    lines = [
        f"host{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}"
        for i in range(hosts)
    ]
    (pdd / "inventory" / "hosts").write_text("\n".join(lines) + "\n")
    (pdd / "env" / "envvars").write_text(f"{TOKEN_VAR}: {token}\n")
    return pdd


def spawn_name() -> str:
    """The class ``ansible_runner.runner`` calls as ``pexpect.spawn`` in this process now."""
    cls = ansible_runner.runner.pexpect.spawn
    return "pexpect.spawn" if cls.__module__.startswith("pexpect") else cls.__name__


def run_job(pdd: str, cancel_file: str | None = None) -> dict[str, Any]:
    """Run ``site.yml`` of ``pdd``; raise :class:`JobFailed` unless it succeeded.

    With ``cancel_file``, the job is cancelled (``cancel_callback``) once that file exists.
    """
    kwargs: dict[str, Any] = {}
    if cancel_file is not None:
        kwargs["cancel_callback"] = lambda: os.path.exists(cancel_file)
    spawn = spawn_name()
    forks = _forks[0]
    r = ansible_runner.run(
        private_data_dir=pdd, playbook="site.yml", quiet=True, settings={"pexpect_timeout": 0.5}, **kwargs
    )
    if r.status != "successful":
        raise JobFailed(f"playbook {r.status}, rc {r.rc}")
    events = [e["event"] for e in r.events]
    return {
        "status": r.status,
        "rc": r.rc,
        "events": events,
        "spawn": spawn,
        "forks": _forks[0] - forks,
        "pid": os.getpid(),
    }


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def job_processes(token: str) -> dict[int, int]:
    """{pid: start time} of every live process whose environment carries ``token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and needle in _read(f"/proc/{name}/environ").split(b"\0"):
            stat = _read(f"/proc/{name}/stat")
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 19 and fields[0] != b"Z":
                found[int(name)] = int(fields[19])
    return found
