"""File descriptors: close-on-exec pipes above fd 2, and waiting in poll()."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import termios
from collections.abc import Sequence

_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_SIZE_FALLBACK = 1 << 20


def _high_fd(fd: int) -> int:
    """Return ``fd`` moved to 3 or above (close-on-exec), so dup2 onto 0-2 never aliases."""
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose ends are both fd 3 or above."""
    r, w = os.pipe()
    try:
        r = _high_fd(r)
    except BaseException:
        os.close(w)
        raise
    try:
        w = _high_fd(w)
    except BaseException:
        os.close(r)
        raise
    return r, w


def close_fd(fd: int) -> None:
    """Close ``fd`` if it is one (>= 0), ignoring errors."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def pipe_capacity(fd: int) -> int:
    """Bytes the pipe behind ``fd`` can hold (what a writer can have left in it)."""
    try:
        return max(int(fcntl.fcntl(fd, _F_GETPIPE_SZ)), 4096)
    except OSError:
        return _PIPE_SIZE_FALLBACK


def wait_readable(fds: Sequence[int], timeout: float | None) -> set[int]:
    """Sleep in poll() until one of ``fds`` is readable or ``timeout`` seconds pass."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    while True:
        try:
            return {fd for fd, _ in poller.poll(ms)}
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue


def unread_bytes(fd: int) -> int:
    """Bytes waiting to be read from the pipe or terminal behind ``fd`` (0 if unknown)."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])
