"""Fault injection: real ansible-runner jobs under faults and hostile hosts, stock against patched.

Usage::

    python benchmarks/faults.py                 # the README table, about 10 minutes on 2 cores
    python benchmarks/faults.py --quick         # smaller sizes and fewer jobs, a few minutes
    python benchmarks/faults.py --only emfile,sigchld --json out.json

Every fault runs in a fresh host process (``--host``), once with stock ansible-runner and
once with ``runner_spawn.install()``: small localhost playbooks (``connection: local``)
or ``run_command()``. A host is a child subreaper, so whatever its jobs start stays its
descendant; it reports what is left (then SIGKILLs exactly those pids), and its open fds
and threads against a baseline taken after a warm-up job. A host that does not finish
in time is reported as hung and ended here (its process group, which this script made;
then this script's own descendants, by pid: this script is a subreaper too).

tests/test_faults.py runs the same hosts, patched, and asserts on their reports.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from proctree import alive, become_subreaper, descendants, kill_exact, open_fds  # noqa: E402

MiB = 1 << 20

# --- playbooks -------------------------------------------------------------------------

PB_OK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      command: echo hello
"""
PB_FAIL = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: say hello
      command: echo hello
    - name: fail
      fail:
        msg: failing on purpose
"""
# Which spawn ran the job: runner-spawn marks every job's environment (RUNNER_SPAWN_JOB).
PB_MARK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: pause
      command: sleep {seconds}
    - name: which spawn
      debug:
        msg: "spawn-marker={{{{ lookup('env', 'RUNNER_SPAWN_JOB') or 'none' }}}}"
"""
PB_SLEEP = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: sleep
      command: sleep 60
"""
# Loop items report one by one, so the job writes artifacts as it goes.
PB_LOOP = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: loop
      command: sleep 0.2
      loop: "{{ range(200) | list }}"
"""


def make_job(root: Path, playbook: str, hosts: int = 1) -> Path:
    """A private_data_dir with project/site.yml and a local inventory of ``hosts`` hosts."""
    pdd = Path(tempfile.mkdtemp(prefix="job-", dir=root))
    (pdd / "project").mkdir()
    (pdd / "inventory").mkdir()
    (pdd / "project" / "site.yml").write_text(playbook)
    lines = [
        f"host{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}"
        for i in range(hosts)
    ]
    (pdd / "inventory" / "hosts").write_text("\n".join(lines) + "\n")
    return pdd


# --- processes, fds, memory (Linux /proc) ----------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _is_helper(pid: int) -> bool:
    """runner-spawn's own per-host helper (the job watchdog), not a job's process."""
    return "runner_spawn" in _cmdline(pid) and "_watchdog" in _cmdline(pid)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


class Baseline:
    """Processes, fds and threads of the host now; what a fault left behind, later."""

    def __init__(self) -> None:
        self.procs = descendants()
        self.fds = open_fds()
        self.threads = threading.active_count()

    def new_procs(self) -> dict[int, int]:
        return {p: s for p, s in descendants().items() if p not in self.procs and not _is_helper(p)}

    def left(self, wait: float = 3.0, kill: bool = True) -> list[str]:
        """Command lines of new processes still running after ``wait`` s; then SIGKILLs them."""
        new = self.new_procs()
        deadline = time.monotonic() + wait
        while alive(new) and time.monotonic() < deadline:
            time.sleep(0.05)
        still = alive(new)
        names = [_cmdline(p)[:80] for p in sorted(still)]
        if kill:
            kill_exact(new)
        return names

    def deltas(self) -> dict[str, int]:
        gc.collect()
        deadline = time.monotonic() + 3
        while threading.active_count() > self.threads and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"fd_delta": len(open_fds()) - len(self.fds), "thread_delta": threading.active_count() - self.threads}


# --- running jobs ------------------------------------------------------------------------


