"""A Dask worker plugin that installs runner-spawn in every worker, present and future."""

from __future__ import annotations

# --8<-- [start:install]
from distributed import Worker, WorkerPlugin

import runner_spawn


class RunnerSpawnPlugin(WorkerPlugin):
    def setup(self, worker: Worker) -> None:
        runner_spawn.install()


# client.register_plugin(RunnerSpawnPlugin())
# --8<-- [end:install]
