"""The epoch log of the block tap: guest disk writes held until their checkpoint commits.

Life of a logged write (see "Event taps and output commit" in DESIGN.md)::

    record_*(epoch, ...)  -> PENDING   acknowledged to the guest, visible to reads
                                       through the overlay, not on the backend
    serialize(e)          -> shipped in epoch e's IOLog frame to the secondary
    committed(e)          -> COMMITTED the secondary holds the checkpoint
    applied(e)            -> gone      written to the backend (and flushed if the
                                       epoch had a FLUSH or FUA); dropped from the
                                       log and the overlay

Epoch tags come from the primary's open epoch and never decrease. Every pending epoch
keeps its operations in arrival order: writes ``(offset, data)``, trims, write-zeroes
and flush markers, each with its FUA flag.

Wire format of an epoch's I/O log (the payload of the IOLog frame), version 1, all
integers big-endian::

    header  !4sBBHQI   magic b"KIOL", version (1), flags (0), reserved (0),
                       epoch (u64), op count (u32)                       20 bytes
    op      !BBQI      kind (u8), op flags (u8), offset (u64), length (u32) 14 bytes
                       then, for WRITE only, ``length`` data bytes

    kind      1 WRITE, 2 TRIM, 3 WRITE_ZEROES, 4 FLUSH
    op flags  bit 0: FUA (the guest asked for this write to be durable); others 0
    FLUSH has offset 0, length 0, flags 0; the others have length >= 1, and
    offset + length <= 2**63 - 1.

A TRIM reads back as zeros here and is applied as zeros, so that the primary and the
secondary's replay produce the same bytes. An epoch without I/O serializes to a header
with count 0 (never to b"").
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kemari_suite.errors import ProtocolError, TapError
from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.overlay import Overlay, Piece

MAGIC = b"KIOL"
VERSION = 1
HEADER = struct.Struct("!4sBBHQI")
OP = struct.Struct("!BBQI")
FLAG_FUA = 0x01
#: Offsets and ends must fit a signed 64-bit file offset.
MAX_END = (1 << 63) - 1
#: Largest single operation length (the format's u32).
MAX_OP_LENGTH = (1 << 32) - 1
#: Zero ranges reach the backend in pieces of at most this size.
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)


class OpKind(enum.IntEnum):
    WRITE = 1
    TRIM = 2
    WRITE_ZEROES = 3
    FLUSH = 4


@dataclass(frozen=True, slots=True)
class IOOp:
    """One logged guest operation. ``data`` is set for WRITE only."""

    kind: OpKind
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    fua: bool = False

    @property
    def wants_flush(self) -> bool:
        return self.kind is OpKind.FLUSH or self.fua


@dataclass(frozen=True, slots=True)
class IOLogRecord:
    """A parsed I/O log: the epoch it was shipped with and its operations in order."""

    epoch: int
    ops: tuple[IOOp, ...]

    @property
    def needs_flush(self) -> bool:
        return any(op.wants_flush for op in self.ops)


class EpochState(enum.Enum):
    PENDING = "pending"
    COMMITTED = "committed"


@dataclass
class EpochRecord:
    """The operations of one epoch that are not yet applied."""

    epoch: int
    ops: list[IOOp] = field(default_factory=list)
    data_bytes: int = 0
    needs_flush: bool = False
    state: EpochState = EpochState.PENDING
    #: The epoch whose IOLog carried these operations (None: not shipped yet).
    serialized_in: int | None = None


@dataclass
class LogStats:
    ops_logged: int = 0
    bytes_logged: int = 0
    epochs_committed: int = 0
    epochs_applied: int = 0
    bytes_applied: int = 0


class EpochLog:
    """Per-epoch operation log with an overlay index for reads; see the module docstring.

    Not thread-safe: call it from one thread (the event loop). The bytes it hands out
    (``ops``, read pieces) are immutable and may be used on other threads.
    """

    def __init__(self) -> None:
        self._pending: dict[int, EpochRecord] = {}
        self.overlay = Overlay()
        self.last_epoch = -1
        self.committed_through = -1
        self.applied_through = -1
        self.stats = LogStats()

    # ---- recording ---------------------------------------------------------------------

    def _record(self, epoch: int, op: IOOp) -> None:
        if epoch < self.last_epoch:
            raise TapError(
                "epoch-log", f"epoch {epoch} after epoch {self.last_epoch}: epochs never go back"
            )
        if epoch <= self.committed_through:
            raise TapError(
                "epoch-log",
                f"write in epoch {epoch}, but epochs through {self.committed_through} "
                "are committed already",
            )
        if op.kind is not OpKind.FLUSH:
            if op.offset < 0 or op.length <= 0 or op.offset + op.length > MAX_END:
                raise TapError("epoch-log", f"bad extent offset={op.offset} length={op.length}")
            if op.length > MAX_OP_LENGTH:
                raise TapError("epoch-log", f"operation of {op.length} bytes is too long")
        rec = self._pending.get(epoch)
        if rec is None:
            rec = self._pending[epoch] = EpochRecord(epoch)
        rec.ops.append(op)
        rec.needs_flush = rec.needs_flush or op.wants_flush
        self.last_epoch = epoch
        self.stats.ops_logged += 1
        if op.data is not None:
            rec.data_bytes += len(op.data)
            self.stats.bytes_logged += len(op.data)

    def record_write(self, epoch: int, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Log a guest write and show it to reads.

        Raises:
            TapError: the epoch went back or is committed already, or a bad extent.
        """
        data = bytes(data)
        self._record(epoch, IOOp(OpKind.WRITE, offset, len(data), data, fua))
        self.overlay.put(offset, len(data), data, epoch)

    def record_trim(self, epoch: int, offset: int, length: int, *, fua: bool = False) -> None:
        """Log a trim (reads see zeros). Raises TapError as :meth:`record_write`."""
        self._record(epoch, IOOp(OpKind.TRIM, offset, length, None, fua))
        self.overlay.put(offset, length, None, epoch)

    def record_write_zeroes(
        self, epoch: int, offset: int, length: int, *, fua: bool = False
    ) -> None:
        """Log a write-zeroes. Raises TapError as :meth:`record_write`."""
        self._record(epoch, IOOp(OpKind.WRITE_ZEROES, offset, length, None, fua))
        self.overlay.put(offset, length, None, epoch)

    def record_flush(self, epoch: int) -> None:
        """Log a flush marker. Raises TapError as :meth:`record_write`."""
        self._record(epoch, IOOp(OpKind.FLUSH))

    # ---- queries -----------------------------------------------------------------------

    def pending_epochs(self) -> list[int]:
        """Epochs with operations not yet applied, oldest first."""
        return list(self._pending)

    def record(self, epoch: int) -> EpochRecord | None:
        return self._pending.get(epoch)

    def ops(self, epoch: int) -> list[IOOp]:
        """The pending operations of ``epoch`` in order (empty if none)."""
        rec = self._pending.get(epoch)
        return list(rec.ops) if rec else []

    def needs_flush(self, epoch: int) -> bool:
        """Whether a pending ``epoch`` had a FLUSH or a FUA write."""
        rec = self._pending.get(epoch)
        return bool(rec and rec.needs_flush)

    def pending_bytes(self) -> int:
        """Write data held in the log (what reads may see and the backend lacks)."""
        return sum(r.data_bytes for r in self._pending.values())

    def pending_through(self, epoch: int) -> list[EpochRecord]:
        """Pending records of epochs ``<= epoch``, oldest first."""
        return [r for e, r in self._pending.items() if e <= epoch]

    def read_pieces(self, offset: int, length: int) -> list[Piece]:
        """How to read ``[offset, offset + length)``: overlay pieces and backend gaps."""
        return self.overlay.pieces(offset, length)

    # ---- shipping ----------------------------------------------------------------------

    def _to_ship(self, epoch: int) -> list[EpochRecord]:
        return [
            r
            for e, r in self._pending.items()
            if e <= epoch and r.state is EpochState.PENDING and r.serialized_in in (None, epoch)
        ]

    def serialize(self, epoch: int) -> bytes:
        """The IOLog payload of ``epoch`` (format in the module docstring).

        It carries every pending operation tagged ``<= epoch`` that is not committed and
        was not shipped with another epoch: normally just ``epoch``'s own, plus, after
        protection restarts, what was logged before the first epoch closed. Calling it
        again for the same epoch returns the same bytes. Called inside the stopped window:
        one pass, no I/O.
        """
        recs = self._to_ship(epoch)
        ops = [op for r in recs for op in r.ops]
        for r in recs:
            r.serialized_in = epoch
        return encode(epoch, ops)

    # ---- transitions -------------------------------------------------------------------

    def committed(self, epoch: int) -> list[int]:
        """The secondary holds every epoch ``<= epoch``; return the pending ones it covers."""
        if epoch > self.committed_through:
            self.committed_through = epoch
        done = []
        for e, r in self._pending.items():
            if e <= epoch and r.state is EpochState.PENDING:
                r.state = EpochState.COMMITTED
                done.append(e)
                self.stats.epochs_committed += 1
        return done

    def next_to_apply(self, *, include_uncommitted: bool = False) -> EpochRecord | None:
        """The oldest pending record if it may be applied now, else None."""
        for r in self._pending.values():
            if r.state is EpochState.COMMITTED or include_uncommitted:
                return r
            return None
        return None

    def applied(self, epoch: int, *, force: bool = False) -> None:
        """Epochs ``<= epoch`` are on the backend: drop them from the log and the overlay.

        ``force`` allows dropping epochs that were never committed (entering unprotected
        mode, where they are written through because no secondary is left to wait for).

        Raises:
            TapError: an epoch ``<= epoch`` is not committed (and not ``force``).
        """
        recs = self.pending_through(epoch)
        if not force:
            for r in recs:
                if r.state is not EpochState.COMMITTED:
                    raise TapError("epoch-log", f"epoch {r.epoch} applied before it committed")
        for r in recs:
            del self._pending[r.epoch]
            self.stats.epochs_applied += 1
            self.stats.bytes_applied += r.data_bytes
        self.overlay.drop_through(epoch)
        if epoch > self.applied_through:
            self.applied_through = epoch


