"""The one interface every disk consistency backend implements, and the plain file disk.

A backend receives the guest's *committed* writes (the block tap releases a write only
once the checkpoint that covers it is acknowledged) and keeps one or more copies of the
guest disk consistent with the replicated memory. The lifecycle is::

    attach() --> [secondary] --promote()--> [primary] --demote()--> [secondary] --close()

``attach`` brings the disk up on this host and is idempotent; ``promote`` makes this
host the only writer (failover) and raises :class:`~kemari_suite.errors.DiskError` when
the backend refuses (DRBD: the peer is primary or our data is not up to date; shared
storage: the lease is held by a live host). ``apply`` writes committed writes in order;
``flush`` makes them durable.

What a backend needs from the engine is declared in :class:`DiskCaps` (``backend.caps``),
never inferred from its name: the engine asks ``caps.streams_copy`` (stream a copy over
the replication link), ``caps.tracks_dirty``, ``caps.has_sidecar``, ``caps.replays_log``,
``caps.lease`` and ``caps.reserved_bytes``. The methods that belong to a capability exist
on every backend and do nothing (or return nothing) without it, so the engine calls
only this contract. :func:`kemari_suite.disk.open_backend` makes the configured one.

:class:`FileDisk` is the simplest backend: a raw image file or a block device opened
``O_RDWR``, written with ``pwrite`` and flushed with ``fdatasync``. The built-in disk,
the DRBD backend and the shared-storage backend write through one.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from kemari_suite.errors import DiskError

if TYPE_CHECKING:
    from kemari_suite.ha.lease import LeaseTiebreaker

#: ``(offset, length)`` of a range of the guest disk.
Extent = tuple[int, int]


class DiskRole(enum.Enum):
    """This host's role for the disk."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DiskStatus:
    """What a backend reports about its disk on this host.

    Attributes:
        backend: the backend's name ("builtin", "drbd", "shared", "file").
        role: this host's role.
        connected: the *other* copy (DRBD peer) or the shared device and its lease are
            reachable. A plain :class:`FileDisk` keeps no other copy and reports False, so
            that a caller never mistakes it for a protected disk.
        up_to_date: this host's copy holds the latest committed data.
        resync_percent: progress of a running resynchronisation, or None when none runs.
        detail: backend-specific facts (DRBD states, lease holder, ...), JSON-friendly.
    """

    backend: str
    role: DiskRole
    connected: bool
    up_to_date: bool
    resync_percent: float | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DiskCaps:
    """What a backend needs from the engine: declared by the backend, never inferred
    from its name.

    Attributes:
        streams_copy: the data travels over the replication link (the built-in disk).
            In the first (FULL) epoch the primary streams a full copy (``copy_chunks``)
            or, with ``tracks_dirty``, only the dirty blocks; the standby writes it
            through ``begin_copy``/``commit_copy``/``abort_copy`` and applies every
            committed epoch's I/O log to its own copy before acknowledging.
        tracks_dirty: while ``tracking`` is on, the backend records the blocks written,
            so a returning standby that still holds our copy gets only those
            (``dirty_chunks``; ``clear_dirty`` once the standby has them).
        has_sidecar: the disk records which copy it is (lineage) and through which epoch
            it is applied (``read_state``/``write_state``/``clear_state``).
        replays_log: the data reaches the standby's storage without the engine (one
            shared device, or DRBD underneath): the standby keeps committed I/O logs
            until the primary reports them durable, and at failover replays them after
            ``promote`` (writes are idempotent).
        lease: writes are fenced by a lease on the storage; ``tiebreaker()`` is that
            lease as the engine's tiebreaker (use it instead of a second lease object,
            or the backend's own view of the lease runs out and it refuses writes).
        reserved_bytes: bytes at the head of the device that are not guest data (the
            shared lease area): QEMU opening the device directly needs this offset, and
            the guest disk is this much smaller than the device.
    """

    streams_copy: bool = False
    tracks_dirty: bool = False
    has_sidecar: bool = False
    replays_log: bool = False
    lease: bool = False
    reserved_bytes: int = 0


