"""An RQ worker whose work horses start jobs with runner-spawn.

python -m tests.engines.rq_worker REDIS_URL QUEUE...
"""

from __future__ import annotations

# --8<-- [start:install]
from redis import Redis
from rq import Worker

import runner_spawn


def work(redis_url: str, queues: list[str]) -> None:
    runner_spawn.install()  # in the worker, before it forks: every work horse inherits it
    Worker(queues, connection=Redis.from_url(redis_url)).work()


# --8<-- [end:install]


if __name__ == "__main__":
    import sys

    work(sys.argv[1], sys.argv[2:])
