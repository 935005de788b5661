"""A Dask LocalCluster whose worker runs tasks in threads; prints its address, runs until SIGTERM.

python -m tests.engines.dask_cluster THREADS
"""

from __future__ import annotations

import signal
import sys
import threading

from distributed import LocalCluster


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = int(sys.argv[1])
    with LocalCluster(
        processes=False,
        n_workers=1,
        threads_per_worker=threads,
        protocol="tcp",  # reachable from the test process (processes=False defaults to inproc://)
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        print(f"scheduler {cluster.scheduler_address}", flush=True)
        while not stop.wait(0.5):  # until the test stops us by pid
            pass


if __name__ == "__main__":
    main()
