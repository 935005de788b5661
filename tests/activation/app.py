"""A program that starts ansible-runner jobs from a thread pool and knows nothing of runner-spawn.

usage: python app.py RESULT_JSON PRIVATE_DATA_DIR...

Runs ``site.yml`` of each private data dir, three at a time, then writes its pid,
the spawn class ansible-runner used and each job's status, rc and event names.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ansible_runner


def job(pdd: str) -> dict[str, Any]:
    r = ansible_runner.run(private_data_dir=pdd, playbook="site.yml", quiet=True)
    return {"pdd": pdd, "status": r.status, "rc": r.rc, "events": [e["event"] for e in r.events]}


def main() -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(job, sys.argv[2:]))
    spawn = ansible_runner.runner.pexpect.spawn
    report = {"pid": os.getpid(), "spawn": f"{spawn.__module__}.{spawn.__qualname__}", "results": results}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
