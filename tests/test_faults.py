"""Faults and hostile hosts: real ansible-runner jobs, each in a fresh host process.

Every test runs one fault of benchmarks/faults.py (which prints the stock-versus-patched
table of the README's *Faults* section) with runner-spawn installed, and asserts on the
host's report: a clear error or the right result, nothing lost, nothing left running,
no fd or thread leaked, nothing hung. A host is a child subreaper: it reports and
SIGKILLs (by pid) whatever its jobs left; a host that hangs is ended by its process
group, which run_host made. No test asserts a duration.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import Any

import pexpect
import pytest

from runner_spawn import RunnerSpawn, _child
from tests import bench, procs

faults = bench.load("faults")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux /proc, prctl, tmpfs")


def patched_host(name: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    report: dict[str, Any] = faults.run_host(name, "patched", params, timeout)
    assert "hung" not in report, f"the host did not finish in {timeout} s: {name} {params}"
    assert "error" not in report, report["error"]
    return report


def pidfd_keeps_exit_status() -> bool:
    """Whether this kernel keeps a reaped process's status for its pidfd (Linux 6.15+)."""
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 7"], {})
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        os.waitpid(pid, 0)
        return False
    try:
        os.waitpid(pid, 0)
        status = _child._status_from_pidfd(fd)
    finally:
        os.close(fd)
    return status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


# --- fds -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_emfile_fails_clearly_leaks_nothing_and_the_next_run_works() -> None:
    report = patched_host("emfile", {"extras": list(range(7))}, 170)
    runs = report["runs"]
    failed_to_start = [r for r in runs if r.get("rc") == 127]
    assert failed_to_start, runs
    for run in runs:
        assert run["fd_delta"] == 0, run
        if "raised" in run:
            # No fd at all: Runner's own open() of its stderr artifact fails, before any spawn.
            assert run["extra"] == 0 and "Too many open files" in run["raised"], run
        elif run["rc"] == 127:
            # Like ansible-runner's MissingProcess path: rc 127, the reason in stdout.
            assert run["status"] == "failed", run
            assert "could not be started" in run["last_line"] and "Too many open files" in run["last_line"], run
        else:
            # The job started. It inherits the low limit (as with stock), so it may run
            # out of fds itself: then it fails and says so.
            assert (run["status"], run["rc"]) == ("successful", 0) or (
                run["status"] == "failed" and run["emfile_in_output"]
            ), run
    # An inheritable fd above the lowered limit does not stop the spawn (posix_spawn
    # cannot close it there; it stays open in the job, as with stock).
    assert (report["high_fd"]["status"], report["high_fd"]["rc"]) == ("successful", 0), report["high_fd"]
    assert (report["after"]["status"], report["after"]["rc"]) == ("successful", 0), report["after"]
    assert report["fd_delta"] == 0 and report["thread_delta"] == 0
    assert report["left"] == []


def test_no_exit_fd_ends_the_started_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of fds between posix_spawn and the exit fd: the job is ended, not left unwatched."""

    def no_fd(self: Any) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(_child.Child, "_open_exit_fd", no_fd)
    fds = procs.open_fds()
    before = procs.descendants()
    with pytest.raises(Exception, match="Too many open files"):
        RunnerSpawn("sleep", ["30"])
    assert procs.open_fds() == fds
    assert procs.alive({p: s for p, s in procs.descendants().items() if p not in before}) == {}


# --- children reaped by someone else ------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["ign", "reaper"])
def test_children_reaped_by_the_host(fault: str) -> None:
    """SIGCHLD ignored (the kernel reaps), or a host thread in os.waitpid(-1, 0)."""
    report = patched_host("sigchld", {"fault": fault, "hang_after": 60}, 110)
    kept = pidfd_keeps_exit_status()
    for run in report["runs"]:
        assert "hung" not in run and "raised" not in run, run
        if run["rc"] is None:
            # The kernel has no exit status for pidfds: reported as unknown, never made up.
            assert not kept, run
            assert run["status"] == "failed" and report["unknown_status_warnings"] > 0, report
        else:
            assert run["rc"] == run["expected_rc"], run
            assert run["status"] == ("successful" if run["expected_rc"] == 0 else "failed"), run
    assert len(report["runs"]) == 2
    assert report["left"] == []


# --- a full artifact filesystem -------------------------------------------------------------


def full_fs(kind: str) -> dict[str, Any]:
    report = patched_host("full_fs", {"kind": kind}, 110)
    if "skipped" in report:
        pytest.skip(f"cannot mount a tmpfs here: {report['skipped']}")
    assert "No space left on device" in report.get("raised", ""), report
    return report


@pytest.mark.timeout(120)
def test_full_artifact_fs_playbook_error_surfaces_and_tree_ends() -> None:
    # ansible's callback (in the job) cannot write its event files and the playbook
    # stalls; idle_timeout ends the tree; Runner's write of the status artifact raises.
    report = full_fs("playbook")
    assert report["running_while_error_held"] == []
    assert report["left"] == []


@pytest.mark.timeout(120)
def test_full_artifact_fs_job_running_on() -> None:
    # Runner's write of the stdout artifact raises out of Runner.run() while the job runs:
    # RunnerSpawn ends the job before the error goes on (nobody will read it again).
    report = full_fs("command")
    assert report["running_while_error_held"] == []
    assert report["left"] == []


# --- large output ---------------------------------------------------------------------------

# Runner keeps a line whole (OutputEventFilter's buffer, then the event) a few times over;
# runner-spawn itself holds at most a few MB whatever the output (see README, Faults).
RUNNER_COPIES_PER_LINE = 6
OWN_MB = 16


def check_big_output(params: dict[str, Any]) -> None:
    report = patched_host("big_output", params, 500)
    assert (report["status"], report["rc"]) == ("successful", 0), report
    if params["kind"] == "line":
        if params.get("newline"):
            assert report["complete_in_stdout"], report
        else:
            # Runner writes a final line without a newline to job_events only (stock too).
            assert report["complete_in_events"], report
        bound = RUNNER_COPIES_PER_LINE * params["mb"] + OWN_MB
    else:
        assert report["complete_in_stdout"], report
        bound = OWN_MB
    assert report["rss_growth_mb"] <= bound, report
    assert report["left"] == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("newline", [False, True], ids=["no-newline", "newline"])
def test_spawn_alone_holds_little_of_a_64mb_line(newline: bool) -> None:
    """RunnerSpawn's own share, driven as Runner drives it, with a sink that keeps nothing."""

    class Count:
        chars = 0

        def write(self, text: str) -> None:
            self.chars += len(text)

        def flush(self) -> None:
            pass

    size = 64 * faults.MiB
    rss_before = faults._status_kb("VmRSS")
    faults.reset_peak_rss()
    spawn = RunnerSpawn(
        "sh",
        ["-c", f"head -c {size} /dev/zero | tr '\\0' x" + ("; echo" if newline else "")],
        cwd="/",
        ignore_sighup=True,
        encoding="utf-8",
        codec_errors="replace",
        echo=False,
        use_poll=True,
    )
    sink = Count()
    spawn.logfile_read = sink
    while spawn.isalive():
        spawn.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=5, searchwindowsize=100)
    spawn.expect(pexpect.EOF, timeout=5)
    spawn.close()
    assert sink.chars == size + newline
    assert (faults._status_kb("VmHWM") - rss_before) / 1024 <= OWN_MB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("newline", [False, True], ids=["no-newline", "newline"])
