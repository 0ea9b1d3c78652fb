"""HELD, bounded: output held with no peer, and the operator's way out.

::

    HELD ─ every held write ─► held bytes >= replication.held_limit_mib ─► stop the guest
                                                                            + alert
    HELD ─ `kemari release --solo` ─► tell the tiebreaker (if any) ─► UNPROTECTED: held
          output released, writes go through, a paused guest resumed, alert
    HELD ─ a secondary is back ─► SYNCING: the held writes are applied, the guest resumed

In HELD (no tiebreaker, the secondary gone) nothing is acknowledged, so every guest write
stays in memory in the open epoch. Without a bound that grows until the agent is
OOM-killed, taking the guest with it. Pausing the guest at the bound keeps everything
it wrote (nothing is dropped or released unsafely) and asks the operator to choose:
wait for the secondary, or ``kemari release --solo``.

Held bytes are the block tap's logged write data plus the frames the network tap holds.
The check runs on each I/O event the taps report (on the event loop, no I/O), so the
bound is overshot by at most the writes in flight when ``stop`` drains them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from kemari_suite.alerts import AlertKind
from kemari_suite.checkpoint import loss
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.checkpoint.window import QMPTimeout
from kemari_suite.errors import ReplicationError
from kemari_suite.tap.events import IOEvent

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

log = logging.getLogger(__name__)


class HeldBound:
    """Pauses the guest when the output held in HELD reaches the bound; releases it on
    the operator's word."""

    def __init__(self, agent: PrimaryAgent, limit_bytes: int) -> None:
        self.agent = agent
        self.limit_bytes = limit_bytes
        #: The guest is stopped because of the bound (until released or re-protected).
        self.paused = False
        self._pausing: asyncio.Task[None] | None = None

    def held_bytes(self) -> int:
        """Write data logged and frames held, not yet released to the outside."""
        io = self.agent.io
        if io is None:
            return 0
        held = io.block.log.pending_bytes() if io.block is not None else 0
        if io.net is not None:
            held += io.net.stats.held_bytes
        return held

    def on_io(self, kind: IOEvent, epoch: int) -> None:
        """The taps' event sink (beside the sync policy): pause at the bound in HELD."""
        if self.agent.state is not PrimaryState.HELD or self.paused:
            return
        held = self.held_bytes()
        if held < self.limit_bytes:
            return
        self.paused = True
        self._pausing = asyncio.ensure_future(self._pause(held))

    async def _pause(self, held: int) -> None:
        a = self.agent
        assert a.window is not None
        reason = (
            f"output held with no secondary reached {held} bytes "
            f"(replication.held_limit_mib = {self.limit_bytes >> 20}): the guest is paused; "
            "run `kemari release --solo` to go on unprotected, or bring the secondary back"
        )
        log.error("%s", reason)
        try:
            await a.window.qmp("stop")
        except QMPTimeout as err:
            await self._host_failure(f"pausing at the held bound: {err}")
            return
        except Exception as err:
            log.error("pausing the guest at the held bound failed: %s", err)
            self.paused = False
            return
        a.artifacts.event("held-limit", reason=reason, held_bytes=held, limit=self.limit_bytes)
        alert(a, reason, held_bytes=held, limit_bytes=self.limit_bytes)

    async def _host_failure(self, why: str) -> None:
        try:
            await loss.host_failure(self.agent, why)
        except Exception as err:  # FailoverError: the run loop learns it from the state
            log.error("%s", err)

    async def resume(self, why: str) -> None:
        """Resume a guest the bound paused (its held writes are no longer in memory).

        A ``cont`` refused because the guest stopped itself (powered off, panicked) leaves
        it down: that is the guest's event, not a failure.

        Raises:
            FailoverError: QEMU did not answer ``cont``: killed, a host failure.
        """
        if self._pausing is not None:
            await asyncio.gather(self._pausing, return_exceptions=True)
            self._pausing = None
        if not self.paused:
            return
        a = self.agent
        assert a.window is not None
        try:
            await a.window.qmp("cont")
        except Exception as err:
            status = "" if isinstance(err, QMPTimeout) else await a.window.self_stopped()
            if not status:
                await loss.host_failure(a, f"resuming the guest paused at the held bound: {err}")
            # Refused because the guest powered off (or panicked) meanwhile: its own
            # event, not a failure of this host (.guestevents ends the run).
            self.paused = False
            a.artifacts.event("guest-stopped-itself", reason=why, status=status)
            return
        self.paused = False
        a.artifacts.event("guest-resumed", reason=why, state=a.state.value)

    def status(self) -> dict[str, Any]:
        return {
            "held_bytes": self.held_bytes(),
            "held_limit_bytes": self.limit_bytes,
            "held_paused": self.paused,
        }


async def release(agent: PrimaryAgent, *, solo: bool) -> dict[str, Any]:
    """The ``release`` control verb. Without ``solo``: what is held, nothing changes.
    With ``solo``: declare the secondary dead, tell the tiebreaker, go UNPROTECTED
    (held output released, writes through), resume a paused guest, and alert.

    Raises:
        ReplicationError: not HELD, or the tiebreaker refused (the peer may be running
            the guest: releasing could let two copies speak).
    """
    bound = agent.held
    if not solo:
        return {"released": False, "state": agent.state.value, **bound.status()}
    if agent.state is not PrimaryState.HELD:
        raise ReplicationError(
            f"release --solo acts on a primary holding output with no secondary (held); "
            f"this one is {agent.state.value}"
        )
    held = bound.held_bytes()
    told = "no tiebreaker configured"
    if agent.lease.witness is not None:
        granted, why = await agent.lease.ask("solo")
        if not granted:
            raise ReplicationError(
                f"the {agent.lease.name} refused to let this host go solo: {why}"
            )
        told = f"the {agent.lease.name} granted solo"
    reason = (
        f"operator declared the secondary dead (kemari release --solo; {told}): "
        f"{held} held bytes released, running unprotected"
    )
    if agent.io is not None:
        await agent.io.unprotect()
    # The transition raises the alert (kind unprotected, with this reason).
    agent.set_state(PrimaryState.UNPROTECTED, reason)
    await bound.resume("kemari release --solo")
    return {"released": True, "state": agent.state.value, "released_bytes": held, **bound.status()}


def alert(agent: PrimaryAgent, reason: str, **details: Any) -> None:
    """An alert about the HELD bound: the guest is paused until the peer is back or
    the operator runs ``kemari release --solo``."""
    if agent.artifacts.alerter is not None:
        agent.artifacts.alerter.emit(AlertKind.HELD_LIMIT, reason, **details)


__all__ = ["HeldBound", "release"]
