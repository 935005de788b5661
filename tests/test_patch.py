"""install()/uninstall()/is_installed(): idempotent, thread-safe, scoped, reversible."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import ansible_runner
import ansible_runner.runner as runner_module
import pexpect
import pytest

import runner_spawn
from runner_spawn import RunnerSpawn
from tests.conftest import JobDir


def originals() -> tuple[object, object, object, object]:
    runner = vars(runner_module.Runner)
    return runner_module.pexpect, runner["handle_termination"], pexpect.spawn, runner["run"]


def test_install_uninstall_round_trip() -> None:
    before = originals()
    assert not runner_spawn.is_installed()
    runner_spawn.install()
    try:
        assert runner_spawn.is_installed()
        assert runner_module.pexpect.spawn is RunnerSpawn
        assert runner_module.pexpect.EOF is pexpect.EOF and runner_module.pexpect.TIMEOUT is pexpect.TIMEOUT
        assert runner_module.pexpect.exceptions is pexpect.exceptions
        assert vars(runner_module.Runner)["handle_termination"] is not before[1]
        assert pexpect.spawn is before[2], "the process-wide pexpect.spawn must stay the original"
        patched = originals()
        runner_spawn.install()  # idempotent: nothing changes
        assert originals() == patched
    finally:
        runner_spawn.uninstall()
    assert originals() == before
    assert not runner_spawn.is_installed()
    runner_spawn.uninstall()  # idempotent
    assert originals() == before


@pytest.mark.parametrize("terminal", [False, True])
def test_install_wraps_runner_run_once_and_uninstall_restores_it(terminal: bool) -> None:
    stock_run = vars(runner_module.Runner)["run"]
    runner_spawn.install(terminal=terminal)
    try:
        wrapped = vars(runner_module.Runner)["run"]
        assert wrapped is not stock_run
        assert wrapped.__wrapped__ is stock_run
        assert wrapped.__name__ == "run"
        runner_spawn.install(terminal=terminal)  # again: the same wrapper, not a wrapper of it
        assert vars(runner_module.Runner)["run"] is wrapped
    finally:
        runner_spawn.uninstall()
    assert vars(runner_module.Runner)["run"] is stock_run
    runner_spawn.uninstall()
    assert vars(runner_module.Runner)["run"] is stock_run


def test_concurrent_install_and_uninstall() -> None:
    before = originals()
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(50):
                runner_spawn.install() if i % 2 else runner_spawn.uninstall()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Whatever order they ran in, the state is one of the two consistent ones.
    if runner_spawn.is_installed():
        assert runner_module.pexpect.spawn is RunnerSpawn
        runner_spawn.uninstall()
    assert originals() == before


def test_install_is_safe_from_many_threads_at_once() -> None:
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        runner_spawn.install()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert runner_module.pexpect.spawn is RunnerSpawn
        view = runner_module.pexpect
        runner_spawn.uninstall()
        assert runner_module.pexpect is pexpect
        runner_spawn.install()
        assert type(runner_module.pexpect) is type(view)
    finally:
        runner_spawn.uninstall()


def test_install_after_runner_objects_exist(job_dir: JobDir) -> None:
    calls: list[int] = []
    pdd = job_dir("""
        - hosts: all
          gather_facts: false
          tasks:
            - debug: msg=hi
    """)
    r = ansible_runner.interface.init_runner(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
    import os

    os.register_at_fork(before=lambda: calls.append(1))
    runner_spawn.install()
    try:
        r.run()
    finally:
        runner_spawn.uninstall()
    assert (r.status, r.rc) == ("successful", 0)
    assert calls == []


def test_install_before_importing_ansible_runner(tmp_path: pytest.TempPathFactory) -> None:
    code = textwrap.dedent("""
        import sys
        import runner_spawn
        assert "ansible_runner" not in sys.modules
        runner_spawn.install()
        import ansible_runner.runner
        assert ansible_runner.runner.pexpect.spawn is runner_spawn.RunnerSpawn
        import pexpect
        assert pexpect.spawn is not runner_spawn.RunnerSpawn
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_version_guard_names_range_and_version() -> None:
    from runner_spawn import patch

    with pytest.raises(runner_spawn.UnsupportedRunnerError, match=r">=2\.3,<2\.5.*2\.5\.0 is installed"):
        patch.check_runner_version("2.5.0")
    with pytest.raises(runner_spawn.UnsupportedRunnerError, match=r"2\.2\.1"):
        patch.check_runner_version("2.2.1")
    patch.check_runner_version("2.3.6")
    patch.check_runner_version("2.4.3")