@dataclass(frozen=True)
class CopyState:
    """Which copy a disk is (``lineage``, new for every full copy; empty: nobody's) and
    through which epoch its committed writes are applied (``epoch``; -1: unknown)."""

    lineage: str = ""
    epoch: int = -1

    @property
    def known(self) -> bool:
        return bool(self.lineage) and self.epoch >= 0

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON object (also what the standby sends the primary)."""
        return {"lineage": self.lineage, "epoch": self.epoch}


@runtime_checkable
class DiskBackend(Protocol):
    """The contract between the engine and every disk backend.

    The one rule: a write reaches ``apply`` only once the checkpoint that contains it
    is acknowledged, and in the order the guest issued it; so the disk is never ahead
    of the replicated memory. Calls, in order::

        attach()                       once, before anything else (idempotent)
        promote()                      before the first apply on the host that runs
                                       the guest (DRBD: drbdadm primary; shared: take
                                       the lease; built-in: records the role)
        read / apply / flush           ``apply`` and ``flush`` from one thread at a
                                       time; ``read`` concurrently from others
        demote()                       the guest stops here (switchover)
        close()

    ``caps`` says which of the capability methods below mean anything; without the
    capability they return nothing and change nothing (``begin_copy`` and
    ``commit_copy`` raise :class:`~kemari_suite.errors.DiskError`, ``tiebreaker``
    too). ``size`` is the guest-visible size in bytes, known after ``attach`` (DRBD: after
    ``promote``, where a Secondary cannot be opened).
    """

    name: str
    #: ``tracks_dirty``: record the blocks ``apply`` writes while True.
    tracking: bool

    @property
    def caps(self) -> DiskCaps:
        """What this backend needs from the engine."""
        ...

    @property
    def size(self) -> int:
        """Guest-visible size in bytes (0 until known)."""
        ...

    def attach(self) -> None:
        """Bring the disk up on this host (idempotent).

        Raises:
            DiskError: the disk cannot be opened or configured.
        """

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at guest offset ``offset``.

        Raises:
            DiskError: not open for reading here, outside the disk, or the read failed.
        """
        ...

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write committed writes, each ``(byte offset, data)``, in order.

        Raises:
            DiskError: a write failed or lies outside the disk.
        """

    def flush(self) -> None:
        """Make every applied write durable.

        Raises:
            DiskError: the flush failed.
        """

    def promote(self) -> None:
        """Become the writer (failover).

        Raises:
            DiskError: the backend refuses (another host is or may be the writer).
        """

    def demote(self) -> None:
        """Stop being the writer."""

    def status(self) -> DiskStatus:
        """Report this host's view of the disk."""
        ...

    def close(self) -> None:
        """Release what ``attach`` opened (it does not tear replication down)."""

    # ---- streams_copy ---------------------------------------------------------------

    def copy_chunks(self) -> list[Extent]:
        """The chunks of a full copy, in order (empty without ``streams_copy``)."""
        ...

    def begin_copy(self, *, full: bool) -> DiskBackend:
        """The standby: a copy streamed by the primary starts; return where its writes go.

        ``full``: into a fresh file swapped in by :meth:`commit_copy` (the current copy
        stays valid until then); otherwise in place, and this copy stops counting as
        anybody's (``clear_state``) until :meth:`commit_copy`.

        Raises:
            DiskError: no ``streams_copy``, or the fresh file cannot be created.
        """
        ...

    def commit_copy(self, lineage: str, epoch: int) -> None:
        """The epoch that carried the copy committed: swap a full copy in (flushed,
        renamed, directory synced), then ``write_state(lineage, epoch)``.

        Raises:
            DiskError: no ``streams_copy``, no copy begun, or the I/O failed.
        """

    def abort_copy(self) -> None:
        """The epoch that carried the copy was rolled back: drop a fresh file."""

    # ---- tracks_dirty ---------------------------------------------------------------

    def dirty_chunks(self) -> list[Extent]:
        """The blocks written while ``tracking`` (empty without ``tracks_dirty``)."""
        ...

    def clear_dirty(self) -> None:
        """Forget the dirty blocks (the standby holds them now)."""

    # ---- has_sidecar ----------------------------------------------------------------

    def read_state(self) -> CopyState:
        """Which copy this disk is (an empty CopyState without ``has_sidecar`` or when
        unknown)."""
        ...

    def write_state(self, lineage: str, epoch: int) -> None:
        """Record that this disk is copy ``lineage`` through ``epoch``, crash-safely:
        the data is flushed first, so the record is never ahead of the data.

        Raises:
            DiskError: the flush or the write failed.
        """

    def clear_state(self) -> None:
        """This copy is nobody's from now on (durably, before anything diverges).

        Raises:
            DiskError: the record could not be removed.
        """

    # ---- lease ----------------------------------------------------------------------

    def tiebreaker(self) -> LeaseTiebreaker:
        """The lease as the engine's tiebreaker (same object as the one ``apply`` checks).

        Raises:
            DiskError: no ``lease``, or not attached.
        """
        ...


