"""A short, bounded run of the concurrency soak (benchmarks/soak.py) against real playbooks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import bench

soak = bench.load("soak")


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


@pytest.mark.skipif(sys.platform != "linux", reason="Linux /proc")
def test_soak_check_counts_lost_events(tmp_path: Path, patched: None) -> None:
    job = soak.Job(0, "plain", tmp_path, slow_delay=0.0, job_timeout=3)
    result = job.run(pexpect_timeout=1.0)
    assert (result.status, result.lost, result.problems) == ("successful", 0, [])
    assert result.events == soak.QUICK_EVENTS

    # One event the handler never saw, and one ansible announced in a partial file only.
    job.events.pop(len(job.events) // 2)
    events_dir = job.pdd / "artifacts" / "soak" / "job_events"
    (events_dir / "00000000-0000-0000-0000-000000000000-partial.json").write_text("{}")
    result = job.check("successful", 0, 1.0)
    assert result.lost == 2, result.problems  # the popped event (a counter gap, an artifact unseen), the partial
    assert any("counters missing" in p for p in result.problems)

    job.events.pop()  # playbook_on_stats
    assert "playbook_on_stats is not the last event" in job.check("successful", 0, 1.0).problems
