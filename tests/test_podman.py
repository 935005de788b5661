"""Process isolation through a real podman engine: stock ansible-runner against the patch.

Needs podman and the execution-environment image that ``.ci/podman-setup`` builds
(``sudo bash .ci/podman-setup``). Without them every test here is skipped with that
advice; with ``RUNNER_SPAWN_PODMAN=required`` in the environment (CI) that is an error.
``RUNNER_SPAWN_EE_IMAGE`` names another image (it needs ``/opt/venv/bin/python`` with
ansible-core).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ansible_runner
import ansible_runner.runner
import pytest

import runner_spawn
from tests import procs

IMAGE = os.environ.get("RUNNER_SPAWN_EE_IMAGE", "localhost/runner-spawn-ee:latest")
# Inside the container the job's own ansible runs the tasks, on the container's localhost.
INVENTORY = "localhost ansible_connection=local ansible_python_interpreter=/opt/venv/bin/python\n"
# What podman prints when it is asked for a terminal on pipes ("level=warning msg=..." on
# a pipe, "WARN[0000] ..." on a terminal).
PODMAN_WARNINGS = ("WARN[", "level=warning", "not a TTY")
# Whatever is still running of a job is expected to be gone within this (polled, not timed).
GONE_WITHIN = 20.0

pytestmark = [
    pytest.mark.podman,
    # Stock runs fork a terminal; Python 3.12+ warns about that in a process with threads.
    pytest.mark.filterwarnings(r"ignore:.*use of forkpty\(\) may lead to deadlocks:DeprecationWarning"),
]

PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: one
      command: echo one
    - name: two
      command: echo two
    - name: three
      debug:
        msg: three
"""

RETRIES, DELAY = 3, 1
RETRY_PLAYBOOK = f"""
- hosts: all
  gather_facts: false
  tasks:
    - name: retry
      command: /bin/false
      register: result
      until: result.rc == 0
      retries: {RETRIES}
      delay: {DELAY}
      ignore_errors: true
"""

# The task marks /runner/started (the job's private_data_dir), then sleeps in a process
# whose command line carries the job's ident, so that it can be looked for on the host.
SLEEP_PLAYBOOK = """
- hosts: all
  gather_facts: false
  tasks:
    - name: sleep
      shell: "touch /runner/started && exec /opt/venv/bin/python -c 'import time; time.sleep(120)' IDENT"
"""


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    """Skip (or, when CI requires podman, fail) without podman or without the image."""
    podman = shutil.which("podman")
    reason = ""
    if podman is None:
        reason = "podman is not installed"
    else:
        proc = subprocess.run(
            [podman, "image", "exists", IMAGE], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            reason = f"podman has no image {IMAGE}" + (f" ({proc.stderr.strip()})" if proc.stderr.strip() else "")
    if reason:
        message = f"{reason}: run `sudo bash .ci/podman-setup` (installs podman, builds the image)"
        if os.environ.get("RUNNER_SPAWN_PODMAN") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@dataclass
class Job:
    pdd: Path
    ident: str

    @property
    def container_name(self) -> str:
        # ansible-runner's name for the job's container (sanitizing leaves this ident as is)
        return f"ansible_runner_{self.ident}"

    @property
    def started(self) -> Path:
        return self.pdd / "started"


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Callable[[str], Job]]:
    """Factory: a private_data_dir for a playbook, with an ident known in advance.

    Afterwards every container of these jobs is removed (by name: nothing else is
    touched), and the engine processes this (subreaper) process inherited are reaped.
    """
    made: list[Job] = []

    def make(playbook: str) -> Job:
        ident = f"rs-podman-{uuid.uuid4().hex[:12]}"
        pdd = tmp_path / ident
        (pdd / "project").mkdir(parents=True)
        (pdd / "inventory").mkdir()
        (pdd / "project" / "site.yml").write_text(textwrap.dedent(playbook).replace("IDENT", ident))
        (pdd / "inventory" / "hosts").write_text(INVENTORY)
        made.append(Job(pdd, ident))
        return made[-1]

    yield make
    for job in made:
        subprocess.run(
            ["podman", "rm", "--force", "--ignore", "--time", "0", job.container_name],
            capture_output=True,
            timeout=60,
            check=False,
        )
    reap_engine_orphans()


def run_job(job: Job, **kwargs: Any) -> ansible_runner.Runner:
    return ansible_runner.run(
        private_data_dir=str(job.pdd),
        playbook="site.yml",
        ident=job.ident,
        quiet=True,
        process_isolation=True,
        process_isolation_executable="podman",
        container_image=IMAGE,
        settings={"pexpect_timeout": 0.2},
        **kwargs,
    )


@contextlib.contextmanager
def patch_installed() -> Iterator[list[list[str]]]:
    """runner_spawn installed; yields the argv of every job RunnerSpawn started meanwhile."""
    argvs: list[list[str]] = []
    runner_spawn.install()
    try:
        view = ansible_runner.runner.pexpect  # what Runner.run() spawns through
        spawn_class: Any = view.spawn

        class RecordingSpawn(spawn_class):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                argvs.append(list(self.args))

        view.spawn = RecordingSpawn
        yield argvs
    finally:
        runner_spawn.uninstall()


