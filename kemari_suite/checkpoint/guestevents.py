"""The guest's own events (shutdown, poweroff, reset, panic), seen from the primary.

Every one is recorded in the VM's :class:`~kemari_suite.vm.guestevents.GuestEventLog`
(shown in status, raised as an alert). One that stops the guest is never a failover
trigger: the guest itself chose to stop. While protected, a last
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
from kemari_suite.vm.guestevents import GuestEventLog, classify

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent


class GuestEvents:
    """Watches QEMU's events for the guest stopping itself."""

    def __init__(self, agent: PrimaryAgent, log: GuestEventLog | None = None) -> None:
        self.agent = agent
        #: Every guest event of this VM, kept across failovers and switchovers.
        self.log = log or GuestEventLog()
        #: The QEMU event that stopped the guest ("" while it runs) and its data.
        self.stopped = ""
        self.data: dict[str, Any] = {}

    async def on_qemu_event(self, ev: dict[str, Any]) -> None:
        seen = classify(ev)
        if seen is None:
            return
        name, stops = seen
        a = self.agent
        data = ev.get("data") or {}
        self.log.record(name, stops=stops, node=a.node_id, data=data)
        a.artifacts.event("guest", name=name, node=a.node_id, data=data)
        if not stops:
            return
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
