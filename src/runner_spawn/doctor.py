"""The doctor: check that this environment can run runner-spawn, before rollout.

Prints the versions of Python, ansible-runner, ansible-core and pexpect with the
range this release supports, whether this environment activates runner-spawn by
itself (RUNNER_SPAWN_ACTIVATE and the start-up hook, :mod:`runner_spawn.activation`)
and in which mode, whether the patch is installed in this process, then
installs it and spawns ``/bin/echo`` through what ``ansible_runner.runner`` now
sees, counting Python at-fork callbacks (there must be none). Returns 0 when all
is well and 1 for an unsupported version, a requested activation that does not
work, or a failed self-test.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TextIO

import pexpect

from . import __version__, activation, patch
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
    if version is None:
        if name in OPTIONAL:
            return Finding(name, None, "absent", "not installed here; jobs need ansible-playbook from elsewhere")
        return Finding(name, None, "unsupported", "not installed")
    low, high = SUPPORTED[name]
    numbers = _numbers(version)
    if not numbers or numbers < low or (high is not None and numbers[: len(high)] >= high):
        return Finding(name, version, "unsupported", "outside the supported range")
    if numbers[:2] > NEWEST_TESTED[name]:
        return Finding(name, version, "untested", "newer than the versions tested")
    return Finding(name, version, "ok", "")


def version_table(findings: Sequence[Finding]) -> list[str]:
    """The findings as aligned columns (component, version, verdict, supported, note), with a header."""
    rows = [("component", "version", "verdict", "supported", "note")]
    rows += [(f.name, f.version or "-", f.verdict, range_text(f.name), f.note) for f in findings]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows]


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
    for line in version_table(findings):
        out.write(line.rstrip() + "\n")
    unsupported = [f.name for f in findings if f.failed]
    failed = list(unsupported)
    if not report_activation(out):
        failed.append("activation")
    was_installed = patch.is_installed()
    installed_by = patch.installed_by()
    how = f" ({installed_by[0]}, {'terminal' if installed_by[1] else 'pipe'} mode)" if installed_by else ""
    out.write(f"patch installed in this process: {'yes' if was_installed else 'no'}{how}\n")
    if unsupported:
        out.write(f"self-test: skipped (unsupported: {', '.join(unsupported)})\n")
    else:
        problem = _install_and_self_test(out, was_installed)
        if problem:
            failed.append(problem)
    if failed:
        advice = []
        if unsupported:
            advice.append("Install versions in the supported ranges shown above.")
        if "activation" in failed:
            advice.append("Fix the activation as its verdict says.")
        out.write(f"result: FAILED ({', '.join(failed)}). {' '.join(advice)}".rstrip() + "\n")
        return 1
    out.write("result: OK\n")
    return 0


def report_activation(out: TextIO) -> bool:
    """Report whether this environment activates runner-spawn by itself; False on a problem.

    When RUNNER_SPAWN_ACTIVATE is set, the start-up hook must be armed in this very
    process; the doctor then imports ``ansible_runner.runner``, which must install the
    patch in the mode asked for (the strict switch is held off meanwhile, so a refusal
    is reported here rather than ending the doctor).
    """
    hook = activation.hook_file()
    importable = importlib.util.find_spec(activation.HOOK_MODULE) is not None
    value = activation.requested()
    out.write("activation:\n")
    out.write(f"  hook file       {hook if hook else f'{activation.PTH_NAME} missing from site-packages'}\n")
    out.write(f"  hook module     {activation.HOOK_MODULE}: {'importable' if importable else 'NOT importable'}\n")
    out.write(
        f"  variable        {activation.VARIABLE}={value}\n"
        if value
        else f"  variable        {activation.VARIABLE} unset\n"
    )
    strict = os.environ.get(activation.STRICT_VARIABLE)
    shown = f"{activation.STRICT_VARIABLE}={strict}" if strict is not None else f"{activation.STRICT_VARIABLE} unset"
    out.write(f"  strict          {'on' if activation.is_strict() else 'off'} ({shown})\n")
    installable = hook is not None and importable
    if value is None:
        tail = "" if installable else f" (and could not: reinstall runner-spawn to get {activation.PTH_NAME})"
        out.write(
            f"  verdict         off: {activation.VARIABLE} is unset, so processes here are not activated{tail}; "
            f"set it to pipe or terminal, or start programs with `runner-spawn run -- COMMAND`\n"
        )
        return True
    try:
        terminal = activation.parse_mode(value)
    except activation.ActivationError as e:
        out.write(f"  verdict         REFUSED: {e}\n")
        return False
    mode = "terminal" if terminal else "pipe"
    if not installable:
        out.write(f"  verdict         NOT ACTIVE: reinstall runner-spawn to get {activation.PTH_NAME} and its hook\n")
        return False
    state = activation.hook_state()
    if state == "armed":
        strict = os.environ.pop(activation.STRICT_VARIABLE, None)
        try:
            importlib.import_module("ansible_runner.runner")  # fires the hook
        except Exception as e:  # report a broken ansible-runner as a finding
            out.write(f"  verdict         NOT ACTIVE: importing ansible_runner.runner failed: {e!r}\n")
            return False
        finally:
            if strict is not None:
                os.environ[activation.STRICT_VARIABLE] = strict
        state = activation.hook_state()
    installed_by = patch.installed_by()
    if state == "fired" and installed_by == (f"{activation.VARIABLE}={value}", terminal):
        out.write(
            f"  verdict         ON: Python processes of this environment install runner-spawn in {mode} mode "
            "when they import ansible_runner.runner (checked in this process)\n"
        )
        return True
    why = {
        "not loaded": "the start-up hook did not run in this process (python -S, or a site-packages not read?)",
        "fired": "the hook ran but the patch was refused (see stderr)",
    }.get(state, f"hook state {state!r}")
    out.write(f"  verdict         NOT ACTIVE in {mode} mode: {why}\n")
    return False


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
