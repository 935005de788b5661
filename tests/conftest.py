"""Shared fixtures: real ansible-runner jobs against localhost, and process hygiene."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import runner_spawn
from runner_spawn import _watchdog_client
from tests import procs

BIN_DIR = os.path.dirname(sys.executable)


def pytest_configure(config: pytest.Config) -> None:
    # ansible-playbook must come from the interpreter running the tests.
    if BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    procs.become_subreaper()
    # This process's job watchdog (started by the first job otherwise) exists before any
    # test, so tests that compare processes and fds before and after see it on both sides.
    _watchdog_client.ensure_started()


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a process running; kill (by pid) what it left."""
    before = procs.descendants()
    yield
    new = {p: s for p, s in procs.descendants().items() if p not in before}
    left = procs.wait_gone(new, 30.0)  # generous on a busy machine; returns as soon as all are gone
    procs.kill_all(left)
    assert not left, f"test left processes running: {sorted(left)}"


@pytest.fixture
def patched() -> Iterator[None]:
    """runner_spawn installed for the test, uninstalled after."""
    runner_spawn.install()
    try:
        yield
    finally:
        runner_spawn.uninstall()


JobDir = Callable[..., Path]


@pytest.fixture
def job_dir(tmp_path: Path) -> JobDir:
    """Factory: a private_data_dir with ``project/site.yml`` and a local inventory."""
    counter = [0]

    def make(playbook: str, hosts: int = 1, extra_files: dict[str, str] | None = None) -> Path:
        counter[0] += 1
        pdd = tmp_path / f"job{counter[0]}"
        (pdd / "project").mkdir(parents=True)
        (pdd / "inventory").mkdir()
        (pdd / "project" / "site.yml").write_text(textwrap.dedent(playbook))
        lines = [
            f"host{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}"
            for i in range(hosts)
        ]
        (pdd / "inventory" / "hosts").write_text("\n".join(lines) + "\n")
        for name, text in (extra_files or {}).items():
            path = pdd / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return pdd

    return make
