"""Celery tasks for a prefork pool: runner-spawn installed in each pool process."""

from __future__ import annotations

# --8<-- [start:install]
from celery.signals import worker_process_init

import runner_spawn


@worker_process_init.connect
def install_runner_spawn(**kwargs: object) -> None:
    runner_spawn.install()  # in each pool process as it starts, replacements included


# --8<-- [end:install]


from typing import Any  # noqa: E402

from tests.engines.celery_app import make_app  # noqa: E402
from tests.engines.jobs import run_job  # noqa: E402

app = make_app(__name__)


@app.task(name="run_playbook")
def run_playbook(pdd: str, cancel_file: str | None = None) -> dict[str, Any]:
    return run_job(pdd, cancel_file)