def run_playbook(root: Path, playbook: str, hosts: int = 1, **kwargs: Any) -> dict[str, Any]:
    """One ansible_runner.run(); its outcome as a dict (or the exception it raised)."""
    import ansible_runner

    pdd = make_job(root, playbook, hosts)
    started = time.monotonic()
    try:
        r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, **kwargs)
    except Exception as e:
        return {"raised": f"{type(e).__name__}: {e}", "s": round(time.monotonic() - started, 2)}
    out = {"status": r.status, "rc": r.rc, "s": round(time.monotonic() - started, 2)}
    with contextlib.suppress(Exception):
        out["events"] = len(list(r.events))
    with contextlib.suppress(OSError):
        out["stdout"] = Path(r.config.artifact_dir, "stdout").read_text(errors="replace")
    return out


def command_runner(argv: list[str], root: Path, **kwargs: Any) -> Any:
    """The Runner that run_command(argv) runs (pexpect mode, its default for any command)."""
    from ansible_runner.interface import init_command_config

    return init_command_config(
        argv[0], cmdline_args=argv[1:], private_data_dir=str(make_job(root, PB_OK)), quiet=True, **kwargs
    )


def in_thread(fn: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
    """``fn()`` in a daemon thread; {"hung": timeout} if it has not returned by then."""
    box: list[dict[str, Any]] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            box.append({"raised": f"{type(e).__name__}: {e}"})

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else {"hung": timeout}


def summary(out: dict[str, Any]) -> str:
    """A run's outcome in a few words."""
    if "hung" in out:
        return f"hung (> {out['hung']:g} s)"
    if "raised" in out:
        text = out["raised"]
        return "raises " + (text if len(text) <= 80 else text[:77] + "...")
    return f"{out['status']} rc {out['rc']}"


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _install(mode: str) -> None:
    if mode == "patched":
        import runner_spawn

        runner_spawn.install()


def _warm(root: Path) -> None:
    """One job first: imports, lazily started helpers, caches; baselines come after it."""
    out = run_playbook(root, PB_OK)
    if out.get("status") != "successful":
        raise RuntimeError(f"warm-up job: {summary(out)}")


# --- the faults (each runs in a host process) --------------------------------------------


def fault_emfile(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """The soft RLIMIT_NOFILE leaves ``extra`` free fds when a job starts; then it is restored."""
    _install(mode)
    _warm(root)
    base = Baseline()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    runs = []
    for extra in p.get("extras", range(8)):
        before = open_fds()
        free = [n for n in range(hard) if n not in before]
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[extra], hard))
        try:
            out = run_playbook(root, PB_OK)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gc.collect()
        out["extra"] = extra
        out["fd_delta"] = len(open_fds()) - len(before)
        text = out.pop("stdout", "")
        out["last_line"] = (text.strip().splitlines() or [""])[-1][:120]
        out["emfile_in_output"] = "Too many open files" in text
        runs.append(out)
    # An inheritable fd above the lowered limit (posix_spawn cannot close it there).
    high = os.open(os.devnull, os.O_RDONLY)
    os.dup2(high, 1000, inheritable=True)
    os.close(high)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        high_fd = run_playbook(root, PB_OK)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(1000)
    high_fd.pop("stdout", None)
    after = run_playbook(root, PB_OK)
    after.pop("stdout", None)
    return {"runs": runs, "high_fd": high_fd, "after": after, **base.deltas(), "left": base.left()}