# ---- wire format ---------------------------------------------------------------------


def encode(epoch: int, ops: Sequence[IOOp]) -> bytes:
    """Serialize ``ops`` as an I/O log of ``epoch`` (format in the module docstring)."""
    parts: list[bytes] = [HEADER.pack(MAGIC, VERSION, 0, 0, epoch, len(ops))]
    for op in ops:
        parts.append(OP.pack(int(op.kind), FLAG_FUA if op.fua else 0, op.offset, op.length))
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            parts.append(op.data)
    return b"".join(parts)


def parse(data: bytes | memoryview) -> IOLogRecord:
    """Parse an I/O log payload.

    Raises:
        ProtocolError: bad magic or version, truncated, trailing bytes, an unknown kind
            or flag, a malformed extent or flush.
    """
    buf = memoryview(data)
    if len(buf) < HEADER.size:
        raise ProtocolError(f"I/O log: {len(buf)} bytes, shorter than its header")
    magic, version, flags, reserved, epoch, count = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"I/O log: bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ProtocolError(f"I/O log: version {version}, this side reads {VERSION}")
    if flags != 0 or reserved != 0:
        raise ProtocolError(f"I/O log: unknown header flags {flags:#x}/{reserved:#x}")
    pos = HEADER.size
    ops: list[IOOp] = []
    for i in range(count):
        if pos + OP.size > len(buf):
            raise ProtocolError(f"I/O log: truncated in the header of op {i} of {count}")
        kind_n, op_flags, offset, length = OP.unpack_from(buf, pos)
        pos += OP.size
        try:
            kind = OpKind(kind_n)
        except ValueError:
            raise ProtocolError(f"I/O log: op {i} has unknown kind {kind_n}") from None
        if op_flags & ~FLAG_FUA:
            raise ProtocolError(f"I/O log: op {i} has unknown flags {op_flags:#x}")
        fua = bool(op_flags & FLAG_FUA)
        if kind is OpKind.FLUSH:
            if offset or length or op_flags:
                raise ProtocolError(f"I/O log: flush op {i} carries an extent or flags")
            ops.append(IOOp(OpKind.FLUSH))
            continue
        if length == 0 or offset + length > MAX_END:
            raise ProtocolError(f"I/O log: op {i} has a bad extent {offset}+{length}")
        payload: bytes | None = None
        if kind is OpKind.WRITE:
            if pos + length > len(buf):
                raise ProtocolError(f"I/O log: op {i} data truncated")
            payload = bytes(buf[pos : pos + length])
            pos += length
        ops.append(IOOp(kind, offset, length, payload, fua))
    if pos != len(buf):
        raise ProtocolError(f"I/O log: {len(buf) - pos} trailing bytes after {count} ops")
    return IOLogRecord(epoch, tuple(ops))


