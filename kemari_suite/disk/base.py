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

:class:`FileDisk` is the simplest backend: a raw image file or a block device opened
``O_RDWR``, written with ``pwrite`` and flushed with ``fdatasync``. The DRBD backend
writes through it to ``/dev/drbdN``, the shared-storage backend to the shared device.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from kemari_suite.errors import DiskError


class DiskRole(enum.Enum):
    """This host's role for the disk."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class DiskStatus:
    """What a backend reports about its disk on this host.

    Attributes:
        backend: the backend's name ("file", "drbd", "shared", ...).
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


@runtime_checkable
class DiskBackend(Protocol):
    """The interface of every disk backend (see the module docstring for the lifecycle)."""

    name: str

    def attach(self) -> None:
        """Bring the disk up on this host (idempotent).

        Raises:
            DiskError: the disk cannot be opened or configured.
        """

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

    def close(self) -> None:
        """Release what ``attach`` opened (it does not tear replication down)."""


def check_write(name: str, size: int, offset: int, length: int, what: str = "write") -> None:
    """Raise DiskError unless ``[offset, offset+length)`` lies inside a disk of ``size`` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise DiskError(
            name, f"{what} of {length} bytes at offset {offset} lies outside the {size}-byte disk"
        )


class FileDisk:
    """A raw image file or block device, opened ``O_RDWR``: apply = pwrite, flush = fdatasync.

    ``offset`` skips a reserved head (the shared-storage lease area); guest offsets are
    relative to it. ``size`` limits the usable length (default: to the end of the file or
    device, measured at attach). The role is informational: a secondary applies committed
    writes to its own copy while it is a secondary.
    """

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, offset: int = 0, size: int | None = None):
        if offset < 0:
            raise DiskError(self.name, f"{path}: negative data offset {offset}")
        self.path = Path(path)
        self.offset = offset
        self._want_size = size
        self.size = 0
        self.role = DiskRole.UNKNOWN
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
