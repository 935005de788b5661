"""The fleet's Celery app: one task that runs one playbook with ansible-runner.

Start a worker on any machine that reaches the broker (and has ansible and this file):

    FLEET_BROKER=redis://BROKER-HOST:6379/0 celery -A tasks worker -c 2

The playbook's text travels with the task, so workers need no shared files. Each job
runs in a private_data_dir of its own on the worker, against that worker's localhost.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import runner_spawn

runner_spawn.install()  # the worker imports this module before it starts its pool: every pool process has it

import ansible_runner  # noqa: E402
from celery import Celery  # noqa: E402

BROKER = os.environ.get("FLEET_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("fleet", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,  # a worker takes only the jobs it can start now
    task_acks_late=False,
)

#: Set in every process of a job (ansible-runner's env/envvars), so a host can find them.
JOB_VAR = "FLEET_JOB"


class PlaybookFailed(Exception):
    """The playbook did not succeed: Celery records the task as FAILURE."""


@app.task(name="fleet.run_playbook", bind=True)
def run_playbook(self: Any, name: str, playbook: str, hosts: int = 1) -> dict[str, Any]:
    """Run ``playbook`` (its text) against ``hosts`` localhost aliases on this worker."""
    pdd = Path(tempfile.mkdtemp(prefix=f"fleet-{name}-"))
    try:
        (pdd / "project").mkdir()
        (pdd / "inventory").mkdir()
        (pdd / "env").mkdir()
        (pdd / "project" / "site.yml").write_text(playbook)
        (pdd / "inventory" / "hosts").write_text(
            "".join(
                f"host{i} ansible_host=127.0.0.1 ansible_connection=local ansible_python_interpreter={sys.executable}\n"
                for i in range(hosts)
            )
        )
        (pdd / "env" / "envvars").write_text(f"{JOB_VAR}: {self.request.id}\n")
        started = time.monotonic()
        r = ansible_runner.run(private_data_dir=str(pdd), playbook="site.yml", quiet=True)
        # A run that was cancelled, timed out or failed returns normally: say so to Celery.
        # (Under a hard time_limit, the pool's SIGTERM becomes a Runner cancel: status "canceled".)
        if r.status != "successful":
            raise PlaybookFailed(f"{name}: playbook {r.status}, rc {r.rc}")
        return {
            "name": name,
            "status": r.status,
            "rc": r.rc,
            "events": sum(1 for _ in r.events),
            "seconds": round(time.monotonic() - started, 1),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
        }
    finally:
        shutil.rmtree(pdd, ignore_errors=True)
