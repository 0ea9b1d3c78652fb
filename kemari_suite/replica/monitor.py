"""The secondary's watch over the primary: heartbeat timeout -> tiebreaker -> failover.

Also the standby's own heartbeat towards the primary (:func:`send_heartbeats`).

:class:`PrimaryWatch` runs beside the link for the agent's whole life. While the agent
is the standby, a primary silent for ``heartbeat_timeout_ms`` counts as lost; the
failover then runs only if the tiebreaker grants the takeover (one replication link
alone cannot tell a dead peer from a cut cable). Without a tiebreaker, or when it
refuses or cannot be reached, the watch says why (once per cause) and the standby
waits, for the primary to come back or for ``kemari failover``. An operator's command
or a planned switchover asks for the failover at once (:meth:`PrimaryWatch.request`).
A disk copy that records an older generation than the holder's is stale: the watch says
so and does not take over (:mod:`~kemari_suite.replica.generation`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kemari_suite.config import ReplicationConfig
from kemari_suite.errors import ConnectError, FailoverError
from kemari_suite.ha.tiebreak import Tiebreaker
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link
from kemari_suite.replica.generation import copy_staleness

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverRequest:
    """Why and when to fail over."""

    reason: str
    #: Wall time the heartbeat timeout expired (or the command arrived).
    detected: float
    tiebreak_ms: float = 0.0
    #: Asked for (operator command, switchover), not decided by the watch.
    operator: bool = False
    #: The generation the tiebreaker granted this host's takeover (None: no grant).
    generation: int | None = None


class PrimaryWatch:
    """Decides when the primary is lost and runs the failover; see the module docstring.

    ``standby()`` says whether the agent holds a committed checkpoint it may resume
    (the watch acts only then); ``fail_over(request)`` runs the failover; ``refused``
    gets the reason a failover did not happen. ``copy_generation()`` is the tiebreaker
    generation the disk copy records (None: none): a copy older than the holder's is
    stale, and the watch does not even ask for the takeover.
    """

    def __init__(
        self,
        rcfg: ReplicationConfig,
        witness: Tiebreaker | None,
        *,
        standby: Callable[[], bool],
        fail_over: Callable[[FailoverRequest], Awaitable[None]],
        refused: Callable[[str], None],
        copy_generation: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.timeout_s = rcfg.heartbeat_timeout_ms / 1000
        self.interval_s = rcfg.heartbeat_interval_ms / 1000
        self.use_tiebreaker = rcfg.tiebreaker != "none"
        self.witness = witness
        self._standby = standby
        self._fail_over = fail_over
        self._refused = refused
        self._copy_generation = copy_generation
        #: The generation of the last takeover the tiebreaker granted us.
        self.granted_generation: int | None = None
        self.last_rx = time.monotonic()
        self._now = asyncio.Event()
        self._asked = ""
        self._said = ""

    def heard(self) -> None:
        """A frame arrived from the primary."""
        self.last_rx = time.monotonic()

    def request(self, reason: str) -> None:
        """Fail over at once (operator command, planned switchover)."""
        self._asked = reason
        self._now.set()

    async def run(self) -> None:
        """Watch until a failover ran (or failed); cancel to stop."""
        while True:
            if await self._requested(self.interval_s / 2):
                self._now.clear()
                req = FailoverRequest(self._asked, time.time(), operator=True)
                if not await self._run(req):
                    return
                continue  # a switchover the tiebreaker refused: still the standby
            if not self._standby():
                continue
            silent = time.monotonic() - self.last_rx
            if silent < self.timeout_s:
                self._said = ""
                continue
            detected = time.time() - (silent - self.timeout_s)
            lost = f"no frame from the primary for {silent:.1f} s (timeout {self.timeout_s:.1f} s)"
            t0 = time.monotonic()
            why = await self._takeover_refusal()
            if why is None:
                continue
            if why:
                self._refuse(why, f"{lost}; {why}")
                continue
            # The loser stops its guest before its lease view runs out; give it one more
            # heartbeat interval of margin on top of the witness's own expiry.
            await asyncio.sleep(self.interval_s)
            tiebreak_ms = (time.monotonic() - t0) * 1e3
            req = FailoverRequest(lost, detected, tiebreak_ms, generation=self.granted_generation)
            if not await self._run(req):
                return

    async def _requested(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._now.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _run(self, req: FailoverRequest) -> bool:
        """Run the failover; True when the agent is still the standby afterwards."""
        try:
            await self._fail_over(req)
        except FailoverError as err:
            log.error("secondary: failover failed: %s", err)
            return False
        return self._standby()

    async def _takeover_refusal(self) -> str | None:
        """ "" when the tiebreaker grants the takeover, why not otherwise; None when
        there is nobody to ask (a tiebreaker is configured but not set up)."""
        if not self.use_tiebreaker:
            return "no tiebreaker: waiting for `kemari failover`"
        if self.witness is None:
            return None
        gen = self._copy_generation()
        if gen is not None:
            # Before the takeover: taking the lease for a copy that cannot resume would
            # only keep the holder from coming back.
            stale = await copy_staleness(self.witness, gen)
            if stale:
                return f"not taking over: {stale}"
        try:
            d = await self.witness.ask("takeover")
        except ConnectError as err:
            return f"witness unreachable: {err}: not failing over"
        if not d.granted:
            return f"tiebreaker refused: {d.reason}"
        self.granted_generation = d.generation
        return ""

    def _refuse(self, cause: str, reason: str) -> None:
        if cause != self._said:
            self._said = cause
            self._refused(reason)


async def send_heartbeats(link: Link, interval_s: float, state: Callable[[], str]) -> None:
    """Tell the primary this standby lives (and its state), every ``interval_s``, until
    the link fails or the task is cancelled."""
    seq = 0
    while True:
        await asyncio.sleep(interval_s)
        seq += 1
        try:
            await link.send(wire.Heartbeat(seq=seq, sent_ns=time.time_ns(), role_state=state()))
        except (ConnectionError, OSError):
            return


__all__ = ["FailoverRequest", "PrimaryWatch", "send_heartbeats"]
