"""Every disk operation of the secondary, in one module.

Two kinds of guest disk reach the secondary:

- **built-in replicated disk** (``disk.backend = "builtin"``): this host's own copy.
  :class:`BuiltinCopy` keeps it at the last committed epoch for the
  :class:`~kemari_suite.replica.receiver.EpochReceiver` (through the
  :class:`ReplicaDisk` contract), and a sidecar ``<disk>.kemari.json`` says which copy
  it is (its lineage) and through which epoch;
- **shared storage** (or any disk the primary itself writes): the secondary only keeps
  the committed I/O logs, and :func:`replay_committed` applies them at failover.

Only this module opens the disk (through :func:`kemari_suite.disk.open_backend`, by
capability: a backend that ``streams_copy`` is a copy the engine keeps, one that
``replays_log`` is storage the primary writes itself) and replays I/O logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from kemari_suite.config import KemariConfig
from kemari_suite.disk import DiskBackend, DiskRole, open_backend
from kemari_suite.errors import DiskError, FailoverError
from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.epochs import apply_log, replay


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


@runtime_checkable
class GenerationRecord(Protocol):
    """A disk whose sidecar also records the tiebreaker generation of its data
    (:class:`~kemari_suite.disk.builtin.BuiltinDisk`)."""

    #: Written with every later record (None: keep what the sidecar says).
    generation: int | None

    def read_generation(self) -> int | None: ...

    def record_generation(self, generation: int | None) -> None: ...


class BuiltinCopy:
    """This host's copy of a disk the engine streams (the built-in replicated disk);
    see :class:`ReplicaDisk`. The backend keeps the sidecar crash-safely.

    The sidecar also records the tiebreaker generation of the copy's data, where the
    backend can (:class:`GenerationRecord`): the generation of the primary streaming to
    it once learned (:meth:`learn_generation`), none for a new primary's commits until
    then (:meth:`new_primary`), and the grant of a takeover (:meth:`prepare_failover`).
    """

    def __init__(self, cfg: KemariConfig, disk: DiskBackend) -> None:
        self.cfg = cfg
        self.path = cfg.disk.path
        self._disk: DiskBackend | None = disk
        #: Where the copy in progress is written (None: no copy in progress).
        self._target: DiskBackend | None = None
        self._pending_lineage = ""
        #: The generation of the primary streaming to this copy (None: not learned on
        #: this connection), and whether any primary connected since this copy opened.
        self._primary_generation: int | None = None
        self._new_primary = False

    @classmethod
    def open(cls, cfg: KemariConfig) -> BuiltinCopy | None:
        """This host's copy when the VM's disk is one the engine streams, else None.

        Raises:
            ConfigError: the disk file is missing.
            DiskError: it cannot be opened.
        """
        disk = open_backend(cfg, role=DiskRole.SECONDARY)
        if disk is None:
            return None
        if not disk.caps.streams_copy:
            disk.close()
            return None
        disk.attach()
        return cls(cfg, disk)

    def _require(self) -> DiskBackend:
        if self._disk is None:
            raise DiskError("builtin", f"{self.path} is closed (this host failed over)")
        return self._disk

    # ---- the receiver's contract ----------------------------------------------------

    @property
    def copying(self) -> bool:
        return self._target is not None

    def begin_copy(self, lineage: str, *, incremental: bool) -> None:
        disk = self._require()
        self.abort()
        # Incremental: written in place, and until the epoch commits the copy is nobody's.
        self._target = disk.begin_copy(full=not incremental)
        self._pending_lineage = lineage

    def write_now(self, log: bytes) -> None:
        apply_log(self._target if self._target is not None else self._require(), log)

    def commit(self, epoch: int, logs: Sequence[bytes]) -> None:
        disk = self._require()
        self._stamp_generation(disk)
        if self._target is not None:
            # A full copy replaces the old one in one rename; an in-place one is done.
            self._target = None
            disk.commit_copy(self._pending_lineage, epoch)
        else:
            # Applied before the acknowledgement: the copy is always at the last
            # committed epoch (the page cache survives an agent crash).
            for log in logs:
                apply_log(disk, log)
            disk.write_state(disk.read_state().lineage, epoch)
        self._pending_lineage = ""

    def abort(self) -> None:
        # An in-place copy stays marked as nobody's: it is neither old nor new.
        if self._target is not None and self._disk is not None:
            self._disk.abort_copy()
        self._target = None
        self._pending_lineage = ""

    def _stamp_generation(self, disk: DiskBackend) -> None:
        """Before a commit's record: the generation it carries is the primary's, or
        none while a new primary's is not known (it may be another run than the one
        the sidecar names; unknown never refuses a failover, an old one would)."""
        if not isinstance(disk, GenerationRecord):
            return
        if self._primary_generation is not None:
            disk.generation = self._primary_generation
        elif self._new_primary:
            disk.record_generation(None)
            self._new_primary = False

    # ---- the agent's side -----------------------------------------------------------

    def new_primary(self) -> None:
        """A primary connected: its generation is unknown until :meth:`learn_generation`
        (the commits it brings until then record none)."""
        self._primary_generation = None
        self._new_primary = True

    def learn_generation(self, generation: int) -> None:
        """The tiebreaker generation of the primary streaming to this copy (its holder,
        paired): recorded with every commit from now on."""
        self._primary_generation = generation

    def generation(self) -> int | None:
        """The generation the sidecar records for this copy (None: unknown, or closed)."""
        disk = self._disk
        if disk is None or not isinstance(disk, GenerationRecord):
            return None
        return disk.read_generation()

    def state(self) -> dict[str, Any]:
        """The sidecar: ``{"lineage", "epoch"}``, or {} when this is nobody's copy."""
        st = self._require().read_state()
        return st.to_dict() if st.lineage else {}

    def prepare_failover(self, epoch: int, *, generation: int | None = None) -> None:
        """Hand the copy to the VM about to resume memory epoch ``epoch``: check that it
        is that very epoch, flush it, record ``generation`` (the takeover's grant: the
        run the copy's data belongs to from now on; None: none recorded), and close it
        (the taps open it again).

        Raises:
            FailoverError: the copy is at another epoch or is nobody's copy.
            DiskError: the flush or the sidecar write failed.
        """
        disk = self._require()
        st = disk.read_state()
        if st.epoch != epoch or not st.lineage:
            # Memory at one checkpoint and the disk at another: resuming would show
            # the guest a disk it never wrote. Refuse, loudly.
            raise FailoverError(
                f"the disk copy {self.path} is at epoch {st.epoch} "
                f"(lineage {st.lineage or 'none'}), memory at epoch "
                f"{epoch}: diverged copies, not resuming"
            )
        # From here on this copy diverges from any primary's: it is nobody's replica.
        disk.clear_state()
        disk.flush()
        if generation is not None and isinstance(disk, GenerationRecord):
            disk.record_generation(generation)
        self.close()

    def close(self) -> None:
        """Close the copy (idempotent); a copy in progress is dropped."""
        self.abort()
        if self._disk is not None:
            self._disk.close()
            self._disk = None


def replay_committed(cfg: KemariConfig, logs: Sequence[bytes]) -> None:
    """Storage the primary writes itself (shared, DRBD) at failover: apply the committed
    I/O logs it may not have applied yet, then flush (writes are idempotent). Nothing
    without such a disk.

    Raises:
        ConfigError: the disk is missing.
        LeaseError: another host holds the lease, or ran alone since (this copy's logs
            are stale).
        ProtocolError: a log is malformed.
        DiskError, OSError: the disk failed.
    """
    disk = open_backend(cfg, role=DiskRole.SECONDARY)
    if disk is None:
        return
    try:
        if disk.caps.replays_log and logs:
            disk.attach()
            # The writer's role (and, fenced, the lease: a stale copy is refused here).
            disk.promote()
            replay(disk, list(logs))
    finally:
        disk.close()


def replay_nosync(disk: BlockBackend, data: bytes) -> None:
    """Apply one I/O log to ``disk`` without flushing (the caller flushes when it must)."""
    apply_log(disk, data)


__all__ = ["BuiltinCopy", "GenerationRecord", "ReplicaDisk", "replay_committed", "replay_nosync"]
