"""The job's output as the spawn hands it over, and the rules for where it ends.

Three rules, one per way a job ends (the README's "End of output" states them as a
contract):

1. **The job exits by itself.** Everything it wrote is handed over, however slow the
   reader: after the exit, the pipe is read without a deadline until it is empty
   (at most one pipe's worth, since the child is gone). Other processes still holding
   the pipe (a background job, a forked copy of the host) then get ``drain_grace``
   seconds, counted from the exit, before the output is declared ended.
2. **The host ended the job** (``handle_runner_termination``, ``terminate()``). The
   rest is handed over in whole lines, for at most :data:`CUT_SECONDS` and
   :data:`CUT_CHARS` after the exit is seen; then the output ends. What is left is
   dropped at a line boundary and counted in :attr:`OutputStream.dropped`.
3. **The job is running.** Output is handed over as it arrives, in slices that end
   at a line end where the slice holds one; a caller's timeout is honoured between
   slices, and what is not handed over yet stays for the next call.

Once the child has exited, a read never reports a timeout while anything it wrote,
or the end of output, is ready (:meth:`OutputStream.ready`).
"""

from __future__ import annotations

import codecs
import logging
import time
from collections.abc import Callable
from typing import Any

from ._child import Child
from ._fds import pipe_capacity, unread_bytes, wait_readable

log = logging.getLogger("runner_spawn")

# Rule 2's bound. Stock ansible-runner SIGKILLs the job and then reads its PTY until
# EIO; measured on `yes` ended by job_timeout or cancel, it hands over 0 further bytes
# and Runner.run() returns 0.1 s after the kill. The same job on a pipe leaves a full
# pipe (64 KiB of "y\n", 32k lines, 32k events and event files: 3 s idle, over 5 s
# loaded, enough to run out Runner's final expect(EOF, timeout=5)). A quarter second
# keeps what a cancelled job wrote last (its last lines are usually the reason it was
# cancelled) and stays within stock's time plus 0.5 s; one pipe's worth of characters
# bounds it for a fast reader. Handing over small slices of whole lines keeps a slow
# sink from running past the budget by more than one slice.
#: Seconds of output handed over after the host ended the job and it exited.
CUT_SECONDS = 0.25
#: Characters (bytes without an encoding) handed over after the host ended the job.
CUT_CHARS = 1 << 16
#: At most this much is handed over at once under rule 2 (whole lines), so that the
#: budget is checked often even with a slow ``logfile_read``.
CUT_SLICE = 512


