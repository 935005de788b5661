"""Drive a spawn the way ansible_runner.Runner.run() does (shared by the spawn tests)."""

from __future__ import annotations

import io
from typing import Any

import pexpect

#: What Runner.run() passes to pexpect.spawn.
RUNNER_KW: dict[str, Any] = dict(
    ignore_sighup=True, encoding="utf-8", codec_errors="replace", echo=False, use_poll=True
)


def drive(child: Any, passwords: dict[str, str] | None = None) -> Any:
    """Drive ``child`` as Runner.run() does; return what logfile_read received."""
    sink: Any = io.BytesIO() if child.encoding is None else io.StringIO()
    child.logfile_read = sink
    patterns: list[object] = [*(passwords or {}), pexpect.TIMEOUT, pexpect.EOF]
    values = [*(passwords or {}).values(), None, None]
    while child.isalive():
        idx = child.expect(patterns, timeout=5, searchwindowsize=100)
        if values[idx] is not None:
            child.sendline(values[idx])
    child.expect(pexpect.EOF, timeout=5)
    child.close()
    return sink.getvalue()
