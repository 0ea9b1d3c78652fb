"""The guest's own events, seen from the standby side.

Before a failover the primary forwards them (a guest that shut down or panicked there
is never resumed here); after a failover that leaves this host running the VM alone,
QEMU's own events arrive here, and a poweroff or a panic ends the run cleanly. Both
go into the VM's :class:`~kemari_suite.vm.guestevents.GuestEventLog`, which a
re-protection or switchover hands on to the primary role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link
from kemari_suite.replica.states import SecondaryState
from kemari_suite.vm.guestevents import GuestEventLog, classify

if TYPE_CHECKING:
    from kemari_suite.replica.secondary import SecondaryAgent

S = SecondaryState
#: Guest events forwarded by the primary that mean the guest stopped itself.
STOPPING = ("SHUTDOWN", "GUEST_PANICKED")


class GuestWatch:
    """Records the guest's events for one standby agent."""

    def __init__(self, agent: SecondaryAgent) -> None:
        self.agent = agent
        self.log = GuestEventLog()

    async def forwarded(self, link: Link, msg: wire.GuestEvent) -> None:
        """An event the primary saw (``GuestEvent`` on the link)."""
        a = self.agent
        node = f"primary at {link.peer}"
        self.log.record(msg.name, stops=msg.name in STOPPING, node=node)
        a.artifacts.event("guest", name=msg.name, node=node, data=msg.data)
        if msg.name in STOPPING and a.state in (S.WAITING, S.RECEIVING, S.STANDBY):
            # The guest stopped itself on the primary: never resume it here.
            a.life.set(S.STOPPED, f"the guest reported {msg.name} on the primary: not failing over")

    async def on_qemu_event(self, ev: dict[str, Any]) -> None:
        """This host's QEMU after a failover: a poweroff or a panic ends the run cleanly
        (nothing to protect any more); a reset is only recorded."""
        a = self.agent
        seen = classify(ev)
        if seen is None or a.state is not S.ACTIVE:
            return
        name, stops = seen
        data = ev.get("data") or {}
        self.log.record(name, stops=stops, node=a.node_id, data=data)
        a.artifacts.event("guest", name=name, node=a.node_id, data=data)
        if stops:
            a.life.set(S.STOPPED, f"the guest reported {name} on this host after the failover")
            a.request_stop()


__all__ = ["STOPPING", "GuestWatch"]
