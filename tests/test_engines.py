"""Real task engines (Celery, RQ, Dask distributed) on a real redis-server: stock against patched.

Every way the engine ends a task must end the job: no job process is left 2 s after the
engine reported the task's end. Each scenario runs twice, on a worker without runner-spawn
(stock) and on one that installs it where docs/engines.md says (patched); the snippets come
from tests/engines/*.py, and the docs must show them verbatim. Stock is asserted only where
its outcome is deterministic; every outcome goes into the table printed at the end.

Needs redis-server (Debian: ``apt-get install -y redis-server``) and the ``engines`` extra;
without them the tests skip, and with ``RUNNER_SPAWN_ENGINES=required`` (CI) they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import procs
from tests.engines import jobs
from tests.engines.services import REDIS_ADVICE, REPO, Service, python_service, start_redis, wait_for

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult
    from rq import Queue
    from rq.job import Job

REQUIRED = os.environ.get("RUNNER_SPAWN_ENGINES") == "required"
ENGINE_MODULES = ("celery", "rq", "distributed", "redis")

MODES = ("stock", "patched")
ANSIBLE_CORE = tuple(int(n) for n in re.findall(r"\d+", metadata.version("ansible-core"))[:2])
LIMIT = 15  # seconds: time limits, long enough for a job to reach its sleeps on a busy machine
SETTLE = 2.0  # seconds after the engine reports a task's end, before stock's job processes are counted
# Patched: the job is ended within about 2 s on an idle machine (TERM, then KILL after
# delayafterterminate); on a busy one the tree can take longer to exit. The test asserts that
# it does end, polling up to this bound, and the table shows how long it took.
PATCHED_SETTLE_LIMIT = 30.0
CONCURRENT = 16
FORK_WARNING = "may lead to deadlocks in the child"  # Python 3.12+: os.fork/forkpty in a threaded process
WARN_ENV = {"PYTHONWARNINGS": "always::DeprecationWarning"}  # shown wherever it is raised
CELERY_FLAGS = ["--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO"]


# --------------------------------------------------------------------------- results table
@dataclass
class Table:
    rows: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, scenario: str, mode: str, text: str) -> None:
        self.rows.setdefault(scenario, {})[mode] = text


TABLE = Table()


@pytest.fixture(scope="module", autouse=True)
def results_table(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the stock-vs-patched table after the module (job processes left 2 s after the end)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not TABLE.rows:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"task engines, Python {sys.version.split()[0]}: scenario | stock | patched")
        for scenario, cells in TABLE.rows.items():
            reporter.write_line(f"  {scenario} | {cells.get('stock', '-')} | {cells.get('patched', '-')}")


# --------------------------------------------------------------------------- services
_services: list[Service] = []


@contextlib.contextmanager
def services() -> Iterator[list[Service]]:
    """Services started in the block (add them to the list it gives): stopped at its end,
    and if it fails part way (a worker that does not come up) too."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for service in started:
            service.stop()
            _services.remove(service)


def start(group: list[Service], service: Service) -> Service:
    group.append(service)
    _services.append(service)
    return service


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """As tests/conftest.py's, except for the engines' own processes (a pool replaces a killed
    process; its services are stopped, tree and all, by their fixtures)."""
    before = procs.descendants()
    yield
    owned: set[int] = set()
    for service in _services:
        owned.update(service.tree())
    new = {p: s for p, s in procs.descendants().items() if p not in before and p not in owned}
    left = procs.wait_gone(new, 30.0)
    procs.kill_all(left)
    assert not left, f"test left processes running: {sorted(left)}"


