"""The secondary's account of the connections its listener refused before a Link.

A wrong key, a relay or a TLS mismatch (a *bad Hello*) is the operator's business: it
deserves an error line. Scans, floods and timeouts are not worth a line each (debug).
A stream of bad Hellos (a misconfigured primary retrying every second, or somebody
trying keys) must not flood the log either::

    first bad Hello after a quiet interval   -> error line (peer and why)
    further bad Hellos within the interval   -> debug lines, counted
    end of an interval that left some out    -> one error line: how many, the latest
    end of an interval that left none out    -> quiet again (the next one is a first)

:class:`RejectLog` decides, given the clock (no I/O); :class:`RejectLogger` is the thin
driver the listener calls (``on_reject``), with a timer so that the summary is written
even when the stream stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kemari_suite.errors import AuthError

#: At most one summary line of bad Hellos per this many seconds.
REJECT_LOG_INTERVAL_S = 60.0

#: A line to log: (logging level, text).
Line = tuple[int, str]


def bad_hello(err: Exception) -> bool:
    """A refusal the operator must hear of: a wrong key or a relay (``AuthError``), or a
    TLS setting that differs between the hosts."""
    return isinstance(err, AuthError) or "replication.tls" in str(err)


class RejectLog:
    """Which refused connections get an error line; see the module docstring. Pure:
    every call is given the time (monotonic seconds).

    Raises:
        ValueError: ``interval_s`` is not positive.
    """

    def __init__(self, interval_s: float = REJECT_LOG_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("the reject log interval must be positive")
        self.interval_s = interval_s
        #: Bad Hellos left out of the error log since the last error line.
        self.suppressed = 0
        #: End of the current interval (None: quiet, the next bad Hello is a first).
        self.next_tick: float | None = None
        self._latest = ""

    def refused(self, now: float, peer: str, err: Exception) -> list[Line]:
        """The lines for one refused connection (a summary of the interval just over
        may come first)."""
        text = f"refused {peer}: {err}"
        if not bad_hello(err):
            return [(logging.DEBUG, text)]
        lines: list[Line] = []
        summary = self.tick(now)
        if summary is not None:
            lines.append(summary)
        if self.next_tick is None:
            self.next_tick = now + self.interval_s
            lines.append((logging.ERROR, text))
        else:
            self.suppressed += 1
            self._latest = text
            lines.append((logging.DEBUG, f"{text} (not logged as an error: rate-limited)"))
        return lines

    def tick(self, now: float) -> Line | None:
        """The summary line of the interval that ended by ``now`` (None: it has not
        ended, or it left nothing out, which ends the episode)."""
        if self.next_tick is None or now < self.next_tick:
            return None
        if not self.suppressed:
            self.next_tick = None
            return None
        line = (
            logging.ERROR,
            f"refused {self.suppressed} more connections (wrong key, relay or TLS "
            f"mismatch) in the last {self.interval_s:.0f} s; the latest: {self._latest}",
        )
        self.suppressed = 0
        self.next_tick = now + self.interval_s
        return line


class RejectLogger:
    """``on_reject`` for the replication listener: writes :class:`RejectLog`'s lines to
    ``logger``. Called inside an event loop, it also sets a timer for the summary (so a
    stream that stops is still summarized); :meth:`close` cancels it."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REJECT_LOG_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "secondary: ",
    ) -> None:
        self.log = RejectLog(interval_s)
        self.logger = logger
        self.clock = clock
        self.prefix = prefix
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, peer: str, err: Exception) -> None:
        for level, text in self.log.refused(self.clock(), peer, err):
            self.logger.log(level, "%s%s", self.prefix, text)
        self._arm()

    def _arm(self) -> None:
        due = self.log.next_tick
        if due is None or self._timer is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: summaries come lazily
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        line = self.log.tick(self.clock())
        if line is not None:
            self.logger.log(line[0], "%s%s", self.prefix, line[1])
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["REJECT_LOG_INTERVAL_S", "RejectLog", "RejectLogger", "bad_hello"]