def test_long_line_8mb(newline: bool) -> None:
    check_big_output({"kind": "line", "mb": 8, "newline": newline})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_long_line_64mb() -> None:
    check_big_output({"kind": "line", "mb": 64, "newline": False})


@pytest.mark.timeout(120)
def test_short_lines_8mb() -> None:
    check_big_output({"kind": "lines", "mb": 8, "line_len": 2000})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_lines_50mb() -> None:
    check_big_output({"kind": "lines", "mb": 50, "line_len": 2000})


# --- gevent and uvloop hosts ------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("host", "how"),
    [("gevent", "greenlets"), ("gevent", "executor"), ("gevent", "aio"), ("uvloop", "executor"), ("uvloop", "aio")],
)
def test_gevent_and_uvloop_hosts(host: str, how: str) -> None:
    if not faults.module_available(host):
        pytest.skip(f"{host} is not installed (it comes with the test extra)")
    report = patched_host("async_host", {"host": host, "how": how, "jobs": 8}, 140)
    assert report["ok"] == report["jobs"] == 8, report
    assert len(report["events"]) == 1, report  # every job the same number of events
    assert report["left"] == []


# --- many jobs at once ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_32_concurrent_runs_match_stock() -> None:
    stock = faults.run_host("concurrent", "stock", {"jobs": 2}, 120)
    report = patched_host("concurrent", {"jobs": 32}, 290)
    assert report["ok"] == 32 and report["statuses"] == ["successful rc 0"], report
    assert report["events"] == stock["events"] and len(report["events"]) == 1, (report, stock)
    assert report["fd_delta"] == 0 and report["thread_delta"] == 0, report
    assert report["left"] == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancel_storm_leaves_nothing() -> None:
    # Cancelled 2 s in, once the job's tasks run: its workers exist (stock leaves them running).
    report = patched_host("cancel_storm", {"jobs": 20, "after": 2.0, "when": "running"}, 290)
    assert report["statuses"] == ["canceled rc 254"], report
    assert report["running_at_return"] == 0, report
    assert report["left"] == []


@pytest.mark.timeout(150)
def test_install_races_and_uninstall_mid_job() -> None:
    report = patched_host("install_race", {}, 140)
    assert report["install_errors"] == [] and report["installed"], report
    for run in report["racing"]:  # each ran with one spawn or the other, correctly
        assert (run["status"], run["rc"]) == ("successful", 0), run
    during = report["during_uninstall"]
    assert (during["status"], during["rc"], during["spawn"]) == ("successful", 0, "runner-spawn"), during
    later = report["later"]
    assert (later["status"], later["rc"], later["spawn"]) == ("successful", 0, "stock"), later
    assert report["fd_delta"] == 0 and report["thread_delta"] == 0, report
    assert report["left"] == []


# --- the benchmark script ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_benchmark_prints_the_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(bench.BENCHMARKS / "faults.py"), "--quick", "--only", "emfile"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert rows[0] == "| fault | stock | runner-spawn |", proc.stdout
    body = {r.split("|")[1].strip(): r.split("|")[3].strip() for r in rows[2:]}
    assert list(body) == ["RLIMIT_NOFILE: N fds free when the job starts"], proc.stdout
    patched = body["RLIMIT_NOFILE: N fds free when the job starts"]
    assert "rc 127, the message in stdout" in patched and "nothing left" in patched, proc.stdout
