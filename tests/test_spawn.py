"""RunnerSpawn's contract, against small real children."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest

from runner_spawn import RunnerSpawn
from tests import procs
from tests.runner_loop import RUNNER_KW
from tests.runner_loop import drive as run_like_runner

# Also run by every session of the version matrix (noxfile.py).
pytestmark = pytest.mark.matrix


def sh(script: str, **kw: object) -> RunnerSpawn:
    return RunnerSpawn("sh", ["-c", script], **{**RUNNER_KW, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [0, 1, 2, 127, 255])
def test_exit_codes(code: int) -> None:
    child = sh(f"echo out; exit {code}")
    assert run_like_runner(child) == "out\n"
    assert (child.exitstatus, child.signalstatus, child.terminated) == (code, None, True)
    assert not child.isalive()


def test_signal_death_reported_like_ptyprocess() -> None:
    child = sh("kill -TERM $$")
    run_like_runner(child)
    assert child.exitstatus is None
    assert child.signalstatus == signal.SIGTERM
    assert os.WIFSIGNALED(child.status) and os.WTERMSIG(child.status) == signal.SIGTERM


def test_stderr_merged_in_order() -> None:
    out = run_like_runner(sh("echo one; echo two >&2; echo three"))
    assert out == "one\ntwo\nthree\n"


def test_password_prompt_answered_and_not_on_host_terminal() -> None:
    script = "printf 'SUDO password: ' >&2; read pw; echo \"got:$pw\""
    out = run_like_runner(sh(script), passwords={r"SUDO password:\s*?$": "hunter2"})
    assert "got:hunter2" in out


def test_child_in_own_session_without_terminal() -> None:
    child = sh("cat /proc/$$/stat")
    out = run_like_runner(child)
    fields = out[out.rindex(")") + 2 :].split()
    pgid, sid, tty_nr = int(fields[2]), int(fields[3]), int(fields[4])
    assert pgid == sid == child.pid
    assert pgid != os.getpgrp()
    assert tty_nr == 0


def test_pythonunbuffered_set_unless_caller_sets_it() -> None:
    assert run_like_runner(sh('echo "$PYTHONUNBUFFERED"')) == "1\n"
    env = {**os.environ, "PYTHONUNBUFFERED": ""}
    assert run_like_runner(sh('echo "[$PYTHONUNBUFFERED]"', env=env)) == "[]\n"


def test_env_and_cwd(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "ONLY": "this"}
    out = run_like_runner(sh('pwd; echo "$ONLY"; env | grep -c . ', env=env, cwd=tmp_path))
    lines = out.splitlines()
    assert lines[0] == str(tmp_path.resolve())
    assert lines[1] == "this"


def test_child_signals_are_default() -> None:
    # Python ignores SIGPIPE; the child must not inherit that.
    out = run_like_runner(sh("grep -E '^SigIgn' /proc/$$/status"))
    ignored = int(out.split()[1], 16)
    assert signal.SIGPIPE in signal.valid_signals()
    assert [s for s in signal.valid_signals() if ignored & (1 << (s - 1))] == []


def test_invalid_utf8_and_split_multibyte_decode_without_loss() -> None:
    # é is c3 a9: write the two bytes in separate writes, with a pause between.
    script = "printf 'a\\303'; sleep 0.2; printf '\\251b\\377c\\n'"
    out = run_like_runner(sh(script))
    assert out == "aéb\ufffdc\n"


def test_truncated_multibyte_at_end_is_replaced_not_dropped() -> None:
    assert run_like_runner(sh("printf 'x\\303'")) == "x\ufffd"


def test_bytes_mode() -> None:
    child = RunnerSpawn("sh", ["-c", "printf 'a\\377\\n'"])
    sink = io.BytesIO()
    child.logfile_read = sink
    child.expect(pexpect.EOF)
    child.close()
    assert sink.getvalue() == b"a\xff\n"
    assert child.before == b"a\xff\n"


def test_command_string_is_split_like_pexpect() -> None:
    child = RunnerSpawn("sh -c 'echo split ok'", encoding="utf-8")
    child.expect("split ok")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_missing_command_raises_like_pexpect() -> None:
    with pytest.raises(pexpect.ExceptionPexpect, match=r"^The command was not found or was not executable: nope-xyz"):
        RunnerSpawn("nope-xyz", [])


def test_missing_cwd_raises(tmp_path: Path) -> None:
    with pytest.raises(pexpect.ExceptionPexpect, match="working directory does not exist"):
        RunnerSpawn("true", [], cwd=tmp_path / "missing")


def test_non_str_env_value_raises_naming_the_key() -> None:
    with pytest.raises(pexpect.ExceptionPexpect, match="'COUNT' maps to a int"):
        RunnerSpawn("true", [], env={"PATH": os.environ["PATH"], "COUNT": 3})  # type: ignore[dict-item]


def test_preexec_fn_refused_with_advice() -> None:
    with pytest.raises(ValueError, match=r"preexec_fn.*between fork and exec.*cwd="):
        RunnerSpawn("true", [], preexec_fn=lambda: None)


def test_args_as_string_refused() -> None:
    with pytest.raises(TypeError, match="list"):
        RunnerSpawn("echo", "abc")  # type: ignore[arg-type]


def test_pty_only_options_accepted() -> None:
    child = RunnerSpawn("true", [], echo=False, dimensions=(24, 80), use_poll=True, ignore_sighup=True, maxread=2000)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not child.isatty()


def test_expect_timeout_then_output() -> None:
    # The child writes only once told to: the first expect() can only end in TIMEOUT.
    child = sh("read go; echo late")
    assert child.expect([pexpect.TIMEOUT, "late"], timeout=0.1) == 0
    child.sendline("go")
    assert child.expect([pexpect.TIMEOUT, "late"], timeout=30) == 1
    child.close()


def test_expect_raises_timeout_and_eof_without_those_patterns() -> None:
    child = sh("echo start; read go")
    with pytest.raises(pexpect.TIMEOUT):
        child.expect("never", timeout=0.1)
    child.sendline("go")
    with pytest.raises(pexpect.EOF):
        child.expect("never", timeout=30)
    assert "start" in child.before
    child.close()


def test_close_is_idempotent_and_reaps() -> None:
    child = sh("echo x")
    child.expect(pexpect.EOF)
    child.close()
    child.close()
    assert child.closed and child.child_fd == -1
    assert procs.stat(child.pid) is None or procs.stat(child.pid)[0] != os.getpid()  # type: ignore[index]


def test_close_ends_a_running_child() -> None:
    child = sh("sleep 30")
    child.close()
    assert child.signalstatus == signal.SIGTERM  # ended, not waited for


def test_close_force_kills_child_ignoring_sigterm() -> None:
    child = sh("trap '' TERM; echo ready; while :; do sleep 1; done")
    child.delayafterterminate = 0.3
    child.expect("ready")
    child.close(force=True)
    assert child.signalstatus == signal.SIGKILL


def test_terminate_without_force_reports_failure() -> None:
    child = sh("trap '' TERM; echo ready; while :; do sleep 1; done")
    child.delayafterterminate = 0.2
    child.expect("ready")
    assert child.terminate(force=False) is False
    assert child.isalive()
    assert child.terminate(force=True) is True
    child.close()


def test_no_fd_leak_and_no_resource_warning() -> None:
    before = procs.open_fds()
    for _ in range(20):
        run_like_runner(sh("echo hi"))
    assert procs.open_fds() == before


def test_sendeof_closes_stdin() -> None:
    child = sh("cat; echo done")
    child.logfile_read = sink = io.StringIO()
    child.sendline("line")
    child.sendeof()
    child.expect(pexpect.EOF, timeout=5)
    child.close()
    assert sink.getvalue() == "line\ndone\n"


def test_send_to_exited_child_does_not_raise() -> None:
    child = sh("exec 0<&-; echo closed")
    child.expect(pexpect.EOF)
    assert child.sendline("x" * 200_000) >= 0
    child.close()


def test_child_fds_are_not_inherited_from_host() -> None:
    r, w = os.pipe()
    os.set_inheritable(w, True)  # as a host might, for its own children
    try:
        out = run_like_runner(RunnerSpawn("ls", ["/proc/self/fd"], **RUNNER_KW))  # type: ignore[arg-type]
    finally:
        os.close(r)
        os.close(w)
    assert sorted(map(int, out.split())) == [0, 1, 2, 3]  # 3: ls's own directory fd


def test_quiet_child_costs_no_cpu() -> None:
    child = sh("sleep 1; echo done")
    t0 = time.process_time()
    run_like_runner(child)
    # A busy loop (plain PopenSpawn) burns ~0.16 CPU-s here; sleeping in poll() ~0.
    assert time.process_time() - t0 < 0.05


@pytest.mark.skipif(sys.platform != "linux", reason="Linux /proc")
def test_spawn_uses_no_python_in_child() -> None:
    fired: list[str] = []
    os.register_at_fork(before=lambda: fired.append("before"), after_in_child=lambda: None)
    run_like_runner(sh("true"))
    assert fired == []
