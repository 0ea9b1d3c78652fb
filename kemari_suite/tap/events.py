"""The vocabulary the taps share with the sync policy and the primary agent.

A tap reports every outbound guest I/O as ``on_event(kind, epoch)``: the event kind and
the epoch it was logged (or held) in. The epoch matters to the policy: an event of an
epoch that a sync point has already closed is covered by that sync point (QEMU's own
``stop`` flushes the disk inside the stopped window, before the epoch switches), so only
events of the open epoch ask for another one.

The open epoch is pushed into the taps: the primary calls ``switch_epoch(e)`` inside the
stopped window, where the epoch number switches (:class:`OpenEpoch`). A tap never asks
the primary for it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from kemari_suite.errors import TapError


class IOEvent(enum.StrEnum):
    """Kinds of outbound I/O (values equal the plain strings "write", "flush", "net")."""

    WRITE = "write"  # also trims and write-zeroes
    FLUSH = "flush"  # also FUA writes (reported as WRITE and FLUSH)
    NET = "net"  # a frame from the guest


#: Receives ``(kind, epoch)`` for each outbound I/O event; called on the event loop,
#: must not block.
EventSink = Callable[[IOEvent, int], None]

#: Receives ``(epoch, frames)``: copies of the frames the network tap just delivered to
#: the guest (LAN -> guest) while ``epoch`` was open, oldest first (the primary sends
#: them to the standby, which replays them at a failover). Called on the event loop,
#: must not block.
InboundSink = Callable[[int, list[bytes]], None]


class TapMode(enum.Enum):
    """Whether a tap holds output for a secondary or writes it straight through."""

    PROTECTED = "protected"
    UNPROTECTED = "unprotected"


class OpenEpoch:
    """The primary's open epoch as one tap holds it.

    ``switch(e)`` sets it (inside the stopped window: every guest I/O from then on
    belongs to ``e``); it never goes back.
    """

    def __init__(self, name: str, epoch: int = 0) -> None:
        self.name = name
        self._epoch = epoch

    @property
    def value(self) -> int:
        """The epoch the next guest I/O belongs to."""
        return self._epoch

    def switch(self, epoch: int) -> None:
        """The open epoch is now ``epoch``.

        Raises:
            TapError: ``epoch`` is older than the open epoch (epochs never go back).
        """
        if epoch < self._epoch:
            raise TapError(self.name, f"epoch {epoch} after epoch {self._epoch}: never back")
        self._epoch = epoch


__all__ = ["EventSink", "IOEvent", "InboundSink", "OpenEpoch", "TapMode"]
