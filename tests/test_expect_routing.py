"""expect() and expect_exact() go through RunnerSpawn's own expect loop.

pexpect's expect()/expect_list()/expect_exact() build a plain Expecter and never
call the spawn's expect_loop(), so without RunnerSpawn's overrides the bound on
unmatched output and the "already written output is never cut by timeout" rule
would apply to expect_loop() callers only, not to Runner.run().
"""

from __future__ import annotations

import sys
import time

import pexpect
import pytest

from runner_spawn import RunnerSpawn


class SlowSink:
    """A logfile_read that takes ``delay`` seconds per write, as a slow event handler."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.text: list[str] = []

    def write(self, text: str) -> None:
        self.text.append(text)
        time.sleep(self.delay)

    def flush(self) -> None:
        pass


def test_expect_keeps_unmatched_output_bounded() -> None:
    size, limit = 6 << 20, 1 << 20
    child = RunnerSpawn("head", ["-c", str(size), "/dev/zero"], encoding="utf-8", max_unmatched=limit)
    try:
        assert child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=30, searchwindowsize=100) == 1
        assert len(child.before) <= 2 * limit + child.maxread
    finally:
        child.close()


@pytest.mark.parametrize("method", ["expect", "expect_exact"])
def test_final_expect_is_not_cut_by_a_slow_sink(method: str) -> None:
    # 40 KB fits in the pipe, so the child exits at once; reading it 1000 characters
    # at a time through a sink that takes 10 ms per write needs ~0.4 s > timeout.
    code = "import sys; sys.stdout.write('x' * 40000)"
    child = RunnerSpawn(sys.executable, ["-c", code], encoding="utf-8", maxread=1000)
    try:
        child.wait()
        sink = SlowSink(0.01)
        child.logfile_read = sink
        assert getattr(child, method)(pexpect.EOF, timeout=0.1) == 0
        assert len("".join(sink.text)) == 40000
    finally:
        child.close()


def test_no_sleep_after_each_read() -> None:
    # pexpect's default (0.1 ms after every read) cost milliseconds per read under load.
    child = RunnerSpawn("true")
    try:
        assert child.delayafterread is None
    finally:
        child.close()
