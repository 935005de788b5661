"""Celery tasks with runner-spawn installed at the top of the tasks module (any pool)."""

from __future__ import annotations

# --8<-- [start:install]
import runner_spawn

runner_spawn.install()  # the worker imports its tasks modules before it starts the pool
# --8<-- [end:install]

from typing import Any  # noqa: E402

from tests.engines.celery_app import make_app  # noqa: E402
from tests.engines.jobs import run_job  # noqa: E402

app = make_app(__name__)


@app.task(name="run_playbook")
def run_playbook(pdd: str, cancel_file: str | None = None) -> dict[str, Any]:
    return run_job(pdd, cancel_file)
