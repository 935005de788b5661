"""expect() for RunnerSpawn: a timeout that never cuts off output an exited child left.

pexpect's ``expect()``, ``expect_list()`` and ``expect_exact()`` build a plain
``Expecter`` and never call ``expect_loop()``; :class:`ExpectRouting` routes all of
them through :class:`_Expecter`, whose loop asks the spawn's output stream
(:meth:`runner_spawn._stream.OutputStream.ready`) before it gives up on a timeout,
and which bounds the unmatched output kept for ``before``.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from pexpect.exceptions import EOF, TIMEOUT
from pexpect.expect import Expecter, searcher_re, searcher_string
from pexpect.spawnbase import SpawnBase

if TYPE_CHECKING:
    _ExpecterBase = Expecter[Any]
else:
    _ExpecterBase = Expecter


class ExpectRouting:
    """Mixin for a pexpect spawn with an ``_output`` stream and a ``max_unmatched`` bound."""

    def _end_on_unwind(self) -> None:
        """Called when an exception other than EOF or TIMEOUT leaves an expect method.

        The spawn ends its job here (see ``RunnerSpawn``); it must never raise.
        """

    def expect(
        self,
        pattern: Any,
        timeout: float | None = -1,
        searchwindowsize: int | None = -1,
        async_: bool = False,
        **kw: Any,
    ) -> Any:
        """As pexpect's; any exception but EOF or TIMEOUT leaving it first ends the job."""
        base: Any = SpawnBase
        try:
            return base.expect(self, pattern, timeout, searchwindowsize, async_, **kw)
        except (EOF, TIMEOUT):
            raise
        except BaseException:
            self._end_on_unwind()
            raise

    def expect_loop(self, searcher: Any, timeout: float | None = -1, searchwindowsize: int | None = -1) -> int:
        """pexpect's expect loop; output the child already wrote is never cut by timeout.

        Any exception but EOF or TIMEOUT leaving it (a signal handler's, the
        ``logfile_read``'s) first ends the job through :meth:`_end_on_unwind`.
        """
        spawn: Any = self  # the spawn this class is mixed into
        try:
            if timeout == -1:
                timeout = spawn.timeout
            return _Expecter(spawn, searcher, searchwindowsize).expect_loop(timeout)
        except (EOF, TIMEOUT):
            raise
        except BaseException:
            self._end_on_unwind()
            raise

    # pexpect's expect(), expect_list() and expect_exact() build a plain Expecter and
    # never call expect_loop(); these two route them through it.
    def expect_list(
        self,
        pattern_list: Any,
        timeout: float | None = -1,
        searchwindowsize: int | None = -1,
        async_: bool = False,
        **kw: Any,
    ) -> Any:
        """As pexpect's (``expect()`` calls it), through :meth:`expect_loop`."""
        if async_ or kw:
            base: Any = SpawnBase
            return base.expect_list(self, pattern_list, timeout, searchwindowsize, async_, **kw)
        return self.expect_loop(searcher_re(pattern_list), timeout, searchwindowsize)

    def expect_exact(
        self,
        pattern_list: Any,
        timeout: float | None = -1,
        searchwindowsize: int | None = -1,
        async_: bool = False,
        **kw: Any,
    ) -> Any:
        """As pexpect's, through :meth:`expect_loop`."""
        state: Any = self  # the spawn; pexpect's private pattern helpers are not in its stubs
        if async_ or kw:
            base: Any = SpawnBase
            return base.expect_exact(self, pattern_list, timeout, searchwindowsize, async_, **kw)
        if isinstance(pattern_list, state.allowed_string_types) or pattern_list in (TIMEOUT, EOF):
            pattern_list = [pattern_list]
        patterns = []
        for pattern in pattern_list:
            if pattern in (TIMEOUT, EOF):
                patterns.append(pattern)
            elif isinstance(pattern, state.allowed_string_types):
                patterns.append(state._coerce_expect_string(pattern))
            else:
                state._pattern_type_err(pattern)
        return self.expect_loop(searcher_string(patterns), timeout, searchwindowsize)

    def _trim_unmatched(self) -> None:
        """Keep at most about ``2 * max_unmatched`` characters of unmatched output."""
        state: Any = self  # pexpect's Expecter keeps its buffers in these private fields
        limit = state.max_unmatched
        if limit is None or state._before.seek(0, io.SEEK_END) <= 2 * limit:
            return
        # The search window (_buffer) must stay a suffix of _before.
        keep = max(limit, state._buffer.seek(0, io.SEEK_END))
        tail = state._before.getvalue()[-keep:]
        state._before = state.buffer_type()
        state._before.write(tail)


class _Expecter(_ExpecterBase):
    """Expecter whose timeout never cuts off output that an exited child left behind.

    pexpect's loop counts the time ``logfile_read`` takes against the timeout, so a
    slow event handler made ``Runner.run()``'s final ``expect(EOF, timeout=5)``
    raise TIMEOUT with output still unread (ansible-runner issue 1343). Here a
    passed timeout ends the loop only when the stream is not ready
    (:meth:`OutputStream.ready`): while the child runs, or after its exit while
    another holder of the pipe may still write.
    """

    spawn: Any

    def expect_loop(self, timeout: float | None = -1) -> int:
        spawn = self.spawn
        end = None if timeout is None else time.monotonic() + timeout
        try:
            idx = self.existing_data()
            if idx is not None:
                return int(idx)
            while True:
                left = None if end is None else end - time.monotonic()
                if left is not None and left < 0 and not spawn._output.ready():
                    return int(self.timeout())
                spawn._trim_unmatched()
                incoming = spawn.read_nonblocking(spawn.maxread, None if left is None else max(left, 0.0))
                if spawn.delayafterread:
                    time.sleep(spawn.delayafterread)
                idx = self.new_data(incoming)
                if idx is not None:
                    return int(idx)
        except EOF as e:
            return int(self.eof(e))
        except TIMEOUT as e:
            return int(self.timeout(e))
        except BaseException:
            self.errored()
            raise
