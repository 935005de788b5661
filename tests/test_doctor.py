"""``python -m runner_spawn``: the doctor's report and exit status, and the dispatch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
import warnings
from importlib import metadata
from pathlib import Path

import pexpect
import pytest

import runner_spawn
from runner_spawn import __main__ as entry
from runner_spawn import doctor

pytestmark = pytest.mark.matrix


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner_spawn", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def fake_dist(root: Path, name: str, version: str) -> None:
    """Metadata for ``name`` at ``version`` in ``root``; first on sys.path, it shadows the real one."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def assert_table_aligned(report: str) -> None:
    """Every column of the version table starts at the same offset on every row."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["component"])
    header, rows = lines[start], lines[start + 1 : start + 5]
    offsets = [header.index(word) for word in ("version", "verdict", "supported", "note")]
    for row in rows:
        for offset in offsets:
            if offset < len(row):
                assert row[offset - 2 : offset] == "  " and row[offset] != " ", (offset, row, header)


@pytest.mark.parametrize("args", [[], ["doctor"]])
def test_doctor_reports_versions_and_passes(args: list[str]) -> None:
    proc = run_module(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"runner-spawn {runner_spawn.__version__} doctor" in out
    py = ".".join(map(str, sys.version_info[:3]))
    for name, version in [
        ("Python", py),
        ("ansible-runner", metadata.version("ansible-runner")),
        ("ansible-core", metadata.version("ansible-core")),
        ("pexpect", metadata.version("pexpect")),
    ]:
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[1:3] in ([version, "ok"], [version, "untested"]), line
    assert "patch installed in this process: no" in out
    assert "install(): ok" in out
    assert "self-test spawn: ok:" in out
    assert "Python at-fork callbacks: 0" in out
    assert out.rstrip().endswith("result: OK")


def test_doctor_fails_on_unsupported_runner_version(tmp_path: Path) -> None:
    fake_dist(tmp_path, "ansible-runner", "2.2.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = run_module(env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_table_aligned(proc.stdout)
    row = next(line for line in proc.stdout.splitlines() if line.split()[:1] == ["ansible-runner"])
    assert row.split()[1:4] == ["2.2.1", "unsupported", ">=2.3,<2.5"], row
    assert "self-test: skipped (unsupported: ansible-runner)" in proc.stdout
    assert "result: FAILED (ansible-runner)" in proc.stdout


def test_doctor_in_process_with_lookup() -> None:
    real = doctor.installed_version
    out = io.StringIO()
    assert doctor.run(out, lookup=lambda name: "4.7.0" if name == "pexpect" else real(name)) == 1
    row = next(line for line in out.getvalue().splitlines() if line.split()[:1] == ["pexpect"])
    assert row.split() == ["pexpect", "4.7.0", "unsupported", ">=4.8,<5", "outside", "the", "supported", "range"]
    assert_table_aligned(out.getvalue())
    assert "result: FAILED (pexpect)" in out.getvalue()

    out = io.StringIO()
    assert doctor.run(out, lookup=lambda name: None if name == "ansible-core" else real(name)) == 0
    row = next(line for line in out.getvalue().splitlines() if line.split()[:1] == ["ansible-core"])
    assert row.split()[1:4] == ["-", "absent", ">=2.15"] and "not installed here" in row
    assert_table_aligned(out.getvalue())
    assert "result: OK" in out.getvalue()
    assert not runner_spawn.is_installed()


def test_doctor_leaves_an_installed_patch_installed(patched: None) -> None:
    out = io.StringIO()
    assert doctor.run(out) == 0
    assert "patch installed in this process: yes" in out.getvalue()
    assert runner_spawn.is_installed()


@pytest.mark.parametrize(
    ("name", "version", "verdict"),
    [
        ("Python", "3.9.0", "ok"),
        ("Python", "3.8.18", "unsupported"),
        ("Python", "3.14.0", "untested"),
        ("ansible-runner", "2.3.0", "ok"),
        ("ansible-runner", "2.4.3", "ok"),
        ("ansible-runner", "2.2.2", "unsupported"),
        ("ansible-runner", "2.5.0", "unsupported"),
        ("ansible-runner", "2.5.0rc1", "unsupported"),
        ("ansible-runner", None, "unsupported"),
        ("ansible-core", "2.15.13", "ok"),
        ("ansible-core", "2.21.5", "ok"),
        ("ansible-core", "2.14.18", "unsupported"),
        ("ansible-core", "2.22.0", "untested"),
        ("ansible-core", None, "absent"),
        ("pexpect", "4.8.0", "ok"),
        ("pexpect", "5.0", "unsupported"),
        ("pexpect", "garbage", "unsupported"),
    ],
)
def test_judge(name: str, version: str | None, verdict: str) -> None:
    assert doctor.judge(name, version).verdict == verdict


def test_self_test_detects_python_at_fork_and_an_unpatched_runner() -> None:
    assert not runner_spawn.is_installed()
    passed, detail = doctor.self_test()
    assert not passed and "not RunnerSpawn" in detail
    with warnings.catch_warnings():
        # 3.12+ warns about forkpty() when the host has threads: not what is tested here.
        warnings.simplefilter("ignore", DeprecationWarning)
        passed, detail = doctor.self_test(pexpect.spawn)
    assert not passed
    assert "Python at-fork callbacks: 1" in detail


def test_unknown_command_and_help() -> None:
    proc = run_module("frobnicate")
    assert proc.returncode == 2
    assert "unknown command 'frobnicate'" in proc.stderr
    assert entry.main(["--help"]) == 0


def test_ansible_runner_command_dispatches_to_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        calls.append(args)
        return 3

    fake = types.ModuleType("runner_spawn.cli")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "runner_spawn.cli", fake)
    monkeypatch.setattr(runner_spawn, "cli", fake, raising=False)
    assert entry.main(["ansible-runner", "run", "/tmp/pdd", "-p", "site.yml"]) == 3
    assert calls == [["run", "/tmp/pdd", "-p", "site.yml"]]


def test_doctor_keeps_terminal_mode_installed() -> None:
    runner_spawn.install(terminal=True)
    try:
        out = io.StringIO()
        assert doctor.run(out) == 0, out.getvalue()
        assert "self-test spawn: ok" in out.getvalue()
        assert runner_spawn.is_installed()
    finally:
        runner_spawn.uninstall()
