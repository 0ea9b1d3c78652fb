"""What the guest itself did to its VM: shut down, powered off, reset, panicked.

QEMU reports these as QMP events (QEMU runs with ``-no-shutdown``, so a guest that
powers off leaves QEMU up and stopped, and the agent decides). Whichever host runs the
guest at the time records them in a :class:`GuestEventLog`, which travels with the VM
across a failover or switchover (the standby also records the events its primary
forwarded), so ``kemari status`` and the alerts show the guest's whole story.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

#: Kept per log; older events drop off (status shows the newest).
MAX_EVENTS = 50


@dataclass(frozen=True)
class GuestEvent:
    """One thing the guest did: ``name`` is SHUTDOWN, RESET, POWERDOWN or GUEST_PANICKED."""

    name: str
    #: The guest stopped itself with it (the VM will not run on).
    stops: bool
    #: Where it ran when this happened (the agent's node id) and when (wall clock).
    node: str
    t: float
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def classify(ev: dict[str, Any]) -> tuple[str, bool] | None:
    """(name, stops) for a QMP event the guest caused, None for any other event.

    A SHUTDOWN the host asked for (the agent quitting QEMU) is not the guest's doing; a
    reset is recorded from its RESET event only (a SHUTDOWN with reason guest-reset is
    the same reset seen again).
    """
    name = ev.get("event", "")
    data = ev.get("data") or {}
    reason = str(data.get("reason", ""))
    if name == "SHUTDOWN":
        if reason == "guest-reset" or reason.startswith("host-"):
            return None
        return "SHUTDOWN", True
    if name == "GUEST_PANICKED":
        return "GUEST_PANICKED", True
    if name == "RESET":
        return ("RESET", False) if not reason.startswith("host-") else None
    if name == "POWERDOWN":
        return "POWERDOWN", False
    return None


class GuestEventLog:
    """The guest's events, oldest first, bounded."""

    def __init__(self, events: list[GuestEvent] | None = None) -> None:
        self.events: list[GuestEvent] = list(events or [])[-MAX_EVENTS:]

    def record(
        self, name: str, *, stops: bool, node: str, data: dict[str, Any] | None = None
    ) -> GuestEvent:
        ev = GuestEvent(name=name, stops=stops, node=node, t=time.time(), data=dict(data or {}))
        self.events.append(ev)
        del self.events[:-MAX_EVENTS]
        return ev

    @property
    def stopped(self) -> GuestEvent | None:
        """The event that stopped the guest, if the newest stopping one is it."""
        for ev in reversed(self.events):
            if ev.stops:
                return ev
        return None

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def status(self, n: int = 10) -> list[dict[str, Any]]:
        """The newest ``n`` events, for ``kemari status``."""
        return [e.as_dict() for e in self.events[-n:]]


__all__ = ["MAX_EVENTS", "GuestEvent", "GuestEventLog", "classify"]
