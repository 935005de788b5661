"""Runner's own output handling, without any child: the ceiling it puts on throughput.

Feeds the first ``size`` bytes of a file, in 64 KiB chunks, to the sink Runner.run()
installs as ``logfile_read`` (``OutputEventFilter`` calling ``Runner.event_callback``,
which writes one job_events JSON file per line of plain output), in this fresh
process. Prints one JSON object: characters per CPU-second and per wall-second.

Usage: ``python benchmarks/runner_sink.py FILE SIZE``. run.py starts it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from ansible_runner.config.runner import RunnerConfig
    from ansible_runner.runner import Runner
    from ansible_runner.utils import OutputEventFilter

    path, size = sys.argv[1], int(sys.argv[2])
    with open(path) as f:
        data = f.read(size)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    with tempfile.TemporaryDirectory(prefix="rs-bench-sink-") as tmp:
        (Path(tmp) / "project").mkdir()
        (Path(tmp) / "project" / "site.yml").write_text("- hosts: all\n  tasks: []\n")
        config = RunnerConfig(private_data_dir=tmp, playbook="site.yml", quiet=True)
        config.prepare()
        runner = Runner(config)
        events_dir = Path(config.artifact_dir) / "job_events"
        events_dir.mkdir(parents=True, exist_ok=True)
        with open(os.devnull, "w") as stdout:
            sink = OutputEventFilter(stdout, runner.event_callback, suppress_ansible_output=True)
            c0, w0 = time.process_time(), time.perf_counter()
            for chunk in chunks:
                sink.write(chunk)
            c1, w1 = time.process_time(), time.perf_counter()
        events = len(os.listdir(events_dir))
    print(
        json.dumps(
            {
                "mb": len(data) / 1e6,
                "mb_per_cpu_s": len(data) / 1e6 / (c1 - c0),
                "mb_per_s": len(data) / 1e6 / (w1 - w0),
                "events": events,
            }
        )
    )


if __name__ == "__main__":
    main()
