"""Terminal mode: TerminalSpawn's contract, and real playbooks that need a terminal."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ansible_runner
import pexpect
import pytest

import runner_spawn
from runner_spawn import TerminalSpawn, handle_runner_termination
from tests import procs
from tests.conftest import JobDir
from tests.runner_loop import RUNNER_KW, drive

# Also run by every session of the version matrix (noxfile.py).
pytestmark = pytest.mark.matrix


def sh(script: str, **kw: Any) -> TerminalSpawn:
    return TerminalSpawn("sh", ["-c", script], **{**RUNNER_KW, **kw})


# --- the child and its terminal -----------------------------------------------------


def test_terminal_is_the_childs_controlling_terminal() -> None:
    script = "test -t 0 && test -t 1 && test -t 2 && echo ttys; exec 3</dev/tty && echo ctty; cat /proc/$$/stat"
    child = sh(script)
    out = drive(child)
    assert out.startswith("ttys\r\nctty\r\n")
    fields = out[out.rindex(")") + 2 :].split()
    pgid, sid, tty_nr, tpgid = int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5])
    assert pgid == sid == tpgid == child.pid  # session leader, in the foreground
    assert tty_nr != 0
    assert (child.exitstatus, child.signalstatus) == (0, None)


@pytest.mark.parametrize(
    "script",
    [
        "printf 'a\\nb\\n'; echo err >&2; printf 'no newline'",
        "stty size; test -t 1 && echo tty; printf 'x\\303\\251\\n'",
        "printf 'pw: '; read x; echo \"got=$x\"",
    ],
)
def test_output_bytes_match_stock_pexpect_spawn(script: str) -> None:
    kw = {**RUNNER_KW, "encoding": None}
    answers = {"pw: ": "hunter2"}
    ours = drive(TerminalSpawn("sh", ["-c", script], **kw), answers)
    stock = drive(pexpect.spawn("sh", ["-c", script], **kw), answers)
    assert ours == stock
    assert b"\r\n" in ours


def test_exit_and_signal_status() -> None:
    child = sh("echo out; exit 3")
    assert drive(child) == "out\r\n"
    assert (child.exitstatus, child.signalstatus, child.terminated) == (3, None, True)
    child = sh("kill -TERM $$")
    drive(child)
    assert (child.exitstatus, child.signalstatus) == (None, signal.SIGTERM)


def test_dimensions_cwd_and_env(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "ONLY": "this"}
    child = sh('stty size; pwd; echo "$ONLY"', env=env, cwd=tmp_path, dimensions=(30, 100))
    assert child.getwinsize() == (30, 100)
    assert drive(child).split("\r\n")[:3] == ["30 100", str(tmp_path.resolve()), "this"]
    assert drive(sh("stty size")) == "24 80\r\n"  # ptyprocess's default


@pytest.mark.parametrize("ignore_sighup", [True, False])
def test_ignore_sighup_honoured_other_signals_default(ignore_sighup: bool) -> None:
    out = drive(sh("grep -E '^SigIgn' /proc/$$/status", ignore_sighup=ignore_sighup))
    ignored = int(out.split()[1], 16)
    assert [s for s in signal.valid_signals() if ignored & (1 << (s - 1))] == ([signal.SIGHUP] if ignore_sighup else [])


@pytest.mark.parametrize("echo", [True, False])
def test_echo_as_asked(echo: bool) -> None:
    child = sh('read x; echo "got=$x"', echo=echo)
    child.sendline("abc")
    assert drive(child) == ("abc\r\n" if echo else "") + "got=abc\r\n"


# --- the core's guarantees, on a terminal -----------------------------------------


def test_no_lost_bytes() -> None:
    out = drive(sh("yes 0123456789 | head -n 200000"))
    assert out == "0123456789\r\n" * 200000
    for _ in range(20):  # a child that writes and exits at once: the hangup must not cut output
        out = drive(TerminalSpawn("printf", ["%s", "x" * 3000], **RUNNER_KW))
        assert out == "x" * 3000


def test_hangup_ends_output_when_child_exits() -> None:
    # Without ignore_sighup the session's hangup ends the background sleep, as under stock.
    child = sh("sleep 30 & echo $!", ignore_sighup=False)
    sleeper = int(drive(child))
    st = procs.stat(sleeper)
    if st is not None:
        left = procs.wait_gone({sleeper: st[2]}, 5)
        procs.kill_all({sleeper: st[2]})
        assert left == {}


def test_background_holder_of_terminal_does_not_hang_eof() -> None:
    # With ignore_sighup a background process outlives the child and keeps the
    # terminal open: output still ends, drain_grace after the child's exit.
    child = sh("sleep 30 & echo $!")
    sleeper = int(drive(child))
    st = procs.stat(sleeper)
    assert st is not None, "output ended only when the background process did"
    procs.kill_all({sleeper: st[2]})


def test_close_ends_running_child_and_releases_fds() -> None:
    before = procs.open_fds()
    child = sh("sleep 30")
    assert child.isalive() and child.isatty()
    child.close()
    child.close()  # idempotent
    assert child.closed and not child.isalive() and not child.isatty()
    assert child.signalstatus == signal.SIGTERM
    assert procs.open_fds() == before


def test_child_gets_only_stdio_and_host_keeps_no_fd(tmp_path: Path) -> None:
    before = procs.open_fds()
    out = drive(TerminalSpawn("ls", ["/proc/self/fd"], **RUNNER_KW))
    assert sorted(map(int, out.split())) == [0, 1, 2, 3]  # 3: ls's own directory fd
    script = tmp_path / "not-a-program"
    script.write_text("no interpreter line\n")
    script.chmod(0o755)
    with pytest.raises(pexpect.ExceptionPexpect, match="could not be started"):
        TerminalSpawn(str(script), [], encoding="utf-8")  # fails in posix_spawn: master closed
    assert procs.open_fds() == before


def test_quiet_child_costs_no_cpu() -> None:
    # Quiet with the terminal open, then quiet with it closed (the master reports hangup).
    child = sh("sleep 0.5; echo done; exec </dev/null >/dev/null 2>&1; sleep 0.5")
    t0 = time.process_time()
    assert drive(child) == "done\r\n"
    assert time.process_time() - t0 < 0.05
    assert child.exitstatus == 0


def test_sendeof_and_sendintr() -> None:
    child = TerminalSpawn("cat", [], **RUNNER_KW)
    child.sendline("line")
    child.sendeof()
    assert drive(child) == "line\r\n"
    assert child.exitstatus == 0
    child = TerminalSpawn("cat", [], **RUNNER_KW)
    child.sendline("ready")
    child.expect("ready")  # cat runs (not the shell before it)
    child.sendintr()  # ^C: SIGINT to the terminal's foreground process group
    drive(child)
    assert child.signalstatus == signal.SIGINT


def test_whole_tree_ended_by_handle_runner_termination() -> None:
    # One process leaves the session (as ansible-core 2.19 workers do).
    child = sh("setsid sleep 30 & sleep 30 & echo started; wait")
    child.expect("started")
    tree = procs.descendants(child.pid)
    assert len(tree) >= 2
    handle_runner_termination(child.pid, grace=1.0)
    assert procs.wait_gone(tree, 30) == {}
    drive(child)
    assert child.signalstatus == signal.SIGTERM


def test_container_engine_keeps_its_tty(tmp_path: Path) -> None:
    engine = tmp_path / "docker"
    engine.write_text('#!/bin/sh\necho "$@"\n')
    engine.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    args = ["run", "--rm", "--tty", "--interactive", "image", "ansible-playbook"]
    out = drive(TerminalSpawn("docker", args, env=env, **RUNNER_KW))
    assert out == "run --rm --tty --interactive image ansible-playbook\r\n"


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # 3.12+: fork() with threads
def test_fork_in_another_thread_does_not_hold_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # A thread forks a copy of the host (which does not exec) exactly while the host
    # holds the slave open. Had the copy inherited the slave, end of output would wait
    # for the copy, which lives until the test lets it go (or for drain_grace, longer
    # than the test may run); the fork has to wait for the spawn instead.
    copies: list[int] = []
    forkers: list[threading.Thread] = []
    forking = threading.Event()
    release_r, release_w = os.pipe()
    real_ttyname = os.ttyname

    def fork_copy() -> None:
        forking.set()
        pid = os.fork()
        if pid == 0:
            os.close(release_w)
            os.read(release_r, 1)  # until the test closes its end
            os._exit(0)
        copies.append(pid)

    def ttyname_while_forking(fd: int) -> str:
        if not forkers:
            forkers.append(threading.Thread(target=fork_copy))
            forkers[0].start()
            assert forking.wait(60), "the forking thread did not run"
            time.sleep(0.2)  # not a wait: the window in which a fork that does not wait would happen
        return real_ttyname(fd)

    out: list[str] = []
    monkeypatch.setattr(os, "ttyname", ttyname_while_forking)
    try:
        child = TerminalSpawn("sh", ["-c", "echo done"], drain_grace=600, **RUNNER_KW)
        monkeypatch.undo()

        def drive_it() -> None:
            try:
                out.append(drive(child))
            except pexpect.TIMEOUT:
                out.append("TIMEOUT: end of output waited for the forked copy of the host")
                child.close(force=True)

        driver = threading.Thread(target=drive_it)
        driver.start()
        driver.join(60)
        ended_with_copy_alive = not driver.is_alive()
    finally:
        monkeypatch.undo()
        os.close(release_w)  # the copy exits; a stuck drive() then ends too
        if forkers:
            forkers[0].join()
        for pid in copies:
            os.waitpid(pid, 0)
        if "driver" in locals():
            driver.join()
        os.close(release_r)
    assert ended_with_copy_alive, "end of output waited for the forked copy of the host"
    assert out == ["done\r\n"]
    assert len(copies) == 1


def test_no_python_at_fork_callback_in_spawn() -> None:
    fired: list[str] = []
    os.register_at_fork(before=lambda: fired.append("before"))
    drive(sh("true"))
    assert fired == []


# --- install(terminal=True) ------------------------------------------------------------


def test_install_modes() -> None:
    import ansible_runner.runner as runner_module

    try:
        runner_spawn.install(terminal=True)
        runner_spawn.install(terminal=True)  # idempotent
        assert runner_module.pexpect.spawn is TerminalSpawn
        with pytest.raises(RuntimeError, match="already installed in terminal mode"):
            runner_spawn.install()
        assert runner_module.pexpect.spawn is TerminalSpawn  # unchanged by the refused call
        runner_spawn.uninstall()
        assert runner_module.pexpect.spawn is pexpect.spawn
        runner_spawn.install()
        with pytest.raises(RuntimeError, match="already installed in pipe mode"):
            runner_spawn.install(terminal=True)
        assert runner_module.pexpect.spawn is runner_spawn.RunnerSpawn
    finally:
        runner_spawn.uninstall()
    assert runner_module.pexpect is pexpect


# --- real playbooks in terminal mode ---------------------------------------------------


@pytest.fixture
def terminal_mode() -> Iterator[None]:
    runner_spawn.install(terminal=True)
    try:
        yield
    finally:
        runner_spawn.uninstall()


def run(pdd: Path, **kw: Any) -> ansible_runner.Runner:
    settings = {"job_timeout": 60, **kw.pop("settings", {})}
    return ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True, settings=settings, **kw)


def raw_stdout(r: ansible_runner.Runner) -> bytes:
    return (Path(r.config.artifact_dir) / "stdout").read_bytes()


def debug_msgs(r: ansible_runner.Runner) -> list[str]:
    return [
        e["event_data"]["res"]["msg"]
        for e in r.events
        if e["event"] == "runner_on_ok" and e["event_data"].get("task_action") == "debug"
    ]


PROMPTS = """
- hosts: all
  gather_facts: false
  vars_prompt:
    - name: colour
      prompt: Favourite colour
      private: false
    - name: code
      prompt: Secret code
  tasks:
    - pause:
        prompt: Say something
      register: said
    - debug:
        msg: "colour={{ colour }} code={{ code }} said={{ said.user_input }}"
