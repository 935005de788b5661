"""install() refuses an ansible-runner it cannot patch, says what to do, and changes nothing."""

from __future__ import annotations

import inspect
import re
import subprocess
import types
from importlib import metadata
from typing import Any

import pexpect
import pytest
from ansible_runner import runner as runner_module

import runner_spawn
from runner_spawn import patch

pytestmark = pytest.mark.matrix

ADVICE = r"Pin ansible-runner to >=2\.3,<2\.5 \(pip install 'ansible-runner>=2\.3,<2\.5'\).*do not call install\(\)"


def run_through_a_helper(self: Any) -> None:
    """A future run() that moved the spawn into another method."""
    self._start_job()
    Runner = type(self)
    Runner.handle_termination(0)


def run_through_popen(self: Any) -> None:
    """A future run() that spawns with subprocess instead of pexpect."""
    child = subprocess.Popen(self.command)
    child.logfile_read = None
    type(self).handle_termination(child.pid)


def fake_runner_module(run: Any, *, own_handle_termination: bool = True, has_pexpect: bool = True) -> types.ModuleType:
    """An ``ansible_runner.runner`` look-alike whose Runner has ``run`` (real Runner's base)."""
    body: dict[str, Any] = {"run": run}
    if own_handle_termination:
        body["handle_termination"] = classmethod(lambda cls, pid, pidfile=None: None)
    module = types.ModuleType("ansible_runner.runner")
    module.Runner = type("Runner", (runner_module.Runner,), body)  # type: ignore[attr-defined]
    if has_pexpect:
        module.pexpect = pexpect  # type: ignore[attr-defined]
    return module


def test_real_runner_passes_the_check() -> None:
    patch._check_runner_shape(runner_module)


def test_supported_versions_spawn_through_pexpect_spawn() -> None:
    """What the check relies on, read from the installed ansible-runner's source."""
    source = inspect.getsource(runner_module.Runner.run)
    assert "pexpect.spawn(" in source
    assert ".logfile_read = " in source
    assert "Runner.handle_termination(child.pid" in source
    # 2.3 passes is_cancel; 2.4 does not. The replacement accepts both (see test_compat).
    has_is_cancel = "is_cancel=" in source
    assert has_is_cancel == (patch._version_tuple(metadata.version("ansible-runner")) < (2, 4))


@pytest.mark.parametrize(
    ("module", "not_found"),
    [
        (fake_runner_module(run_through_a_helper), "logfile_read, pexpect, spawn"),
        (fake_runner_module(run_through_popen), "pexpect, spawn"),
        (fake_runner_module(runner_module.Runner.run, own_handle_termination=False), "Runner.handle_termination"),
        (fake_runner_module(runner_module.Runner.run, has_pexpect=False), "module-level pexpect"),
        (types.ModuleType("ansible_runner.runner"), "Runner.handle_termination"),
    ],
    ids=["helper", "popen", "inherited-handle_termination", "no-pexpect-module", "no-Runner"],
)
def test_check_refuses_other_shapes(module: types.ModuleType, not_found: str) -> None:
    with pytest.raises(runner_spawn.UnsupportedRunnerError) as err:
        patch._check_runner_shape(module)
    message = str(err.value)
    assert f"runner-spawn cannot patch ansible-runner {metadata.version('ansible-runner')}" in message
    assert not_found in message
    assert "bypass or break the patch" in message
    assert re.search(ADVICE, message), message


@pytest.mark.parametrize("run", [run_through_a_helper, run_through_popen])
def test_install_refuses_changed_run_and_changes_nothing(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    before = (runner_module.pexpect, vars(runner_module.Runner)["handle_termination"])
    monkeypatch.setattr(runner_module.Runner, "run", run)  # swapped in for the check only
    with pytest.raises(runner_spawn.UnsupportedRunnerError, match=ADVICE):
        runner_spawn.install()
    assert not runner_spawn.is_installed()
    assert (runner_module.pexpect, vars(runner_module.Runner)["handle_termination"]) == before
    monkeypatch.undo()
    runner_spawn.install()  # the real Runner is accepted again
    try:
        assert runner_module.pexpect.spawn is runner_spawn.RunnerSpawn
    finally:
        runner_spawn.uninstall()


@pytest.mark.parametrize("version", ["2.5.0", "2.5.0rc1", "3.0.0", "2.2.2"])
def test_install_refuses_unsupported_version(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(patch, "runner_version", lambda: version)
    with pytest.raises(runner_spawn.UnsupportedRunnerError) as err:
        runner_spawn.install()
    assert f"but {version} is installed" in str(err.value)
    assert "Pin ansible-runner to >=2.3,<2.5" in str(err.value)
    assert not runner_spawn.is_installed()
    assert runner_module.pexpect is pexpect
