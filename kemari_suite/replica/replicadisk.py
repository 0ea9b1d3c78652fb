"""Every disk operation of the secondary, in one module.

Two kinds of guest disk reach the secondary:

- **built-in replicated disk** (``disk.backend = "builtin"``): this host's own copy.
  :class:`BuiltinCopy` keeps it at the last committed epoch for the
  :class:`~kemari_suite.replica.receiver.EpochReceiver` (through the
  :class:`ReplicaDisk` contract), and a sidecar ``<disk>.kemari.json`` says which copy
  it is (its lineage) and through which epoch;
- **shared storage** (or any disk the primary itself writes): the secondary only keeps
  the committed I/O logs, and :func:`replay_committed` applies them at failover.

Only this module touches :class:`~kemari_suite.disk.base.FileDisk`, ``open_disk``, the
disk-state sidecar and the I/O log replay.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

from kemari_suite.config import KemariConfig
from kemari_suite.disk.base import FileDisk
from kemari_suite.errors import DiskError, FailoverError
from kemari_suite.tap import replay
from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.epochs import ops_to_writes, parse
from kemari_suite.tap.guestio import (
    disk_state_path,
    open_disk,
    read_disk_state,
    write_disk_state,
)


class ReplicaDisk(Protocol):
    """This host's copy of the guest disk, as the epoch receiver drives it.

    The rule that keeps the copy exact: whenever no epoch is open, the copy holds every
    write through the last committed epoch and nothing later, and its sidecar says so;
    while a FULL epoch rewrites it in place, the sidecar says it is nobody's copy.

    Calls per epoch, in order::

        [begin_copy (FULL epochs that carry the disk)]
        write_now(log) for every I/O log of the epoch, while ``copying``
        commit(epoch, logs)  |  abort()
    """

    @property
    def copying(self) -> bool:
        """A copy is in progress: I/O logs go into it as they arrive."""
        ...

    def begin_copy(self, lineage: str, *, incremental: bool) -> None:
        """The open FULL epoch carries the disk as copy ``lineage``: into a fresh file
        (renamed over the old one at commit), or ``incremental`` into the copy in place.

        Raises:
            DiskError: the fresh file cannot be created.
        """
        ...

    def write_now(self, log: bytes) -> None:
        """Write one I/O log of the copy in progress (not flushed).

        Raises:
            ProtocolError: the log is malformed.
            DiskError: the write failed.
        """
        ...

    def commit(self, epoch: int, logs: Sequence[bytes]) -> None:
        """Bring the copy to ``epoch``: finish the copy in progress or apply ``logs``.

        Raises:
            ProtocolError: a log is malformed.
            DiskError, OSError: the copy could not be written or renamed.
        """
        ...

    def abort(self) -> None:
        """Drop the copy in progress (the epoch was rolled back)."""
        ...


class BuiltinCopy:
    """The built-in replicated disk's copy on this host; see :class:`ReplicaDisk`."""

    def __init__(self, cfg: KemariConfig, disk: FileDisk) -> None:
        self.cfg = cfg
        self.path = cfg.disk.path
        self._disk: FileDisk | None = disk
        #: The copy this disk is (set at each commit; "" while it is nobody's copy).
        self.lineage = ""
        self._next: FileDisk | None = None
        self._inplace = False
        self._pending_lineage = ""

    @classmethod
    def open(cls, cfg: KemariConfig) -> BuiltinCopy | None:
        """This host's copy when the VM has a built-in replicated disk, else None.

        Raises:
            ConfigError: the disk file is missing.
            DiskError: it cannot be opened.
        """
        if not cfg.disk.path or cfg.disk.backend != "builtin":
            return None
        disk = open_disk(cfg)
        assert disk is not None
        return cls(cfg, disk)

    @property
    def next_path(self) -> str:
        return self.path + ".next"

    def _require(self) -> FileDisk:
        if self._disk is None:
            raise DiskError("builtin", f"{self.path} is closed (this host failed over)")
        return self._disk

    # ---- the receiver's contract ----------------------------------------------------

    @property
    def copying(self) -> bool:
        return self._next is not None or self._inplace

    def begin_copy(self, lineage: str, *, incremental: bool) -> None:
        disk = self._require()
        self.abort()
        self._pending_lineage = lineage
        if incremental:
            # Written in place: until this epoch commits the copy is neither old nor
            # new, so it must not count as anybody's copy.
            self._mark("", -1)
            self._inplace = True
            return
        with open(self.next_path, "wb") as f:
            f.truncate(disk.size)
        nxt = FileDisk(self.next_path)
        nxt.attach()
        self._next = nxt

    def write_now(self, log: bytes) -> None:
        target = self._next if self._next is not None else self._require()
        replay_nosync(target, log)

    def commit(self, epoch: int, logs: Sequence[bytes]) -> None:
        disk = self._require()
        if self._next is not None:
            # The new full copy replaces the old one in one rename.
            nxt, self._next = self._next, None
            nxt.flush()
            nxt.close()
            disk.close()
            os.replace(self.next_path, self.path)
            disk = FileDisk(self.path)
            disk.attach()
            self._disk = disk
        elif logs and not self._inplace:
            # Applied before the acknowledgement: the copy is always at the last
            # committed epoch (the page cache survives an agent crash).
            for log in logs:
                replay_nosync(disk, log)
        self._mark(self._pending_lineage or self.lineage, epoch)
        self._inplace = False
        self._pending_lineage = ""

    def abort(self) -> None:
        if self._next is not None:
            self._next.close()
            self._next = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.next_path)
        # An in-place copy stays marked as nobody's: it is neither old nor new.
        self._inplace = False
        self._pending_lineage = ""

    # ---- the agent's side -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The sidecar: ``{"lineage", "epoch"}``, or {} when there is none."""
        return read_disk_state(self.cfg)

    def _mark(self, lineage: str, epoch: int) -> None:
        """Which copy this disk is (lineage) and through which epoch (applied)."""
        self.lineage = lineage
        write_disk_state(self.cfg, lineage, epoch)

    def prepare_failover(self, epoch: int) -> None:
        """Hand the copy to the VM about to resume memory epoch ``epoch``: check that it
        is that very epoch, flush it, and close it (the taps open it again).

        Raises:
            FailoverError: the copy is at another epoch or is nobody's copy.
        """
        state = self.state()
        if state.get("epoch") != epoch or not state.get("lineage"):
            # Memory at one checkpoint and the disk at another: resuming would show
            # the guest a disk it never wrote. Refuse, loudly.
            raise FailoverError(
                f"the disk copy {self.path} is at epoch {state.get('epoch')} "
                f"(lineage {state.get('lineage') or 'none'}), memory at epoch "
                f"{epoch}: diverged copies, not resuming"
            )
        # From here on this copy diverges from any primary's: it is nobody's replica.
        with contextlib.suppress(FileNotFoundError):
            disk_state_path(self.cfg).unlink()
        self._require().flush()
        self.close()

    def close(self) -> None:
        """Close the copy (idempotent); a copy in progress is dropped."""
        self.abort()
        if self._disk is not None:
            self._disk.close()
            self._disk = None


def replay_committed(cfg: KemariConfig, logs: Sequence[bytes]) -> None:
    """Shared storage at failover: apply the committed I/O logs the primary may not
    have applied yet, then flush (writes are idempotent). Nothing without a disk.

    Raises:
        ConfigError: the disk is missing.
        ProtocolError: a log is malformed.
        DiskError, OSError: the disk failed.
    """
    disk = open_disk(cfg)
    if disk is None:
        return
    try:
        replay(disk, list(logs))
    finally:
        disk.close()


def replay_nosync(disk: BlockBackend, data: bytes) -> None:
    """Apply one I/O log to ``disk`` without flushing (the caller flushes when it must)."""
    writes = ops_to_writes(parse(data).ops)
    if writes:
        disk.apply(writes)


__all__ = ["BuiltinCopy", "ReplicaDisk", "replay_committed", "replay_nosync"]