class PlainCapabilities:
    """The capability methods of :class:`DiskBackend` for a backend that has none of
    them: mix it in and set ``caps``, ``name`` and ``tracking``."""

    name: str
    tracking: bool

    def copy_chunks(self) -> list[Extent]:
        return []

    def begin_copy(self, *, full: bool) -> DiskBackend:
        raise DiskError(self.name, "this backend does not take a streamed copy")

    def commit_copy(self, lineage: str, epoch: int) -> None:
        raise DiskError(self.name, "this backend does not take a streamed copy")

    def abort_copy(self) -> None:
        return None

    def dirty_chunks(self) -> list[Extent]:
        return []

    def clear_dirty(self) -> None:
        return None

    def read_state(self) -> CopyState:
        return CopyState()

    def write_state(self, lineage: str, epoch: int) -> None:
        return None

    def clear_state(self) -> None:
        return None

    def tiebreaker(self) -> LeaseTiebreaker:
        raise DiskError(self.name, "this backend has no lease")


def device_size(path: str | os.PathLike[str], sysfs: Path = Path("/sys")) -> int | None:
    """Size in bytes of the image or block device at ``path``: by seeking to its end, or,
    for a block device that refuses to open (a DRBD 8.4 Secondary), from the kernel's
    ``/sys/dev/block/MAJ:MIN/size`` (512-byte sectors). None when it is missing or no
    size can be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            return None
        finally:
            os.close(fd)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    entry = sysfs / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" / "size"
    try:
        return int(entry.read_text().strip()) * 512
    except (OSError, ValueError):
        return None


def check_write(name: str, size: int, offset: int, length: int, what: str = "write") -> None:
    """Raise DiskError unless ``[offset, offset+length)`` lies inside a disk of ``size`` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise DiskError(
            name, f"{what} of {length} bytes at offset {offset} lies outside the {size}-byte disk"
        )


