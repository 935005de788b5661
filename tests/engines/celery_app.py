"""A Celery app on the test's redis-server (ENGINE_BROKER_URL), shared by the task modules."""

from __future__ import annotations

import os

from celery import Celery


def make_app(main: str) -> Celery:
    url = os.environ.get("ENGINE_BROKER_URL", "redis://127.0.0.1:6379/0")
    app = Celery(main, broker=url, backend=url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,  # a worker takes only the tasks it can start
        task_track_started=True,
        result_extended=True,
        worker_hijack_root_logger=False,
    )
    return app
