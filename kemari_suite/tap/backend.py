"""What the block tap needs from a disk: the :class:`BlockBackend` protocol.

Every :class:`kemari_suite.disk.base.DiskBackend` satisfies it once attached (and, for
DRBD or shared storage, promoted): the tap writes straight into the configured backend.

The tap calls ``apply`` and ``flush`` from one worker thread at a time, in epoch order,
and ``read`` from other threads, concurrently with ``apply`` (positional I/O on one
descriptor allows that). ``read`` is only ever called for ranges that no pending or
in-flight write touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockBackend(Protocol):
    """The disk under the block tap."""

    @property
    def size(self) -> int:
        """Size of the disk in bytes (fixed while the tap serves it)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``. Raises DiskError on failure."""
        ...

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write each ``(offset, data)`` in order. Raises DiskError on failure."""
        ...

    def flush(self) -> None:
        """Make every applied write durable. Raises DiskError on failure."""
        ...


__all__ = ["BlockBackend"]