class FileDisk(PlainCapabilities):
    """A raw image file or block device, opened ``O_RDWR``: apply = pwrite, flush = fdatasync.

    ``offset`` skips a reserved head (the shared-storage lease area); guest offsets are
    relative to it. ``size`` limits the usable length (default: to the end of the file or
    device, measured at attach). The role is informational: a secondary applies committed
    writes to its own copy while it is a secondary. It keeps no other copy: no
    capabilities.
    """

    name = "file"
    caps = DiskCaps()

    def __init__(self, path: str | os.PathLike[str], *, offset: int = 0, size: int | None = None):
        if offset < 0:
            raise DiskError(self.name, f"{path}: negative data offset {offset}")
        self.path = Path(path)
        self.offset = offset
        self._want_size = size
        self.size = 0
        self.role = DiskRole.UNKNOWN
        self.tracking = False
        self._fd: int | None = None

    # ---- lifecycle ------------------------------------------------------------------

    def attach(self) -> None:
        """Open the file or device (idempotent).

        Raises:
            DiskError: it cannot be opened, or it is smaller than ``offset + size``.
        """
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DiskError(self.name, f"cannot open {self.path}: {err.strerror}") from err
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise DiskError(self.name, f"{self.path} is neither a file nor a block device")
            total = os.lseek(fd, 0, os.SEEK_END)
            avail = total - self.offset
            if avail < 0 or (self._want_size is not None and self._want_size > avail):
                want = self._want_size if self._want_size is not None else 0
                raise DiskError(
                    self.name,
                    f"{self.path} has {total} bytes, fewer than offset {self.offset} + size {want}",
                )
        except BaseException:
            os.close(fd)
            raise
        self.size = self._want_size if self._want_size is not None else avail
        self._fd = fd
        if self.role is DiskRole.UNKNOWN:
            self.role = DiskRole.SECONDARY

    @property
    def attached(self) -> bool:
        return self._fd is not None

    def _require_fd(self) -> int:
        if self._fd is None:
            raise DiskError(self.name, f"{self.path} is not attached")
        return self._fd

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write each ``(offset, data)`` in order with ``pwrite`` (short writes retried).

        Raises:
            DiskError: not attached, a write lies outside the disk, or pwrite failed.
        """
        fd = self._require_fd()
        # Check every write first so that a bad batch is refused as a whole.
        for off, data in writes:
            check_write(self.name, self.size, off, len(data))
        for off, data in writes:
            view = memoryview(data)
            pos = self.offset + off
            try:
                while view:
                    n = os.pwrite(fd, view, pos)
                    if n <= 0:
                        raise DiskError(self.name, f"pwrite {self.path} at {pos} wrote nothing")
                    view = view[n:]
                    pos += n
            except OSError as err:
                raise DiskError(
                    self.name, f"pwrite {self.path} at {self.offset + off}: {err.strerror}"
                ) from err

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at guest offset ``offset`` (for verification and tests).

        Raises:
            DiskError: not attached, outside the disk, or pread failed.
        """
        fd = self._require_fd()
        check_write(self.name, self.size, offset, length, "read")
        out = bytearray()
        try:
            while len(out) < length:
                chunk = os.pread(fd, length - len(out), self.offset + offset + len(out))
                if not chunk:
                    raise DiskError(self.name, f"{self.path}: short read at {offset}")
                out += chunk
        except OSError as err:
            raise DiskError(self.name, f"pread {self.path} at {offset}: {err.strerror}") from err
        return bytes(out)

    def flush(self) -> None:
        """``fdatasync`` the file or device.

        Raises:
            DiskError: not attached or the flush failed (the data may not be durable).
        """
        fd = self._require_fd()
        try:
            os.fdatasync(fd)
        except OSError as err:
            raise DiskError(self.name, f"fdatasync {self.path}: {err.strerror}") from err

    def promote(self) -> None:
        """A local file has no other writer to fence: always succeeds."""
        self._require_fd()
        self.role = DiskRole.PRIMARY

    def demote(self) -> None:
        if self._fd is not None:
            self.flush()
        self.role = DiskRole.SECONDARY

    def status(self) -> DiskStatus:
        return DiskStatus(
            backend=self.name,
            role=self.role,
            connected=False,
            up_to_date=self._fd is not None,
            resync_percent=None,
            detail={
                "path": str(self.path),
                "offset": self.offset,
                "size": self.size,
                "attached": self._fd is not None,
            },
        )

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self.role = DiskRole.UNKNOWN

    def __enter__(self) -> Self:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
