"""A short, bounded run of the concurrency soak (benchmarks/soak.py) against real playbooks."""

from __future__ import annotations

import sys

import pytest

from tests.test_fork_safety import load_benchmark

soak = load_benchmark("soak")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux /proc")
@pytest.mark.timeout(240)
def test_short_soak_loses_nothing_and_leaves_nothing() -> None:
    report = soak.run_soak(in_flight=8, duration=15, slow_delay=0.1, job_timeout=3, hang_after=150)
    print(report.text())
    # The first 8 jobs cover every kind: plain, slow handler, cancelled, timed out.
    assert set(report.by_kind) == set(soak.KINDS), report.by_kind
    assert report.jobs_completed >= 8
    assert report.hangs == 0, report.problems
    assert report.wrong_status == 0, report.problems
    assert report.events_lost == 0, report.problems
    assert report.events_delivered > 0
    assert report.processes_left == 0, report.problems
    assert report.fds_after == report.fds_before
    assert report.threads_after == report.threads_before
