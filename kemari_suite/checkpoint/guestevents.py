"""The guest stopping itself (shutdown, poweroff, panic), seen from the primary.

Never a failover trigger: the guest itself chose to stop. While protected, a last
sync point commits what the guest wrote on its way down (its final sync, the read-only
remount) to both disks; then the event is forwarded to the secondary, which records it
and will not resume a guest that shut itself down, and the primary stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import ReplicationError
from kemari_suite.protocol import wire

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

#: QEMU events that mean the guest stopped itself.
STOP_EVENTS = ("SHUTDOWN", "GUEST_PANICKED")


class GuestEvents:
    """Watches QEMU's events for the guest stopping itself."""

    def __init__(self, agent: PrimaryAgent) -> None:
        self.agent = agent
        #: The QEMU event that stopped the guest ("" while it runs) and its data.
        self.stopped = ""
        self.data: dict[str, Any] = {}

    async def on_qemu_event(self, ev: dict[str, Any]) -> None:
        name = ev.get("event", "")
        if name not in STOP_EVENTS:
            return
        data = ev.get("data") or {}
        # A reset (reboot) also raises SHUTDOWN in some versions; only a real stop counts.
        if name == "SHUTDOWN" and data.get("reason") == "guest-reset":
            return
        a = self.agent
        a.artifacts.event("guest", name=name, data=data)
        self.stopped, self.data = name, data
        if a.state is PrimaryState.PROTECTED and a.session is not None:
            # The protect loop takes the last checkpoint first.
            a.triggers.request(f"guest {name}")
            return
        await self.forward()

    async def final_checkpoint(self) -> None:
        """The guest is down (not running): commit what it last did, on both hosts."""
        a = self.agent
        epoch = a.epoch
        try:
            await a.sync_point(f"guest {self.stopped}", resume=False)
            if a.io is not None:
                await asyncio.wait_for(a.io.released(epoch), 30)
        except (ReplicationError, TimeoutError) as err:
            a.artifacts.event("final-checkpoint-failed", reason=str(err))
        await self.forward()

    async def forward(self) -> None:
        """Tell the secondary the guest stopped itself, then stop."""
        a = self.agent
        if a.session is not None:
            with contextlib.suppress(Exception):
                await a.session.link.send(
                    wire.GuestEvent(name=self.stopped, data=json.dumps(self.data))
                )
                await a.session.link.send(wire.Bye(reason=f"guest event {self.stopped}"))
        a.request_stop()


__all__ = ["GuestEvents"]