def skip_or_fail(message: str) -> None:
    """Skip with ``message``; with RUNNER_SPAWN_ENGINES=required (CI), fail with it."""
    if REQUIRED:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def engines() -> None:
    """The ``engines`` extra is installed (the version matrix installs only ``test-base``)."""
    missing = [m for m in ENGINE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(f"task engines not installed ({', '.join(missing)}): pip install -e '.[engines]'")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def redis_url(engines: None, workdir: Path) -> Iterator[str]:
    """A redis-server of this module's own: free 127.0.0.1 port, own directory, no persistence."""
    if shutil.which("redis-server") is None:
        skip_or_fail(REDIS_ADVICE)
    with services() as group:
        _, url = start_redis(workdir / "redis", lambda service: start(group, service))
        yield url


@pytest.fixture
def job_root(tmp_path: Path) -> Iterator[Path]:
    """Where a test makes its jobs. Afterwards every process of those jobs that is still
    running (what stock leaves behind) is SIGKILLed by pid."""
    yield tmp_path
    for token in (p.name for p in tmp_path.iterdir() if p.is_dir()):
        procs.kill_all(jobs.job_processes(token))


def new_job(root: Path, playbook: str = jobs.OK_PLAYBOOK, hosts: int = 1) -> Path:
    return jobs.make_job(root, uuid.uuid4().hex, playbook, hosts)


def sleep_job(root: Path) -> Path:
    return new_job(root, jobs.SLEEP_PLAYBOOK, hosts=3)


class Watch:
    """Counts a job's processes (by its token) while the engine runs it."""

    def __init__(self, pdd: Path) -> None:
        self.token = pdd.name
        self.most = 0
        self.settled = 0.0

    def look(self) -> int:
        n = len(jobs.job_processes(self.token))
        self.most = max(self.most, n)
        return n

    def running(self) -> bool:
        """Whether the job has reached its 3 sleeps (ansible-playbook, 3 workers, 3 sleeps, ...)."""
        return self.look() >= 7

    def left_after_end(self, mode: str = "stock") -> int:
        """Job processes still running after the engine reported the end.

        Stock is counted SETTLE seconds after now; patched as soon as none is left, or after
        PATCHED_SETTLE_LIMIT seconds (the time taken is kept in ``settled``).
        """
        start = time.monotonic()
        deadline = start + (PATCHED_SETTLE_LIMIT if mode == "patched" else SETTLE)
        while self.look() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.settled = time.monotonic() - start
        return len(jobs.job_processes(self.token))


def check_left(scenario: str, mode: str, watch: Watch, left: int, state: str) -> None:
    """Record the outcome; patched must leave nothing."""
    when = f"after {SETTLE:.0f} s" if mode == "stock" else f"gone in {watch.settled:.1f} s"
    TABLE.record(scenario, mode, f"{left} left of {watch.most} ({state}, {when})")
    assert watch.most >= 7, f"{scenario}: the job never reached its sleeps ({watch.most} processes seen)"
    if mode == "patched":
        assert left == 0, f"{scenario}: {left} job processes still running {PATCHED_SETTLE_LIMIT} s after the end"


def check_ok(result: dict[str, Any], mode: str) -> None:
    """A successful job with all its events, started the way ``mode`` says."""
    assert result["status"] == "successful" and result["rc"] == 0
    assert result["events"][0] == "playbook_on_start" and result["events"][-1] == "playbook_on_stats"
    assert len([e for e in result["events"] if e == "runner_on_ok"]) == 3
    if mode == "patched":
        assert (result["spawn"], result["forks"]) == ("RunnerSpawn", 0)
    else:
        assert result["spawn"] == "pexpect.spawn" and result["forks"] >= 1


def check_fork_warning(mode: str, output: str) -> None:
    """Patched: never Python's fork DeprecationWarning. Stock on 3.12+: there it is."""
    if mode == "patched":
        assert FORK_WARNING not in output
    elif sys.version_info >= (3, 12):
        assert FORK_WARNING in output


# --------------------------------------------------------------------------- RQ
RQ_QUEUES = {"stock": "rq-stock", "patched": "rq-patched"}


@pytest.fixture(scope="module")
def rq_workers(redis_url: str, workdir: Path) -> Iterator[dict[str, Service]]:
    """``rq worker`` (stock) and tests/engines/rq_worker.py (patched), one queue each."""
    rq_cli = os.path.join(os.path.dirname(sys.executable), "rq")
    stock = [rq_cli, "worker", "-u", redis_url, RQ_QUEUES["stock"]]
    patched = ["-m", "tests.engines.rq_worker", redis_url, RQ_QUEUES["patched"]]
    with services() as group:
        workers = {
            "stock": start(group, Service("rq-stock", stock, workdir / "rq-stock.log")),
            "patched": start(group, python_service("rq-patched", patched, workdir / "rq-patched.log")),
        }
        for w in workers.values():
            w.wait_output("Listening on", 60)
        yield workers


def rq_queue(redis_url: str, mode: str) -> Queue:
    from redis import Redis
    from rq import Queue

    return Queue(RQ_QUEUES[mode], connection=Redis.from_url(redis_url))


RQ_ENDED = ("finished", "failed", "stopped", "canceled")  # rq.job.JobStatus values


def rq_wait(job: Job, timeout: float, watch: Watch | None = None) -> str:
    def ended() -> bool:
        if watch is not None:
            watch.look()
        return job.get_status(refresh=True) in RQ_ENDED

    wait_for(ended, timeout, f"RQ job {job.id} to end")
    return str(job.get_status().value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_rq_jobs_succeed(mode: str, redis_url: str, rq_workers: dict[str, Service], job_root: Path) -> None:
    q = rq_queue(redis_url, mode)
    queued = [q.enqueue(jobs.run_job, str(new_job(job_root))) for _ in range(3)]
    for job in queued:
        assert rq_wait(job, 90) == "finished", job.latest_result()
        check_ok(job.return_value(), mode)
    TABLE.record("RQ, 3 jobs", mode, "3/3 ok")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_rq_job_timeout(mode: str, redis_url: str, rq_workers: dict[str, Service], job_root: Path) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    job = rq_queue(redis_url, mode).enqueue(jobs.run_job, str(pdd), job_timeout=LIMIT)
    assert rq_wait(job, 90, watch) == "failed"
    left = watch.left_after_end(mode)
    result = job.latest_result()
    assert result is not None and "JobTimeoutException" in (result.exc_string or "")
    check_left(f"RQ job_timeout={LIMIT} (exception in the work horse)", mode, watch, left, "failed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_rq_stop_job(mode: str, redis_url: str, rq_workers: dict[str, Service], job_root: Path) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    from redis import Redis
    from rq.command import send_stop_job_command

    connection = Redis.from_url(redis_url)
    job = rq_queue(redis_url, mode).enqueue(jobs.run_job, str(pdd))
    wait_for(watch.running, 60, "the job's sleeps")
    send_stop_job_command(connection, job.id)
    assert rq_wait(job, 30, watch) == "stopped"
    left = watch.left_after_end(mode)
    check_left("RQ stop-job (work horse SIGKILLed)", mode, watch, left, "stopped")
    if mode == "stock":  # the horse's process group is killed; the job has a session of its own
        assert left > 0


# --------------------------------------------------------------------------- Celery
CELERY_MODULES = {
    ("prefork", "stock"): "tests.engines.celery_stock",
    ("prefork", "patched"): "tests.engines.celery_prefork",  # worker_process_init
    ("threads", "stock"): "tests.engines.celery_stock",
    ("threads", "patched"): "tests.engines.celery_tasks_module",  # install() at the top
}


@pytest.fixture(scope="module")
def celery_workers(redis_url: str, workdir: Path) -> Iterator[dict[tuple[str, str], Service]]:
    """Four workers, one queue each: prefork (1 process) and threads (16), stock and patched."""
    with services() as group:
        workers = {}
        for (pool, mode), module in CELERY_MODULES.items():
            queue = f"{pool}-{mode}"
            argv = ["-m", "celery", "-A", module, "worker", "-P", pool, "-Q", queue, "-n", f"{queue}@%h"]
            argv += ["-c", "1" if pool == "prefork" else str(CONCURRENT), *CELERY_FLAGS]
            env = {"ENGINE_BROKER_URL": redis_url, **WARN_ENV}
            log = workdir / f"celery-{queue}.log"
            workers[pool, mode] = start(group, python_service(f"celery-{queue}", argv, log, env))
        for w in workers.values():
            w.wait_output(" ready.", 60)
        yield workers


@pytest.fixture(scope="module")
def celery_client(redis_url: str) -> Iterator[Celery]:
    from celery import Celery

    app = Celery("engine-tests", broker=redis_url, backend=redis_url)
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()


def celery_send(app: Celery, pool: str, mode: str, *args: Any, **options: Any) -> AsyncResult:
    return app.send_task("run_playbook", args=list(args), queue=f"{pool}-{mode}", **options)


def celery_wait(result: AsyncResult, timeout: float, watch: Watch | None = None) -> str:
    def ended() -> bool:
        if watch is not None:
            watch.look()
        return bool(result.state in ("SUCCESS", "FAILURE", "REVOKED"))

    wait_for(ended, timeout, f"Celery task {result.id} to end")
    return str(result.state)


def celery_outcome(result: AsyncResult) -> str:
    value = result.result
    return f"{result.state} {type(value).__name__}" if isinstance(value, BaseException) else str(result.state)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_celery_time_limit(
    mode: str, celery_client: Celery, celery_workers: dict[tuple[str, str], Service], job_root: Path
) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    result = celery_send(celery_client, "prefork", mode, str(pdd), time_limit=LIMIT)
    assert celery_wait(result, 90, watch) == "FAILURE"
    left = watch.left_after_end(mode)
    check_left(f"Celery prefork, time_limit={LIMIT} (SIGTERM, SIGKILL)", mode, watch, left, celery_outcome(result))
    # The pool process was replaced; the replacement starts jobs the same way.
    after = celery_send(celery_client, "prefork", mode, str(new_job(job_root)))
    assert celery_wait(after, 90) == "SUCCESS", after.result
    check_ok(after.result, mode)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_celery_soft_time_limit(
    mode: str, celery_client: Celery, celery_workers: dict[tuple[str, str], Service], job_root: Path
) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    result = celery_send(celery_client, "prefork", mode, str(pdd), soft_time_limit=LIMIT, time_limit=4 * LIMIT)
    assert celery_wait(result, 90, watch) == "FAILURE"
    assert type(result.result).__name__ == "SoftTimeLimitExceeded"
    left = watch.left_after_end(mode)
    check_left(f"Celery prefork, soft_time_limit={LIMIT} (exception in Runner.run())", mode, watch, left, "FAILURE")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_celery_revoke_terminate(
    mode: str, celery_client: Celery, celery_workers: dict[tuple[str, str], Service], job_root: Path
) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    result = celery_send(celery_client, "prefork", mode, str(pdd))
    wait_for(watch.running, 60, "the job's sleeps")
    result.revoke(terminate=True)
    assert celery_wait(result, 30, watch) == "REVOKED"
    left = watch.left_after_end(mode)
    check_left("Celery prefork, revoke(terminate=True) (SIGTERM)", mode, watch, left, celery_outcome(result))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_celery_cancel_callback(
    mode: str, celery_client: Celery, celery_workers: dict[tuple[str, str], Service], job_root: Path
) -> None:
    pdd = sleep_job(job_root)
    watch = Watch(pdd)
    cancel = job_root / f"cancel-{pdd.name}"
    result = celery_send(celery_client, "prefork", mode, str(pdd), str(cancel))
    wait_for(watch.running, 60, "the job's sleeps")
    cancel.touch()
    assert celery_wait(result, 30, watch) == "FAILURE"
    assert "canceled" in str(result.result)  # the task checked r.status and raised
    left = watch.left_after_end(mode)
    check_left("Celery prefork, cancel_callback", mode, watch, left, "FAILURE JobFailed")
    if mode == "stock" and ANSIBLE_CORE >= (2, 19):
        assert left > 0  # stock SIGKILLs ansible-playbook's group; 2.19+ workers have sessions of their own


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", MODES)
def test_celery_threads_concurrent(
    mode: str, celery_client: Celery, celery_workers: dict[tuple[str, str], Service], job_root: Path
) -> None:
    results = [celery_send(celery_client, "threads", mode, str(new_job(job_root))) for _ in range(CONCURRENT)]
    for result in results:
        assert celery_wait(result, 200) == "SUCCESS", result.result
        check_ok(result.result, mode)
    check_fork_warning(mode, celery_workers["threads", mode].output())
    TABLE.record(f"Celery threads pool, {CONCURRENT} concurrent", mode, f"{CONCURRENT}/{CONCURRENT} ok")


# --------------------------------------------------------------------------- Dask
@pytest.fixture(scope="module")
def dask_clusters(engines: None, workdir: Path) -> Iterator[dict[str, tuple[Service, str]]]:
    """Two LocalClusters (processes=False, 16 worker threads), each in a process of its own."""
    argv = ["-m", "tests.engines.dask_cluster", str(CONCURRENT)]
    with services() as group:
        clusters = {}
        for mode in MODES:
            start(group, python_service(f"dask-{mode}", argv, workdir / f"dask-{mode}.log", WARN_ENV))
        for mode, service in zip(MODES, group):
            service.wait_output("scheduler tcp://", 90)
            address = re.search(r"scheduler (tcp://\S+)", service.output())
            assert address is not None
            clusters[mode] = (service, address.group(1))
        yield clusters


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", MODES)
def test_dask_threads_concurrent(mode: str, dask_clusters: dict[str, tuple[Service, str]], job_root: Path) -> None:
    from distributed import Client

    from tests.engines.dask_plugin import RunnerSpawnPlugin

    service, address = dask_clusters[mode]
    with Client(address, timeout=60) as client:
        if mode == "patched":
            client.register_plugin(RunnerSpawnPlugin())
        futures = [client.submit(jobs.run_job, str(new_job(job_root)), pure=False) for _ in range(CONCURRENT)]
        for result in client.gather(futures):
            check_ok(result, mode)
    check_fork_warning(mode, service.output())
    TABLE.record(f"Dask LocalCluster threads, {CONCURRENT} concurrent", mode, f"{CONCURRENT}/{CONCURRENT} ok")


# --------------------------------------------------------------------------- docs
SNIPPET_FILES = ["celery_prefork.py", "celery_tasks_module.py", "rq_worker.py", "dask_plugin.py"]


def snippet(name: str) -> str:
    text = (REPO / "tests" / "engines" / name).read_text()
    found = re.search(r"# --8<-- \[start:install\]\n(.*?)# --8<-- \[end:install\]\n", text, re.S)
    assert found is not None, f"{name}: no install snippet"
    return found.group(1).strip() + "\n"


@pytest.mark.parametrize("name", SNIPPET_FILES)
def test_docs_show_the_tested_snippets(name: str) -> None:
    docs = (REPO / "docs" / "engines.md").read_text()
    assert snippet(name) in docs, f"docs/engines.md must show tests/engines/{name}'s install snippet verbatim"


# --------------------------------------------------------------------------- examples/fleet
@pytest.mark.timeout(240)
def test_fleet_example(engines: None) -> None:
    if shutil.which("redis-server") is None:
        skip_or_fail(REDIS_ADVICE)
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "fleet" / "run.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "processes left: 0" in proc.stdout
