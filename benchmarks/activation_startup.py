"""Start-up cost of runner-spawn's activation hook for a Python process that never imports ansible-runner.

Run::

    python benchmarks/activation_startup.py --runs 300

Two measurements, each with RUNNER_SPAWN_ACTIVATE unset and set to ``pipe``:

1. Wall clock of ``python -c pass`` (this interpreter, this environment, where
   ``runner_spawn_activate.pth`` is installed), started by ``posix_spawn`` and
   waited for. The two settings take turns, so load from other processes hits
   them alike. This is what a user sees, with the noise of starting a process.
2. The hook alone: a fresh ``python -S`` (no site processing) puts site-packages
   and the hook module's directory on ``sys.path``, then times
   ``site.addpackage()`` of ``runner_spawn_activate.pth``: reading the file,
   running its line and, when the variable is set, importing the hook module and
   arming it. Precise to a microsecond.

The hook's bytecode is compiled first if missing (a wheel install has it; an
editable install under PYTHONDONTWRITEBYTECODE would compile it in every process).
Prints medians, means and the difference and ratio of set against unset.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import py_compile
import statistics
import sys
import time
from pathlib import Path

from runner_spawn import activation

HOOK_TIMER = """\
import sys, time
sys.path[:0] = sys.argv[2:]
import site
t0 = time.perf_counter()
site.addpackage(sys.argv[1], "runner_spawn_activate.pth", set())
t1 = time.perf_counter()
armed = "_runner_spawn_activate" in sys.modules
print(t1 - t0, armed, "runner_spawn" in sys.modules)
"""


def wall_clock(env: dict[str, str]) -> float:
    """Seconds from posix_spawn of ``python -c pass`` to its exit."""
    t0 = time.perf_counter()
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], env)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"python -c pass failed: status {status}")
    return elapsed


def hook_alone(env: dict[str, str], site_dir: str, hook_dir: str) -> tuple[float, bool]:
    """(seconds to process the .pth, whether the hook module got imported) in a fresh ``python -S``."""
    read, write = os.pipe()
    argv = [sys.executable, "-S", "-c", HOOK_TIMER, site_dir, site_dir, hook_dir]
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, write, 1)])
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read().split()
    os.waitpid(pid, 0)
    seconds, armed, runner_spawn = float(out[0]), out[1] == "True", out[2] == "True"
    if runner_spawn:
        raise SystemExit("the hook imported runner_spawn at start-up: it must wait for ansible_runner.runner")
    return seconds, armed


def summary(name: str, unset: list[float], set_: list[float]) -> None:
    def ms(values: list[float], how: str) -> float:
        return 1000 * (statistics.median(values) if how == "median" else statistics.fmean(values))

    print(f"{name} ({len(unset)} runs each)")
    for how in ("median", "mean"):
        a, b = ms(unset, how), ms(set_, how)
        print(f"  {how:<6}  unset {a:8.3f} ms   set {b:8.3f} ms   difference {b - a:+7.3f} ms   ratio {b / a:6.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300, help="runs per setting (default 300)")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    pth = activation.hook_file()
    spec = importlib.util.find_spec(activation.HOOK_MODULE)
    if pth is None or spec is None or spec.origin is None:
        parser.error(f"{activation.PTH_NAME} or {activation.HOOK_MODULE} is not installed in this environment")
    hook_dir = str(Path(spec.origin).parent)
    # A wheel install compiles the hook (pip does); an editable one compiles it on first
    # use unless PYTHONDONTWRITEBYTECODE is set. Measure the installed case.
    cached = importlib.util.cache_from_source(spec.origin)
    if not os.path.exists(cached):
        py_compile.compile(spec.origin, cfile=cached, doraise=True)
    unset_env = {k: v for k, v in os.environ.items() if not k.startswith(activation.VARIABLE)}
    set_env = {**unset_env, activation.VARIABLE: "pipe"}
    print(f"python {sys.version.split()[0]} ({sys.executable}); hook {pth}")

    walls: dict[str, list[float]] = {"unset": [], "set": []}
    hooks: dict[str, list[float]] = {"unset": [], "set": []}
    for _ in range(args.runs):
        for name, env in (("unset", unset_env), ("set", set_env)):
            walls[name].append(wall_clock(env))
            seconds, armed = hook_alone(env, str(pth.parent), hook_dir)
            if armed != (name == "set"):
                raise SystemExit(f"hook armed={armed} with the variable {name}")
            hooks[name].append(seconds)
    summary("python -c pass, wall clock", walls["unset"], walls["set"])
    summary("runner_spawn_activate.pth alone (site.addpackage)", hooks["unset"], hooks["set"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