def fault_sigchld(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """The host ignores SIGCHLD ("ign"), or a host thread reaps any child ("reaper")."""
    _install(mode)
    _warm(root)
    base = Baseline()
    warnings = WarningCounter()
    logging.getLogger("runner_spawn").addHandler(warnings)
    reaped: list[int] = []
    if p["fault"] == "ign":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    else:

        def reaper() -> None:
            while True:
                try:
                    reaped.append(os.waitpid(-1, 0)[0])
                except ChildProcessError:
                    time.sleep(0.005)

        threading.Thread(target=reaper, name="hostile-reaper", daemon=True).start()
    runs = []
    for playbook, expect in ((PB_OK, 0), (PB_FAIL, 2)):
        out = in_thread(lambda pb=playbook: run_playbook(root, pb), p.get("hang_after", 60))
        out.pop("stdout", None)
        out["expected_rc"] = expect
        runs.append(out)
        if "hung" in out:
            break
    return {
        "runs": runs,
        "unknown_status_warnings": sum("exit status is unknown" in m for m in warnings.messages),
        "reaped_by_host_thread": len(reaped),
        "left": base.left(),
    }


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; None, or why it cannot be done here."""
    path.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as e:
        return f"mount: {e}"
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip() or proc.returncode}"


def _fill(path: Path) -> None:
    """Write to a file in ``path`` until the filesystem is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return
                block = block[: len(block) // 2]
    finally:
        os.close(fd)


# A run_command job whose output never stops, with a process that moved into a session of
# its own (as ansible-core 2.19+ workers do).
ESCAPING_COMMAND = (
    "setsid sleep 60 & i=0; while :; do i=$((i+1)); echo \"line $i $(printf '%0100d' 0)\"; sleep 0.01; done"
)


def fault_full_fs(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """The artifact directory's filesystem fills up while the job runs.

    "playbook": 3 hosts loop over a short command; the filesystem is filled at the first
    item result. ansible's own callback (in the job) then fails to write its event files
    and the playbook stalls; Runner's idle_timeout ends it. "command": run_command() of a
    job that prints without end and has a process in a session of its own; Runner's write
    of the stdout artifact fails and Runner.run() raises while the job runs.
    """
    import ansible_runner

    _install(mode)
    _warm(root)
    base = Baseline()
    mnt = root / "full"
    why = _mount_tmpfs(mnt, p.get("size", "1m"))
    if why is not None:
        return {"skipped": why}
    filled: list[float] = []

    def fill_once(event: dict[str, Any]) -> bool:
        if not filled and event.get("event") in ("runner_item_on_ok", "verbose"):
            _fill(mnt)
            filled.append(time.monotonic())
        return True

    out: dict[str, Any] = {}
    try:
        started = time.monotonic()
        exc: BaseException | None = None
        try:
            if p["kind"] == "playbook":
                pdd = make_job(root, PB_LOOP, hosts=3)
                idle, runner = p.get("idle_timeout", 3), []

                def fill_then_count_idle(event: dict[str, Any]) -> bool:
                    fill_once(event)
                    # Runner reads idle_timeout on every turn of its loop: it counts from the
                    # fill on, so a start that is quiet for long on a busy machine is no end.
                    if filled and runner and not runner[0].config.idle_timeout:
                        runner[0].config.idle_timeout = idle
                    return True

                r = ansible_runner.interface.init_runner(
                    private_data_dir=str(pdd),
                    playbook="site.yml",
                    quiet=True,
                    artifact_dir=str(mnt),
                    event_handler=fill_then_count_idle,
                    settings={"pexpect_timeout": 0.2},
                )
                runner.append(r)
                r.run()
            else:
                r = command_runner(
                    ["sh", "-c", ESCAPING_COMMAND],
                    root,
                    artifact_dir=str(mnt),
                    event_handler=fill_once,
                    settings={"pexpect_timeout": 0.2},
                    timeout=p.get("job_timeout", 30),
                )
                r.run()
            out["status"], out["rc"] = r.status, r.rc
        except Exception as e:
            exc = e
            out["raised"] = f"{type(e).__name__}: {e}"
        out["s"] = round(time.monotonic() - started, 2)
        out["s_after_fill"] = round(time.monotonic() - filled[0], 2) if filled else None
        # What runs while the caller still holds the exception (a Future, a log record)
        # once the ended processes had time to go (stock leaves them running: 5 s)...
        deadline = time.monotonic() + 5
        while alive(base.new_procs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        out["running_while_error_held"] = [_cmdline(q)[:80] for q in sorted(alive(base.new_procs()))]
        # ... and once it has let go of it.
        del exc
        gc.collect()
        out["left"] = base.left()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)
    return out


def fault_big_output(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """run_command() of a job writing one long line ("line") or many short ones ("lines")."""
    _install(mode)
    size = int(p["mb"] * MiB)
    if p["kind"] == "line":
        cmd = ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x" + ("; echo" if p.get("newline") else "")]
    else:
        line = b"y" * (p["line_len"] - 1) + b"\n"
        data = root / "lines.txt"
        with open(data, "wb") as f:
            for _ in range(size // len(line)):
                f.write(line)
        size = data.stat().st_size
        cmd = ["cat", str(data)]

    def run(args: list[str]) -> Any:
        r = command_runner(args, root)
        r.run()
        return r

    run(["echo", "warm-up"])
    base = Baseline()
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset_peak_rss()
    started = time.monotonic()
    r = run(cmd)
    seconds = time.monotonic() - started
    growth_mb = (_status_kb("VmHWM") - rss_before) / 1024
    stdout = Path(r.config.artifact_dir, "stdout").read_bytes().replace(b"\r\n", b"\n")
    if p["kind"] == "line":
        in_stdout = stdout.count(b"x")
        in_events = 0
        for f in Path(r.config.artifact_dir, "job_events").glob("*.json"):
            with open(f, encoding="utf-8") as fh:
                in_events += json.load(fh).get("stdout", "").count("x")
        complete_stdout = in_stdout == size
        complete_events = in_events == size
    else:
        complete_stdout = stdout == data.read_bytes()
        in_stdout = len(stdout)
        complete_events = None
    return {
        "status": r.status,
        "rc": r.rc,
        "bytes": size,
        "stdout_bytes": in_stdout,
        "complete_in_stdout": complete_stdout,
        "complete_in_events": complete_events,
        "rss_growth_mb": round(growth_mb, 1),
        "s": round(seconds, 2),
        "left": base.left(),
    }


def _jobs_outcome(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "statuses": sorted({summary(x) for x in results}),
        "events": sorted({x.get("events", -1) for x in results}),
        "ok": sum(x.get("status") == "successful" for x in results),
        "jobs": len(results),
    }


def fault_async_host(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """A gevent host (monkey.patch_all() before install) or an asyncio host under uvloop.

    ``how``: "greenlets" (gevent.pool), "executor" (loop.run_in_executor), "aio"
    (runner_spawn.aio.run). The parent bounds the whole host: a hang is reported by it.
    """
    import asyncio

    if p["host"] == "gevent":
        from gevent import monkey

        if not monkey.is_module_patched("os"):
            raise RuntimeError("the gevent host must start with monkey.patch_all()")
    _install(mode)
    jobs = p.get("jobs", 8)
    _warm(root)
    base = Baseline()

    def one(i: int) -> dict[str, Any]:
        out = run_playbook(root, PB_OK)
        out.pop("stdout", None)
        return out

    async def via_executor() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, one, i) for i in range(jobs))))

    async def via_aio() -> list[dict[str, Any]]:
        from runner_spawn import aio

        async def job() -> dict[str, Any]:
            r = await aio.run(private_data_dir=str(make_job(root, PB_OK)), playbook="site.yml", quiet=True)
            return {"status": r.status, "rc": r.rc, "events": len(list(r.events))}

        return list(await asyncio.gather(*(job() for _ in range(jobs))))

    started = time.monotonic()
    if p["how"] == "greenlets":
        import gevent.pool

        results = list(gevent.pool.Pool(jobs).map(one, range(jobs)))
    else:
        main = via_executor if p["how"] == "executor" else via_aio
        if p["host"] == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
            try:
                results = loop.run_until_complete(main())
            finally:
                loop.close()
        else:
            results = asyncio.run(main())
    return {**_jobs_outcome(results), "s": round(time.monotonic() - started, 2), "left": base.left()}


def fault_concurrent(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """``jobs`` ansible_runner.run() calls at once from a thread pool."""
    _install(mode)
    _warm(root)
    base = Baseline()
    jobs = p.get("jobs", 32)
    started = time.monotonic()
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda _: run_playbook(root, PB_OK), range(jobs)))
    s = round(time.monotonic() - started, 2)
    for x in results:
        x.pop("stdout", None)
    return {**_jobs_outcome(results), "s": s, **base.deltas(), "left": base.left()}


def fault_cancel_storm(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """``jobs`` jobs (2 hosts, ``sleep 60``) at once, each cancelled ``after`` s in.

    ``when``: "start" cancels ``after`` s after the jobs start (many are still starting);
    "running" waits, as well, until the job's tasks run on both hosts (the workers exist).
    """
    _install(mode)
    _warm(root)
    base = Baseline()
    jobs, after, hosts = p.get("jobs", 20), p.get("after", 2.0), 2
    not_before = time.monotonic() + after
    returned: list[float] = []

    def job(i: int) -> dict[str, Any]:
        marks = root / f"marks{i}"
        marks.mkdir()
        cancelled_at: list[float] = []

        def cancel() -> bool:
            if not cancelled_at:
                now = time.monotonic()
                if now < not_before or (p.get("when") == "running" and len(os.listdir(marks)) < hosts):
                    return False
                cancelled_at.append(now)
            return True

        playbook = PB_SLEEP.replace(
            "command: sleep 60", f'shell: "touch {marks}/{{{{ inventory_hostname }}}} && exec sleep 60"'
        )
        out = run_playbook(root, playbook, hosts=hosts, cancel_callback=cancel, settings={"pexpect_timeout": 0.2})
        if cancelled_at:
            returned.append(time.monotonic() - cancelled_at[0])
        out.pop("stdout", None)
        return out

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(job, range(jobs)))
    running = len(alive(base.new_procs()))
    return {
        **_jobs_outcome(results),
        "return_s_median": round(statistics.median(returned), 2) if returned else None,
        "return_s_max": round(max(returned), 2) if returned else None,
        "running_at_return": running,
        "left": base.left(),
    }


def fault_install_race(mode: str, p: dict[str, Any], root: Path) -> dict[str, Any]:
    """install() from 8 threads while 4 jobs start; then uninstall() while a job runs."""
    import runner_spawn

    del mode  # both columns are the same run: this fault is about installing
    runner_spawn.install()
    _warm(root)  # starts what runner-spawn starts once per host
    runner_spawn.uninstall()
    _warm(root)
    base = Baseline()

    def marker(out: dict[str, Any]) -> str:
        text = out.pop("stdout", "")
        return "runner-spawn" if "spawn-marker=" in text and "spawn-marker=none" not in text else "stock"

    barrier = threading.Barrier(12)
    errors: list[str] = []

    def installer() -> None:
        barrier.wait()
        try:
            runner_spawn.install()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    def starter(_: int) -> dict[str, Any]:
        barrier.wait()
        out = run_playbook(root, PB_MARK.format(seconds=0))
        out["spawn"] = marker(out)
        return out

    with ThreadPoolExecutor(12) as pool:
        installs = [pool.submit(installer) for _ in range(8)]
        racing = list(pool.map(starter, range(4)))
        for f in installs:
            f.result()
    installed = runner_spawn.is_installed()

    # uninstall() while a patched job runs.
    running = threading.Event()

    def status_handler(data: dict[str, Any], runner_config: Any = None) -> None:
        if data.get("status") == "running":
            running.set()

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(run_playbook, root, PB_MARK.format(seconds=3), 1, status_handler=status_handler)
        running.wait(30)
        time.sleep(0.5)
        runner_spawn.uninstall()
        during = fut.result()
    during["spawn"] = marker(during)
    later = run_playbook(root, PB_MARK.format(seconds=0))
    later["spawn"] = marker(later)
    return {
        "install_errors": errors,
        "installed": installed,
        "racing": racing,
        "during_uninstall": during,
        "later": later,
        **base.deltas(),
        "left": base.left(),
    }


FAULTS: dict[str, Callable[[str, dict[str, Any], Path], dict[str, Any]]] = {
    "emfile": fault_emfile,
    "sigchld": fault_sigchld,
    "full_fs": fault_full_fs,
    "big_output": fault_big_output,
    "async_host": fault_async_host,
    "concurrent": fault_concurrent,
    "cancel_storm": fault_cancel_storm,
    "install_race": fault_install_race,
}


def host_main(name: str, mode: str, params: dict[str, Any]) -> None:
    """Run one fault in this (fresh) process and print its report as JSON; never returns."""
    become_subreaper()
    status = 0
    with tempfile.TemporaryDirectory(prefix="rs-fault-") as tmp:
        try:
            report = FAULTS[name](mode, params, Path(tmp))
        except Exception as e:
            report = {"error": f"{type(e).__name__}: {e}"}
            status = 1
        finally:
            leftover = {q: s for q, s in descendants().items() if not _is_helper(q)}
            kill_exact(leftover)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    os._exit(status)  # a hung job's thread must not keep the host alive


# --- the parent side ------------------------------------------------------------------------

GEVENT_PRELUDE = "from gevent import monkey; monkey.patch_all()\n"


def run_host(name: str, mode: str, params: dict[str, Any] | None = None, timeout: float = 240) -> dict[str, Any]:
    """One fault in a fresh host process; its report, or {"hung": timeout} if it did not finish.

    A hung host's process group (made here) is killed, then any process it left that
    re-parented to this process (when this process is a subreaper) is killed by pid.
    """
    params = dict(params or {})
    prelude = GEVENT_PRELUDE if params.get("host") == "gevent" else ""
    code = prelude + textwrap.dedent(
        f"""\
        import json, sys
        sys.path.insert(0, {str(HERE.parent)!r})
        import faults
        faults.host_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
        """
    )
    before = descendants()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, name, mode, json.dumps(params)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kill_exact({q: s for q, s in descendants().items() if q not in before})
        return {"hung": timeout}
    lines = out.strip().splitlines()
    if not lines:
        return {"error": f"host exited {proc.returncode} with no report: {err.strip()[-1500:]}"}
    report: dict[str, Any] = json.loads(lines[-1])
    if proc.returncode != 0 and "error" in report:
        report["error"] += " | " + err.strip()[-1500:]
    return report


def module_available(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


# --- the table -------------------------------------------------------------------------------


def _ranges(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> str:
    """Group consecutive runs (by free fds) with the same outcome: "1-2 free: ..."."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(runs) + 1):
        if i == len(runs) or key(runs[i]) != key(runs[start]):
            a, b = runs[start]["extra"], runs[i - 1]["extra"]
            parts.append(f"{a}{'' if a == b else f'-{b}'} free: {key(runs[start])}")
            start = i
    return "; ".join(parts)


def _left(report: dict[str, Any]) -> str:
    n = len(report.get("left", []))
    return "nothing left" if n == 0 else f"**{n} processes left**"


def cell(name: str, report: dict[str, Any]) -> str:
    if "hung" in report:
        return f"**hangs** (host ended after {report['hung']:g} s)"
    if "error" in report:
        return "error: " + report["error"][:200]
    if "skipped" in report:
        return "skipped: " + report["skipped"]
    if name == "emfile":

        def outcome(run: dict[str, Any]) -> str:
            text = summary(run).split(":")[0] if "raised" in run else summary(run)
            if "Too many open files" in run.get("raised", ""):
                text += " (EMFILE)"
            elif "raised" in run:
                text += f" ({run['raised'].split(': ', 1)[-1][:40]})"
            if run.get("rc") == 127:
                text += ", the message in stdout"
            elif run.get("emfile_in_output"):
                text += " (the job's task hit EMFILE)"
            if run["fd_delta"]:
                text += f", **{run['fd_delta']} fds leaked**"
            return text.replace("Too many open files", "EMFILE")

        return (
            _ranges(report["runs"], outcome)
            + f"; inheritable fd above the limit: {summary(report['high_fd'])}"
            + f"; next run: {summary(report['after'])}; fds {report['fd_delta']:+d}; {_left(report)}"
        )
    if name == "sigchld":
        runs = "; ".join(f"rc {r['expected_rc']} job: {summary(r)}" for r in report["runs"])
        return f"{runs}; {_left(report)}"
    if name == "full_fs":
        what = summary(report)
        held = len(report["running_while_error_held"])
        return (
            f"{what} ({report['s_after_fill']} s after the fill); "
            f"{held} job processes running 1 s later; {_left(report)} after the error is dropped"
        )
    if name == "big_output":
        where = "stdout artifact" if report["complete_in_stdout"] else "job_events only"
        if not report["complete_in_stdout"] and not report["complete_in_events"]:
            where = f"**{report['stdout_bytes']:,} of {report['bytes']:,} bytes**"
        return f"{summary(report)}, {report['s']} s, peak RSS +{report['rss_growth_mb']:.0f} MB, all bytes in {where}"
    if name in ("async_host", "concurrent"):
        text = f"{report['ok']}/{report['jobs']} {'/'.join(report['statuses'])}, events {report['events']}"
        if "fd_delta" in report:
            text += f", fds {report['fd_delta']:+d}, threads {report['thread_delta']:+d}"
        return f"{text}, {report['s']} s; {_left(report)}"
    if name == "cancel_storm":
        return (
            f"{report['ok']}/{report['jobs']} ok, {'/'.join(report['statuses'])}; returned "
            f"{report['return_s_median']} s (max {report['return_s_max']} s) after the cancel; "
            f"{report['running_at_return']} processes running at return; {_left(report)}"
        )
    if name == "install_race":
        racing = report["racing"]
        spawns = {s: sum(r["spawn"] == s for r in racing) for s in ("runner-spawn", "stock")}
        return (
            f"install() x8: {len(report['install_errors'])} errors, installed={report['installed']}; "
            f"racing jobs {'/'.join(sorted({summary(r) for r in racing}))} "
            f"({spawns['runner-spawn']} runner-spawn, {spawns['stock']} stock); "
            f"job running at uninstall(): {summary(report['during_uninstall'])} "
            f"({report['during_uninstall']['spawn']}); next job: {report['later']['spawn']}; {_left(report)}"
        )
    return json.dumps(report)[:200]


def plan(quick: bool) -> list[tuple[str, str, dict[str, Any], float]]:
    """(row label, fault, params, host timeout)."""
    big, lines, jobs32, storm = (8, 8, 8, 6) if quick else (64, 50, 32, 20)
    rows: list[tuple[str, str, dict[str, Any], float]] = [
        ("RLIMIT_NOFILE: N fds free when the job starts", "emfile", {"extras": list(range(7))}, 240),
        ("host ignores SIGCHLD", "sigchld", {"fault": "ign", "hang_after": 30}, 120),
        ("host thread loops on os.waitpid(-1, 0)", "sigchld", {"fault": "reaper", "hang_after": 30}, 120),
        ("artifact fs full: playbook (3 hosts, idle_timeout 3)", "full_fs", {"kind": "playbook"}, 120),
        ("artifact fs full: run_command, job runs on", "full_fs", {"kind": "command"}, 120),
        (f"{big} MB line, no newline", "big_output", {"kind": "line", "mb": big}, 600),
        (f"{big} MB line, then a newline", "big_output", {"kind": "line", "mb": big, "newline": True}, 600),
        (f"{lines} MB of 2000-byte lines", "big_output", {"kind": "lines", "mb": lines, "line_len": 2000}, 600),
    ]
    if module_available("gevent"):
        for how in ("greenlets", "executor", "aio"):
            rows.append((f"gevent host, 8 jobs via {how}", "async_host", {"host": "gevent", "how": how}, 60))
    if module_available("uvloop"):
        for how in ("executor", "aio"):
            rows.append((f"uvloop host, 8 jobs via {how}", "async_host", {"host": "uvloop", "how": how}, 150))
    rows += [
        (f"{jobs32} concurrent ansible_runner.run() (thread pool)", "concurrent", {"jobs": jobs32}, 400),
        (f"cancel storm: {storm} jobs cancelled 2 s in", "cancel_storm", {"jobs": storm, "after": 2.0}, 300),
        (
            f"cancel storm: {storm} jobs cancelled 2 s in, once their tasks run",
            "cancel_storm",
            {"jobs": storm, "after": 2.0, "when": "running"},
            300,
        ),
        ("install() x8 racing job starts; uninstall() mid-job", "install_race", {}, 180),
    ]
    return rows


def host_dies_row(quick: bool) -> str:
    """The host SIGKILLed mid-playbook (3 hosts, ``sleep 60``), by benchmarks/host_death.py."""
    label = "host SIGKILLed mid-playbook (3 hosts, `sleep 60`)"
    try:
        sys.path.insert(0, str(HERE.parent))
        import host_death  # type: ignore[import-not-found]

        run = host_death.host_death
    except (ImportError, AttributeError):
        return f"| {label} | pending (benchmarks/host_death.py) | pending |"
    cells = []
    with tempfile.TemporaryDirectory(prefix="rs-fault-") as tmp:
        for mode in ("stock", "patched"):
            try:
                d = run(mode, Path(tmp), 3.0 if quick else 10.0)
            except Exception as e:
                cells.append(f"error: {type(e).__name__}: {e}")
                continue
            gone = (
                f"all gone after {d.gone_after:.2f} s"
                if d.gone_after is not None
                else (f"**{len(d.left_at_end)} still running at the end**")
            )
            cells.append(f"{d.procs} job processes at the kill, {d.left_2s} left 2 s after; {gone}")
    return f"| {label} | {cells[0]} | {cells[1]} |"


def machine() -> str:
    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {platform.python_version()}, "
        f"ansible-runner {ver('ansible-runner')}, ansible-core {ver('ansible-core')}, "
        f"pexpect {ver('pexpect')}, gevent {ver('gevent')}, uvloop {ver('uvloop')}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller outputs and fewer jobs")
    ap.add_argument("--only", help="comma-separated faults: " + ",".join([*FAULTS, "host_dies"]))
    ap.add_argument("--json", help="also write every report to this file")
    args = ap.parse_args(argv)
    become_subreaper()
    only = set(args.only.split(",")) if args.only else None
    print(machine(), flush=True)
    table = ["| fault | stock | runner-spawn |", "|---|---|---|"]
    raw = []
    for label, name, params, timeout in plan(args.quick):
        if only is not None and name not in only:
            continue
        cells = []
        for mode in ("stock", "patched"):
            if mode == "stock" and (name == "install_race" or params.get("how") == "aio"):
                cells.append("n/a (runner-spawn's own API)")
                continue
            started = time.monotonic()
            report = run_host(name, mode, params, timeout)
            raw.append({"fault": label, "mode": mode, "report": report})
            cells.append(cell(name, report))
            print(f"  {label} [{mode}]: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        table.append(f"| {label} | {cells[0]} | {cells[1]} |")
    if only is None or "host_dies" in only:
        table.append(host_dies_row(args.quick))
    print("\n".join(table))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
