"""The version matrix: runner-spawn against real ansible-runner and ansible-core releases.

    nox                      # every combination (what .ci/matrix runs)
    nox -l                   # list them
    nox -s "py3.9-runner2.3-core2.15" -- -k cancel   # one, with pytest arguments

Each session makes a fresh virtualenv on its Python, installs the project with its
``test`` extra under constraints that pin the combination, runs the doctor
(``python -m runner_spawn``, which must pass) and then the tests marked ``matrix``:
the ones that exercise the patch against real ansible (arguments after ``--``
replace ``-m matrix``). Interpreters come from pyenv (``pyenv prefix X.Y``) or
``pythonX.Y`` on PATH; a combination whose Python is missing is skipped with a
message, never downloaded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False  # a missing Python skips its sessions
nox.options.reuse_venv = "no"


@dataclass(frozen=True)
class Combo:
    """One supported combination: a Python and pip requirement specifiers."""

    python: str
    runner: str
    core: str
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        def minor(spec: str) -> str:
            """ "~=2.3.0" -> "2.3", ">=2.20" -> "2.20+"."""
            text = ".".join(re.findall(r"\d+", spec)[:2])
            return text + "+" if spec.startswith(">=") else text

        name = f"py{self.python}-runner{minor(self.runner)}-core{minor(self.core)}"
        return name + "".join(f"-{e.replace('==', '')}" for e in self.extra)

    def constraints(self) -> str:
        return "\n".join([f"ansible-runner{self.runner}", f"ansible-core{self.core}", *self.extra]) + "\n"


#: ansible-runner 2.3 calls Runner.handle_termination(pid, is_cancel=...), 2.4 without it.
#: ansible-core 2.15 is the newest for Python 3.9, 2.17 needs 3.10+, 2.18/2.19 3.11+, 2.20+ 3.12+.
#: Python 3.11 with ansible-runner 2.4 and ansible-core 2.19 is what the main test run
#: (.ci/run, the README's test command) installs on these machines, so it is not repeated here.
MATRIX = [
    Combo("3.9", "~=2.3.0", "~=2.15.0"),
    Combo("3.11", "~=2.4.0", "~=2.17.0"),
    Combo("3.12", "~=2.4.0", "~=2.18.0", extra=("pexpect==4.8.0",)),
    Combo("3.13", "~=2.4.0", ">=2.20"),
]


def find_python(version: str) -> str | None:
    """The interpreter for ``version`` (X.Y): pyenv's if it has one, else ``pythonX.Y`` on PATH."""
    if shutil.which("pyenv"):
        proc = subprocess.run(["pyenv", "prefix", version], capture_output=True, text=True, check=False)
        for prefix in proc.stdout.strip().split(":") if proc.returncode == 0 else []:
            candidate = Path(prefix) / "bin" / f"python{version}"
            if candidate.is_file():
                return str(candidate)
    return shutil.which(f"python{version}")


def make_session(combo: Combo) -> None:
    interpreter = find_python(combo.python)

    def run_combo(session: nox.Session) -> None:
        if interpreter is None:
            session.skip(
                f"Python {combo.python} not found (no pyenv prefix {combo.python}, no python{combo.python} on PATH): "
                f"combination {combo.name} not tested"
            )
        constraints = Path(session.create_tmp()) / "constraints.txt"
        constraints.write_text(combo.constraints())
        session.install("-c", str(constraints), ".[test-base]")
        session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
        session.run("python", "-m", "runner_spawn")
        tests = session.posargs or ["-m", "matrix"]
        session.run("python", "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", *tests)

    pins = ", ".join([f"ansible-runner{combo.runner}", f"ansible-core{combo.core}", *combo.extra])
    run_combo.__doc__ = f"Python {combo.python}: {pins}"
    nox.session(name=combo.name, python=interpreter or False, tags=["matrix"])(run_combo)


for _combo in MATRIX:
    make_session(_combo)