# ---- applying ------------------------------------------------------------------------


def ops_to_writes(ops: Iterable[IOOp]) -> list[tuple[int, bytes]]:
    """The backend writes for ``ops`` in order; zero ranges in chunks of ZERO_CHUNK bytes
    (full chunks share one zero buffer)."""
    out: list[tuple[int, bytes]] = []
    for op in ops:
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            out.append((op.offset, op.data))
        elif op.kind in (OpKind.TRIM, OpKind.WRITE_ZEROES):
            pos, end = op.offset, op.offset + op.length
            while pos < end:
                n = min(ZERO_CHUNK, end - pos)
                out.append((pos, _ZEROS if n == ZERO_CHUNK else bytes(n)))
                pos += n
    return out


def apply_log(backend: BlockBackend, log: bytes | memoryview | IOLogRecord) -> int:
    """Apply one I/O log to ``backend`` without flushing (the caller flushes when it
    must); return the bytes written. The standby's step for each committed epoch of a
    disk it holds a copy of, and for each log of a streamed copy.

    Raises:
        ProtocolError: the log is malformed (nothing of it is applied).
        DiskError, OSError: the backend failed.
    """
    rec = parse(log) if isinstance(log, bytes | memoryview) else log
    writes = ops_to_writes(rec.ops)
    if writes:
        backend.apply(writes)
    return sum(len(w) for _, w in writes)


def replay(backend: BlockBackend, logs: Iterable[bytes | IOLogRecord]) -> int:
    """Apply committed I/O logs to ``backend`` in order, then flush; return bytes written.

    This is the secondary's failover step (writes are idempotent, so replaying a log the
    primary had already applied is harmless).

    Raises:
        ProtocolError: a log is malformed (nothing of it is applied).
        DiskError, OSError: the backend failed.
    """
    total = sum(apply_log(backend, item) for item in logs)
    backend.flush()
    return total


__all__ = [
    "MAGIC",
    "VERSION",
    "EpochLog",
    "EpochRecord",
    "EpochState",
    "IOLogRecord",
    "IOOp",
    "LogStats",
    "OpKind",
    "apply_log",
    "encode",
    "ops_to_writes",
    "parse",
    "replay",
]
