"""The benchmark suite runs end to end in its quick mode and prints its table.

No timing is checked: the figures depend on the machine. What is checked is that
every implementation produced every figure, and that RunnerSpawn delivered all of
its output (a correctness property, not a speed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
IMPL_COLUMNS = ["pexpect.spawn", "PopenSpawn", "RunnerSpawn"]


def _table(stdout: str) -> list[list[str]]:
    lines = [line.strip() for line in stdout.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.timeout(90)
def test_quick_mode_prints_a_complete_table() -> None:
    proc = subprocess.run([sys.executable, str(RUN), "--quick"], capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table(proc.stdout)
    assert rows, proc.stdout
    assert rows[0][:4] == ["metric", *IMPL_COLUMNS]
    body = {r[0]: r for r in rows[2:]}
    expected = [
        "quiet CPU, child `sleep 10`, 1 job",
        "quiet CPU, child prints 1 line/s, 1 job",
        "output: throughput",
        "output: bytes lost",
        "output: supervisor peak RSS growth",
        "`/bin/true` spawn to close",
        "same, parent holds",
        "busy Python threads in parent",
    ]
    for prefix in expected:
        matches = [label for label in body if prefix in label]
        assert matches, f"no row for {prefix!r} in:\n{proc.stdout}"
        row = body[matches[0]]
        assert "n/a" not in row[1:4], f"a measurement is missing:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lost = body[next(label for label in body if "bytes lost" in label)]
    assert lost[3] == "0 (0)", proc.stdout
    assert '"error"' not in proc.stderr, proc.stderr[-3000:]  # a worker failed
    assert "Runner's own sink, no child" in proc.stdout, proc.stdout


TERMINATE_FLOOD = RUN.parent / "terminate_flood.py"


@pytest.mark.timeout(120)
def test_terminate_flood_quick_mode() -> None:
    """Every implementation is measured; RunnerSpawn gives Runner's statuses and no error."""
    args = [sys.executable, str(TERMINATE_FLOOD), "--quick", "--job-timeout", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {r[0]: r for r in _table(proc.stdout)[2:]}
    assert set(rows) == {"job_timeout, load 0", "cancel, load 0"}, proc.stdout
    for row in rows.values():
        assert row[3].endswith("ch)"), proc.stdout  # RunnerSpawn measured
        # Stock measured, or (on a busy machine) its known failure: Runner's final
        # expect(EOF, timeout=5) raising while the flood is handed over.
        assert row[1].endswith("ch)") or row[1].startswith("TIMEOUT"), proc.stdout
        assert row[2] == "host killed by SIGKILL", proc.stdout  # plain PopenSpawn shares its host's group
    assert "('timeout', 254)" in proc.stdout and "('canceled', 254)" in proc.stdout, proc.stdout


FLEET = RUN.parent / "fleet.py"


@pytest.mark.timeout(240)
def test_fleet_quick_mode() -> None:
    """Two concurrent playbooks per driver, stock and RunnerSpawn: every event delivered, every figure there."""
    args = [sys.executable, str(FLEET), "--quick", "--impls", "stock,runner_spawn"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = _table(proc.stdout)
    header = ["jobs", "driver", "implementation"]
    assert rows[0][:3] == header, proc.stdout
    body = [r for r in rows if r[0] == "2" and len(r) == 8]
    assert {(r[1], r[2]) for r in body} == {
        (driver, impl) for driver in ("threads", "asyncio") for impl in ("pexpect.spawn", "RunnerSpawn")
    }, proc.stdout
    for _, _, _, cpu, wall, delivered, p50, p99 in body:
        got, expected = delivered.split("/")
        assert got == expected and int(expected) == 2 * 15, proc.stdout  # 2 jobs, 15 events each, all successful
        assert cpu.endswith(" ms") and wall.endswith(" s") and "n/a" not in (p50, p99), proc.stdout
    ratios = [r for r in rows if r[0] == "2" and len(r) == 4]
    assert {r[1] for r in ratios} == {"threads", "asyncio"}, proc.stdout
