"""Celery tasks without runner-spawn: ansible-runner's stock pexpect.spawn."""

from __future__ import annotations

from typing import Any

from tests.engines.celery_app import make_app
from tests.engines.jobs import run_job

app = make_app(__name__)


@app.task(name="run_playbook")
def run_playbook(pdd: str, cancel_file: str | None = None) -> dict[str, Any]:
    return run_job(pdd, cancel_file)