class OutputStream:
    """The output of one job (a :class:`~runner_spawn._child.Child`), read in chunks.

    ``read_chunk(fd)`` makes one read of the child's output fd and returns b"" at its
    end (a terminal spawn maps EIO to b""). It must not hold a reference to the spawn
    that owns this stream (a plain function, not a bound method): the spawn would then
    be freed only by a cyclic collection, not when its last reference goes, and a job
    whose spawn was dropped would run on until then. ``encoding`` None hands over bytes.
    """

    def __init__(
        self,
        child: Child,
        read_chunk: Callable[[int], bytes],
        encoding: str | None,
        codec_errors: str,
        drain_grace: float,
    ) -> None:
        self._child = child
        self._read_chunk = read_chunk
        self._decoder = None if encoding is None else codecs.getincrementaldecoder(encoding)(codec_errors)
        self._empty: Any = b"" if encoding is None else ""
        self._newline: Any = b"\n" if encoding is None else "\n"
        self.drain_grace = drain_grace
        self._buf: Any = self._empty  # decoded output not handed over yet, from _pos on
        self._pos = 0
        self._pipe_eof = False  # the pipe reported its end (every writer closed it)
        self._ended = False  # no more output: the pipe is done and _buf holds the rest
        self._exit_seen_at: float | None = None
        self._owed = 0  # bytes an exited child may still have in the pipe (rule 1)
        self._cut_at: float | None = None  # rule 2's deadline, set when it begins
        self._cut_left = CUT_CHARS
        #: What rule 2 did not hand over: characters already read (bytes without an
        #: encoding) plus bytes still unread in the pipe.
        self.dropped = 0

    # --- state ---------------------------------------------------------------------

    def note_exit(self) -> None:
        """The child has exited: from now on the pipe holds all it will ever write."""
        if self._exit_seen_at is None:
            self._exit_seen_at = time.monotonic()
            self._owed = pipe_capacity(self._child.stdout_fd)

    def _exit_time(self) -> float | None:
        """When the child's exit was first seen; None while it runs."""
        if self._exit_seen_at is None and self._child.has_exited(0):
            self.note_exit()
        return self._exit_seen_at

    def _cut_deadline(self) -> float | None:
        """Rule 2's deadline once it applies (the host ended the job and it exited), else None."""
        if self._cut_at is None and self._child.ended_by_host and self._exit_time() is not None:
            self._cut_at = time.monotonic() + CUT_SECONDS
        return self._cut_at

    def _pending(self) -> bool:
        return self._pos < len(self._buf)

    def ready(self) -> bool:
        """True when :meth:`take` can return without waiting for a running job.

        Always False while the child runs (a caller's timeout then ends the wait,
        and pending output stays for the next call). After the exit: True while
        output is pending, on the pipe (data or hangup), or its end is due.
        """
        exit_time = self._exit_time()
        if exit_time is None:
            return False
        if self._pending() or self._ended or self._pipe_eof or self._cut_deadline() is not None:
            return True  # under rule 2 the end is at most CUT_SECONDS away
        if time.monotonic() >= exit_time + self.drain_grace:
            return True
        return bool(wait_readable([self._child.stdout_fd], 0))

    # --- reading -------------------------------------------------------------------

    def take(self, size: int, timeout: float | None) -> Any:
        """The next chunk of output (at most about ``size``); empty at the end; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        limit: float | None  # how long the pipe may be waited on in this round
        while True:
            cut_at = self._cut_deadline()
            if cut_at is not None:
                if time.monotonic() >= cut_at or self._cut_left <= 0:
                    return self._cut()
                chunk = self._take_lines(min(size, CUT_SLICE))
                if chunk:
                    return chunk
                if self._ended:
                    return self._cut()
                limit = cut_at  # bounded by the budget, whatever the caller's timeout
            elif self._pending():
                return self._take_slice(size)
            elif self._ended:
                return self._empty
            else:
                limit = deadline
            data = self._read_pipe(limit)
            if data is None:
                if cut_at is not None:
                    continue  # the budget is spent: the loop's top cuts
                return None
            self._append(data)

    def _append(self, data: bytes) -> None:
        final = not data
        text = data if self._decoder is None else self._decoder.decode(data, final)
        if final:
            self._ended = True
        if text:
            self._buf = self._buf[self._pos :] + text
            self._pos = 0

    def _take_slice(self, size: int) -> Any:
        """Rule 3: up to ``size``, ending at the slice's last line end when more follows."""
        start, end = self._pos, min(self._pos + size, len(self._buf))
        if end < len(self._buf):
            line_end = self._buf.rfind(self._newline, start, end)
            if line_end >= 0:
                end = line_end + 1
        self._pos = end
        return self._buf[start:end]

    def _take_lines(self, size: int) -> Any:
        """Rule 2: whole lines, up to ``size`` (or one longer line) within the budget; or empty."""
        start = self._pos
        stop = min(len(self._buf), start + self._cut_left)
        line_end = self._buf.rfind(self._newline, start, min(stop, start + size))
        if line_end < 0:
            line_end = self._buf.find(self._newline, start, stop)
        if line_end < 0:
            return self._empty
        self._pos = line_end + 1
        self._cut_left -= self._pos - start
        return self._buf[start : self._pos]

    def _cut(self) -> Any:
        """End rule 2: drop what is left (from a line start) and end the output."""
        left = len(self._buf) - self._pos
        if not self._pipe_eof:
            left += unread_bytes(self._child.stdout_fd)
        self._buf, self._pos, self._ended, self._pipe_eof = self._empty, 0, True, True
        if left:
            self.dropped += left
            log.info("pid %d was ended: %d characters of its last output not handed over", self._child.pid, left)
        return self._empty

    def _read_pipe(self, deadline: float | None) -> bytes | None:
        """Bytes from the pipe; b"" at the end of output; None once ``deadline`` passed."""
        child = self._child
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._exit_seen_at is None:
                fds = [child.exit_fd] if self._pipe_eof else [child.stdout_fd, child.exit_fd]
                ready = wait_readable(fds, left)
                if child.stdout_fd in ready:
                    data = self._read_chunk(child.stdout_fd)
                    if data:
                        return data
                    self._pipe_eof = True  # the child may live on with its output closed
                if child.exit_fd in ready:
                    self.note_exit()
                elif not ready:
                    return None
                continue
            if self._pipe_eof:
                return b""
            # Rule 1: what the child wrote (at most one pipe's worth) is read without a
            # deadline; other writers get until drain_grace after the exit.
            wait = 0.0
            if self._owed <= 0:
                grace_left = self._exit_seen_at + self.drain_grace - time.monotonic()
                if grace_left <= 0:
                    log.debug("pid %d exited; another process still holds its output pipe open", child.pid)
                    return b""
                wait = grace_left if left is None else min(grace_left, left)
            if wait_readable([child.stdout_fd], wait):
                data = self._read_chunk(child.stdout_fd)
                if not data:
                    self._pipe_eof = True
                    return b""
                self._owed -= len(data)
                return data
            if self._owed > 0:
                self._owed = 0  # the pipe is empty: everything the child wrote is read
            elif deadline is not None and time.monotonic() >= deadline:
                return None