"""
PROMPT_ANSWERS = {r"Favourite colour:\s*$": "blue", r"Secret code:\s*$": "1234", r"Say something:\s*$": "hello"}


@pytest.mark.usefixtures("terminal_mode")
def test_vars_prompt_and_pause_prompt_answered_no_python_at_fork(job_dir: JobDir) -> None:
    calls: list[int] = []
    os.register_at_fork(before=lambda: calls.append(1))  # stays registered: count the difference
    pdd = job_dir(PROMPTS)
    before = len(calls)
    r = run(pdd, passwords=PROMPT_ANSWERS)
    assert len(calls) == before  # no Python code ran between fork and exec
    assert (r.status, r.rc) == ("successful", 0)
    assert debug_msgs(r) == ["colour=blue code=1234 said=hello"]


# Output outside events (prompts) reaches the stdout artifact in pieces that depend
# on read timing, under stock too; this playbook's output is all in events.
PLAIN = """
- hosts: all
  gather_facts: false
  tasks:
    - command: printf 'one\\ntwo\\n'
      register: out
    - debug:
        var: out.stdout_lines
"""


def test_output_bytes_match_stock_runner(job_dir: JobDir) -> None:
    stock = run(job_dir(PLAIN))
    runner_spawn.install(terminal=True)
    try:
        ours = run(job_dir(PLAIN))
    finally:
        runner_spawn.uninstall()
    assert (stock.rc, ours.rc) == (0, 0)
    assert raw_stdout(ours) == raw_stdout(stock)
    assert b"\r\n" in raw_stdout(ours)


@pytest.mark.usefixtures("terminal_mode")
def test_pause_seconds(job_dir: JobDir) -> None:
    pdd = job_dir("""
        - hosts: all
          gather_facts: false
          tasks:
            - pause:
                seconds: 1
            - debug:
                msg: after pause
    """)
    t0 = time.monotonic()
    r = run(pdd)
    assert (r.status, r.rc) == ("successful", 0)
    assert time.monotonic() - t0 >= 1
    assert debug_msgs(r) == ["after pause"]
    assert b"Pausing for 1 seconds" in raw_stdout(r)


# su as the become method asks for a password on its terminal: this one checks it.
FAKE_SU = """\
#!/bin/sh
printf 'Password: '
IFS= read -r pw
[ "$pw" = become-pw ] || { echo 'su: Authentication failure'; exit 1; }
while [ $# -gt 0 ] && [ "$1" != -c ]; do shift; done
exec /bin/sh -c "$2"
"""


@pytest.mark.usefixtures("terminal_mode")
def test_ssh_become_and_vault_password_prompts(job_dir: JobDir) -> None:
    from ansible.parsing.vault import VaultLib, VaultSecret

    vault = VaultLib([("default", VaultSecret(b"vault-pw"))])
    pdd = job_dir(
        """
        - hosts: all
          gather_facts: false
          vars_files: [secret.yml]
          tasks:
            - command: echo became
              become: true
              become_method: su
              become_user: nobody
              vars:
                ansible_become_exe: "{{ playbook_dir }}/fake-su"
              register: became
            - debug:
                msg: "{{ became.stdout }} {{ secret_word }}"
        """,
        extra_files={"project/secret.yml": vault.encrypt("secret_word: swordfish\n").decode()},
    )
    (pdd / "project" / "fake-su").write_text(FAKE_SU)
    (pdd / "project" / "fake-su").chmod(0o755)
    answers = {
        r"SSH password:\s*$": "ssh-pw",
        r"BECOME password.*:\s*$": "become-pw",
        r"Vault password:\s*$": "vault-pw",
    }
    r = run(pdd, cmdline="-k -K --ask-vault-pass", passwords=answers)
    assert (r.status, r.rc) == ("successful", 0), raw_stdout(r)
    assert debug_msgs(r) == ["became swordfish"]
    stdout = raw_stdout(r)
    assert b"SSH password:" in stdout and b"BECOME password" in stdout and b"Vault password:" in stdout
    assert b"-pw" not in stdout  # answers are not echoed


@pytest.mark.usefixtures("terminal_mode")
def test_cancel_ends_whole_tree(job_dir: JobDir) -> None:
    pdd = job_dir(
        """
        - hosts: all
          gather_facts: false
          tasks:
            - shell: sleep 30 && touch finished-{{ inventory_hostname }}
              args:
                chdir: "{{ playbook_dir }}"
        """,
        hosts=2,
    )

    def sleeps_running() -> bool:  # the task processes run, in sessions of their workers
        return sum(cmdline(pid) == b"sleep\x0030\x00" for pid in procs.descendants()) == 2

    r = run(pdd, cancel_callback=sleeps_running, settings={"pexpect_timeout": 0.2})
    assert (r.status, r.rc) == ("canceled", 254)
    assert list((pdd / "project").glob("finished-*")) == [], "a task was not ended: its sleep ran out"
    # The autouse fixture checks that no process of the job is left.


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_terminal_spawn_refuses_preexec_fn() -> None:
    with pytest.raises(ValueError, match=r"preexec_fn.*between fork and exec"):
        runner_spawn.TerminalSpawn("true", [], preexec_fn=lambda: None)
