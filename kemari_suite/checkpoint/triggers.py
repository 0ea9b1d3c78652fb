"""What starts a sync point: the taps' policy, a request, or the maximum interval.

Requests (an API call, the ``checkpoint`` command, a switchover, a stopping guest, a
lost link) are coalesced: several before the next sync point make one, named after
the latest. The taps' policy (:class:`~kemari_suite.tap.policy.SyncScheduler`) says
when an I/O event makes a sync point due.
"""

from __future__ import annotations

import asyncio
import time

from kemari_suite.tap.policy import SyncScheduler


class Triggers:
    """Waits for the next reason to take a sync point."""

    def __init__(self, sched: SyncScheduler) -> None:
        self.sched = sched
        self._requested = asyncio.Event()
        self._reason = "api"

    def request(self, reason: str) -> None:
        """Ask for a sync point (or wake the loop) now."""
        self._reason = reason
        self._requested.set()

    def clear(self) -> None:
        self._requested.clear()

    async def wait_until(self, when: float) -> str | None:
        """Wait until ``when`` (monotonic) for a trigger; its name, or None at ``when``."""
        if self._requested.is_set():
            self._requested.clear()
            return self._reason
        timeout = max(0.0, when - time.monotonic())
        due = asyncio.ensure_future(self.sched.wait_due(timeout=timeout))
        req = asyncio.ensure_future(self._requested.wait())
        try:
            done, _ = await asyncio.wait(
                {due, req}, timeout=timeout + 0.05, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (due, req):
                t.cancel()
        if req in done:
            self._requested.clear()
            return self._reason
        if due in done and not due.cancelled() and due.result() is not None:
            return f"policy:{due.result()}"
        return None


__all__ = ["Triggers"]
