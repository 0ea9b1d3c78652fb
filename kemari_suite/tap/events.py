"""The vocabulary the taps share with the sync policy and the primary agent.

A tap reports every outbound guest I/O as ``on_event(kind, epoch)``: the event kind and
the epoch it was logged (or held) in. The epoch matters to the policy: an event of an
epoch that a sync point has already closed is covered by that sync point (QEMU's own
``stop`` flushes the disk inside the stopped window, before the epoch switches), so only
events of the open epoch ask for another one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class IOEvent(enum.StrEnum):
    """Kinds of outbound I/O (values equal the plain strings "write", "flush", "net")."""

    WRITE = "write"  # also trims and write-zeroes
    FLUSH = "flush"  # also FUA writes (reported as WRITE and FLUSH)
    NET = "net"  # a frame from the guest


#: Returns the primary's open epoch (``PrimaryAgent.status.epoch``).
EpochSource = Callable[[], int]
#: Receives ``(kind, epoch)`` for each outbound I/O event; called on the event loop,
#: must not block.
EventSink = Callable[[IOEvent, int], None]


class TapMode(enum.Enum):
    """Whether a tap holds output for a secondary or writes it straight through."""

    PROTECTED = "protected"
    UNPROTECTED = "unprotected"


__all__ = ["EpochSource", "EventSink", "IOEvent", "TapMode"]