@pytest.fixture(params=["stock", "patched"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "stock":
        assert not runner_spawn.is_installed()
        yield "stock"
    else:
        with patch_installed():
            yield "patched"


def event_types(r: ansible_runner.Runner) -> list[str]:
    return [e["event"] for e in r.events]


def stdout_text(r: ansible_runner.Runner) -> str:
    """The job's stdout artifact and every event's stdout."""
    artifact = (Path(r.config.artifact_dir) / "stdout").read_text()
    return artifact + "\n".join(e.get("stdout", "") for e in r.events)


def processes_naming(*needles: str) -> dict[int, str]:
    """{pid: command line} of every live process whose command line contains one of ``needles``."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in cmdline for needle in needles):
            found[int(name)] = cmdline
    return found


def podman_ps(job: Job, *options: str) -> str:
    out = subprocess.run(
        ["podman", "ps", "--quiet", *options, "--filter", f"name=^{job.container_name}$"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return out.strip()


def reap_engine_orphans() -> None:
    """Reap conmon and podman zombies re-parented to this (subreaper) process."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = procs.stat(int(name))
        if st is None or st[0] != me or st[3] != "Z":
            continue
        try:
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("conmon", "podman"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(name), os.WNOHANG)


def assert_job_gone(job: Job) -> None:
    """No container of the job (running or not), and no process of it: no podman, no conmon
    (both name the container), no task process (it names the job's ident)."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        containers = podman_ps(job, "--all")
        left = processes_naming(job.container_name, job.ident)
        if (not containers and not left) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert podman_ps(job) == "", f"container {job.container_name} still running"
    assert containers == "", f"container {job.container_name} not removed"
    assert not left, f"processes of the job left: {left}"


def wait_until_started(job: Job) -> None:
    deadline = time.monotonic() + 60
    while not job.started.exists():
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_same_events_as_stock(jobs: Callable[[str], Job]) -> None:
    stock = run_job(jobs(PLAYBOOK))
    with patch_installed():
        ours = run_job(jobs(PLAYBOOK))
    assert (stock.status, stock.rc) == ("successful", 0)
    assert (ours.status, ours.rc) == (stock.status, stock.rc)
    assert len(event_types(stock)) == 12  # start, play, 3 x (task, runner_on_start, ok), stats
    assert event_types(ours) == event_types(stock)
    assert ours.stats == stock.stats


@pytest.mark.timeout(90)
def test_no_tty_and_no_podman_warning(jobs: Callable[[str], Job]) -> None:
    stock = run_job(jobs(PLAYBOOK))
    with patch_installed() as argvs:
        ours = run_job(jobs(PLAYBOOK))
    assert (stock.status, stock.rc) == (ours.status, ours.rc) == ("successful", 0)
    # Stock asks podman for a terminal (it has one to give, a pty).
    assert stock.config.command[:2] == ["podman", "run"] and "--tty" in stock.config.command
    # Ours runs on pipes: the same command without the request, with PYTHONUNBUFFERED passed.
    assert len(argvs) == 1
    argv = argvs[0]
    assert "--tty" not in argv and "-t" not in argv[: argv.index(IMAGE)]
    assert "PYTHONUNBUFFERED" in argv[argv.index("--env") + 1]
    assert os.path.basename(argv[0]) == "podman"
    assert [t for t in argv[1:] if t not in ("--env", "PYTHONUNBUFFERED")] == [
        t for t in ours.config.command[1:] if t != "--tty"
    ]
    for r in (stock, ours):
        text = stdout_text(r)
        assert "changed: [localhost]" in text
        assert not [w for w in PODMAN_WARNINGS if w in text], text


@pytest.mark.timeout(90)
def test_streams_live(jobs: Callable[[str], Job], mode: str) -> None:
    received: dict[str, float] = {}  # uuid -> when the host got the event

    def on_event(event: dict[str, Any]) -> bool:
        received[event["uuid"]] = time.monotonic()
        return True

    r = run_job(jobs(RETRY_PLAYBOOK), event_handler=on_event)
    assert (r.status, r.rc) == ("successful", 0)
    retries = [e for e in r.events if e["event"] == "runner_retry"]
    assert len(retries) == RETRIES
    # The job emitted the retries at least DELAY apart ('created' is set where the event is made)...
    created = [datetime.fromisoformat(e["created"]) for e in retries]
    created_spread = (created[-1] - created[0]).total_seconds()
    assert created_spread >= 0.9 * (RETRIES - 1) * DELAY
    # ...and the host got them as they came, not in one burst when the job ended.
    arrived = [received[e["uuid"]] for e in retries]
    assert arrived[-1] - arrived[0] >= created_spread / 2


@pytest.mark.timeout(90)
def test_cancel(jobs: Callable[[str], Job], mode: str) -> None:
    job = jobs(SLEEP_PLAYBOOK)
    r = run_job(job, cancel_callback=job.started.exists)
    assert (r.status, r.rc) == ("canceled", 254)
    assert r.config.container_name == job.container_name
    assert_job_gone(job)
    # the autouse fixture also checks that no descendant of this process is left


@pytest.mark.timeout(90)
def test_job_timeout(jobs: Callable[[str], Job], mode: str) -> None:
    job = jobs(SLEEP_PLAYBOOK)

    def hold_until_started() -> bool:
        # Runner checks job_timeout right after the cancel callback: hold it until the task runs.
        wait_until_started(job)
        return False

    r = run_job(job, timeout=1, cancel_callback=hold_until_started)
    assert (r.status, r.rc) == ("timeout", 254)
    assert job.started.exists()
    assert_job_gone(job)
