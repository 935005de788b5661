"""An RQ worker whose work horses start jobs with runner-spawn.

    python -m tests.engines.rq_worker REDIS_URL QUEUE...
"""

# --8<-- [start:install]
import sys

from redis import Redis
from rq import Worker

import runner_spawn

runner_spawn.install()  # in the worker, before it forks: every work horse inherits it
Worker(sys.argv[2:], connection=Redis.from_url(sys.argv[1])).work()
# --8<-- [end:install]
