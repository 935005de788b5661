"""The doctor: check that this environment can run runner-spawn, before rollout.

Prints the versions of Python, ansible-runner, ansible-core and pexpect with the
range this release supports, whether the patch is installed in this process, then
installs it and spawns ``/bin/echo`` through what ``ansible_runner.runner`` now
sees, counting Python at-fork callbacks (there must be none). Returns 0 when all
is well and 1 for an unsupported version or a failed self-test.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TextIO

import pexpect

from . import __version__, patch
from .spawn import RunnerSpawn

#: Supported range per component as ((low), (high) or None): low <= version < high.
#: ansible-runner's range is the one install() enforces.
SUPPORTED: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "Python": ((3, 9), None),
    "ansible-runner": patch.SUPPORTED_RUNNER,
    "ansible-core": ((2, 15), None),
    "pexpect": ((4, 8), (5,)),
}
#: Newest minor version of each component that the version matrix runs; newer ones
#: are reported as untested (not an error).
NEWEST_TESTED: dict[str, tuple[int, ...]] = {
    "Python": (3, 13),
    "ansible-runner": (2, 4),
    "ansible-core": (2, 21),
    "pexpect": (4, 9),
}
#: Components the doctor may find missing without failing (ansible-playbook can live
#: elsewhere, e.g. in an execution environment used with process isolation).
OPTIONAL = {"ansible-core"}

SELF_TEST_TEXT = "runner-spawn self-test"


@dataclass
class Finding:
    """One component: its version (None if absent) and the verdict on it."""

    name: str
    version: str | None
    verdict: str  # "ok", "untested", "absent" or "unsupported"
    note: str

    @property
    def failed(self) -> bool:
        return self.verdict == "unsupported"


def installed_version(name: str) -> str | None:
    """Version of ``name`` in this environment ("Python" is the interpreter), or None."""
    if name == "Python":
        return platform.python_version()
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _numbers(version: str) -> tuple[int, ...]:
    """Leading release numbers: "2.19.0rc1" -> (2, 19, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def range_text(name: str) -> str:
    low, high = SUPPORTED[name]
    text = ">=" + ".".join(map(str, low))
    return text if high is None else f"{text},<{'.'.join(map(str, high))}"


def judge(name: str, version: str | None) -> Finding:
    """The verdict on one component's version."""
    supported = f"supported: {range_text(name)}"
    if version is None:
        if name in OPTIONAL:
            return Finding(name, None, "absent", "not installed here; jobs need ansible-playbook from elsewhere")
        return Finding(name, None, "unsupported", f"not installed ({supported})")
    low, high = SUPPORTED[name]
    numbers = _numbers(version)
    if not numbers or numbers < low or (high is not None and numbers[: len(high)] >= high):
        return Finding(name, version, "unsupported", f"outside the supported range ({supported})")
    if numbers[:2] > NEWEST_TESTED[name]:
        return Finding(name, version, "untested", f"newer than tested ({supported})")
    return Finding(name, version, "ok", supported)


def check_versions(lookup: Callable[[str], str | None] = installed_version) -> list[Finding]:
    """A finding for each of Python, ansible-runner, ansible-core and pexpect."""
    return [judge(name, lookup(name)) for name in SUPPORTED]


def self_test(spawn: Callable[..., Any] | None = None) -> tuple[bool, str]:
    """Spawn ``/bin/echo`` as the patched ``Runner.run()`` would; (passed, description).

    ``spawn`` defaults to what ``ansible_runner.runner`` calls as ``pexpect.spawn``,
    which must be RunnerSpawn (call with the patch installed). Python at-fork
    callbacks during the spawn are counted with ``os.register_at_fork`` (a handler
    cannot be unregistered; it only counts) and must be zero.
    """
    from ansible_runner import runner as runner_module

    if spawn is None:
        spawn = runner_module.pexpect.spawn
        if not (isinstance(spawn, type) and issubclass(spawn, RunnerSpawn)):
            return False, f"ansible_runner.runner.pexpect.spawn is {spawn!r}, not RunnerSpawn"
    forks = [0]

    def count() -> None:
        forks[0] += 1

    os.register_at_fork(before=count)
    child = spawn("/bin/echo", [SELF_TEST_TEXT], encoding="utf-8", codec_errors="replace", echo=False)
    try:
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close()
    output = str(child.before).strip()
    detail = f"/bin/echo exit status {child.exitstatus}, output {output!r}, Python at-fork callbacks: {forks[0]}"
    return child.exitstatus == 0 and output == SELF_TEST_TEXT and forks[0] == 0, detail


def run(out: TextIO, lookup: Callable[[str], str | None] = installed_version) -> int:
    """Write the report to ``out``; return the exit status (0 ok, 1 a problem)."""
    out.write(f"runner-spawn {__version__} doctor ({sys.executable})\n")
    findings = check_versions(lookup)
    for f in findings:
        out.write(f"  {f.name:<15} {f.version or '-':<12} {f.verdict:<11} {f.note}\n")
    failed = [f.name for f in findings if f.failed]
    was_installed = patch.is_installed()
    out.write(f"patch installed in this process: {'yes' if was_installed else 'no'}\n")
    if failed:
        out.write(f"self-test: skipped (unsupported: {', '.join(failed)})\n")
    else:
        problem = _install_and_self_test(out, was_installed)
        if problem:
            failed.append(problem)
    if failed:
        out.write(f"result: FAILED ({', '.join(failed)}). Install versions in the supported ranges shown above.\n")
        return 1
    out.write("result: OK\n")
    return 0


def _install_and_self_test(out: TextIO, was_installed: bool) -> str | None:
    """install(), self-test, and put back the previous state; the failed step or None."""
    try:
        if not was_installed:  # keep an installed patch (in whichever mode) as it is
            patch.install()
    except patch.UnsupportedRunnerError as e:
        out.write(f"install(): refused: {e}\n")
        return "install()"
    out.write("install(): ok\n")
    try:
        passed, detail = self_test()
    except Exception as e:  # report any failure of the spawn itself
        passed, detail = False, f"{type(e).__name__}: {e}"
    finally:
        if not was_installed:
            patch.uninstall()
    out.write(f"self-test spawn: {'ok' if passed else 'FAILED'}: {detail}\n")
    return None if passed else "self-test"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runner_spawn doctor``."""
    parser = argparse.ArgumentParser(
        prog="python -m runner_spawn doctor",
        description="Check versions and run a self-test spawn; exit 1 on an unsupported combination.",
    )
    parser.parse_args(argv)
    return run(sys.stdout)
