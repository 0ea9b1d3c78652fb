"""The built-in replicated disk: one raw image per host, kept equal over the replication
link, with a dirty-block bitmap for an incremental resync and a sidecar saying which
copy the image is.

The data path (``caps.streams_copy``)::

    primary                                      standby
    -------                                      -------
    FULL epoch: copy_chunks() or dirty_chunks()  begin_copy(full=...) -> target
      streamed in the epoch's I/O logs    -->    target.apply(writes of the copy)
                                                 at commit: commit_copy(lineage, epoch)
    each epoch: its I/O log               -->    apply(writes), then write_state(...)
    ack of e: the tap applies e's writes          (before the acknowledgement)

While no standby receives the writes (unprotected, or writing through the log of
epochs a lost standby never acknowledged), ``tracking`` is on and :meth:`apply` marks
the :data:`RESYNC_BLOCK`-sized blocks it writes. A returning standby that still holds
this primary's copy (same lineage, applied at least through the last epoch it
acknowledged) gets only those blocks (``dirty_chunks``); the engine calls
``clear_dirty`` once the epoch that carried them committed.

The sidecar ``<image>.kemari.json`` records ``{"lineage": L, "epoch": E}``: this image is
copy ``L`` (a random id chosen by the primary for every full copy) with every committed
write through epoch ``E`` applied. It must never be ahead of the data, or an incremental
resync would skip blocks the image lacks: :meth:`BuiltinDisk.write_state` flushes the
image first, then writes the sidecar to a temporary file, fsyncs it, renames it over the
old one and fsyncs the directory (:func:`~kemari_suite.protocol.files.write_owner_only`).
A copy that diverges (failover, an in-place resync in progress) loses its sidecar first
(unlink, directory fsync).

The sidecar may also record ``"generation": G``, the tiebreaker's generation (fencing
token) of the run whose data this copy holds (:attr:`BuiltinDisk.generation`, kept
across later records that do not give one; :meth:`BuiltinDisk.record_generation` sets
or drops it at once). It is what the lease block's generation is to the shared disk
(:mod:`kemari_suite.disk.shared`): a standby records the generation of the primary
streaming to it, and the standby that wins a takeover records its grant's before it
resumes (:mod:`kemari_suite.replica.generation`). A standby whose recorded generation is
older than the tiebreaker's holds a copy another host has written past since: it is
stale, and neither a takeover nor an operator's failover resumes it unless the operator
accepts the data loss (:func:`kemari_suite.replica.failover.copy_staleness`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.disk.base import (
    CopyState,
    DiskBackend,
    DiskCaps,
    DiskRole,
    DiskStatus,
    Extent,
    FileDisk,
)
from kemari_suite.errors import DiskError
from kemari_suite.ha.lease import LeaseTiebreaker
from kemari_suite.protocol.files import open_owner_only, write_owner_only

#: Size of one chunk of a full disk copy (one I/O log record each).
DISK_COPY_CHUNK = 4 << 20
#: Granularity of the dirty-block bitmap that resynchronises a returning standby.
RESYNC_BLOCK = 64 << 10
#: Suffix of the sidecar beside the image.
SIDECAR_SUFFIX = ".kemari.json"
#: Suffix of the fresh file a full copy is written into on the standby.
NEXT_SUFFIX = ".next"

NAME = "builtin"


# ---- the sidecar ----------------------------------------------------------------------


def sidecar_path(image: str | os.PathLike[str]) -> Path:
    """The sidecar of ``image``: ``<image>.kemari.json``."""
    return Path(os.fspath(image) + SIDECAR_SUFFIX)


def read_sidecar_generation(path: str | os.PathLike[str]) -> int | None:
    """The generation recorded in the sidecar, or None (no sidecar, none recorded)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    gen = data.get("generation") if isinstance(data, dict) else None
    if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
        return None
    return gen


def read_sidecar(path: str | os.PathLike[str]) -> CopyState:
    """The recorded state, or an empty CopyState when the sidecar is missing or unreadable
    (an unknown copy: the next protection copies it in full)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return CopyState()
    if not isinstance(data, dict):
        return CopyState()
    lineage, epoch = data.get("lineage", ""), data.get("epoch", -1)
    if not isinstance(lineage, str) or isinstance(epoch, bool) or not isinstance(epoch, int):
        return CopyState()
    return CopyState(lineage, epoch)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync directory ``path`` (makes a rename or unlink in it durable).

    Raises:
        DiskError: the directory cannot be opened or synced.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise DiskError(NAME, f"cannot open directory {path}: {err.strerror}") from err
    try:
        os.fsync(fd)
    except OSError as err:
        raise DiskError(NAME, f"fsync {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def write_sidecar(
    path: str | os.PathLike[str], state: CopyState, *, generation: int | None = None
) -> None:
    """Replace the sidecar atomically and durably, mode 0600 (it names the copy's lineage
    and generation), through :func:`~kemari_suite.protocol.files.write_owner_only`:
    temporary file, fsync, rename, directory fsync. The caller has made the data durable
    first. ``generation``, when given, is recorded beside the copy state.

    Raises:
        DiskError: any step failed (the old sidecar, if any, is still in place unless
            only the directory fsync failed).
    """
    record: dict[str, Any] = state.to_dict()
    if generation is not None:
        record["generation"] = generation
    try:
        write_owner_only(path, json.dumps(record).encode(), durable=True)
    except OSError as err:
        raise DiskError(NAME, f"cannot write {path}: {err.strerror or err}") from err


def remove_sidecar(path: str | os.PathLike[str]) -> None:
    """Remove the sidecar durably (unlink, directory fsync); a missing one is fine.

    Raises:
        DiskError: it could not be removed or the directory not synced.
    """
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as err:
        raise DiskError(NAME, f"cannot remove {path}: {err.strerror}") from err
    fsync_dir(path.parent)


def _fdatasync_path(path: str | os.PathLike[str]) -> None:
    """fdatasync a file that is open elsewhere (Linux flushes the file, whichever
    descriptor wrote it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise DiskError(NAME, f"cannot open {path}: {err.strerror}") from err
    try:
        os.fdatasync(fd)
    except OSError as err:
        raise DiskError(NAME, f"fdatasync {path}: {err.strerror}") from err
    finally:
        os.close(fd)


# ---- the backend ----------------------------------------------------------------------


class BuiltinDisk:
    """The built-in replicated disk on one host (see the module docstring).

    ``role`` is the role it starts in after :meth:`attach`; :meth:`promote` and
    :meth:`demote` only record it (there is no other writer to fence: the engine's
    tiebreaker decides which host runs the guest).
    """

    name = NAME
    caps = DiskCaps(streams_copy=True, tracks_dirty=True, has_sidecar=True)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        role: DiskRole = DiskRole.SECONDARY,
        resync_block: int = RESYNC_BLOCK,
        copy_chunk: int = DISK_COPY_CHUNK,
    ) -> None:
        if resync_block <= 0 or copy_chunk <= 0:
            raise DiskError(NAME, "resync_block and copy_chunk must be positive")
        self.path = Path(path)
        self.state_path = sidecar_path(self.path)
        self.next_path = Path(os.fspath(self.path) + NEXT_SUFFIX)
        self.resync_block = resync_block
        self.copy_chunk = copy_chunk
        self.tracking = False
        #: The tiebreaker generation of the data this copy holds, written into the
        #: sidecar with every record (None: keep whatever the sidecar says).
        self.generation: int | None = None
        self._start_role = role
        self._file = FileDisk(self.path)
        self._dirty = bytearray()
        #: The fresh file of a full copy in progress (standby).
        self._next: FileDisk | None = None

    @property
    def size(self) -> int:
        return self._file.size

    @property
    def role(self) -> DiskRole:
        return self._file.role

    # ---- lifecycle ------------------------------------------------------------------

    def attach(self) -> None:
        """Open the image (idempotent).

        Raises:
            DiskError: it cannot be opened.
        """
        if self._file.attached:
            return
        self._file.attach()
        self._file.role = self._start_role
        n = (self.size + self.resync_block - 1) // self.resync_block
        if len(self._dirty) != n:
            self._dirty = bytearray(n)

    def read(self, offset: int, length: int) -> bytes:
        return self._file.read(offset, length)

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Write in order; while ``tracking``, mark the blocks written.

        Raises:
            DiskError: not attached, outside the disk, or the write failed.
        """
        self._file.apply(writes)
        if self.tracking:
            blk, dirty = self.resync_block, self._dirty
            for offset, data in writes:
                first = offset // blk
                last = min((offset + max(1, len(data)) - 1) // blk, len(dirty) - 1)
                dirty[first : last + 1] = b"\x01" * (last - first + 1)

    def flush(self) -> None:
        self._file.flush()

    def promote(self) -> None:
        """Record the role: the engine's tiebreaker already fenced the other host.

        Raises:
            DiskError: not attached.
        """
        self._file.promote()

    def demote(self) -> None:
        self._file.demote()

    def status(self) -> DiskStatus:
        """``connected`` is False: the other copy is reached by the engine's link, which
        the disk does not see."""
        attached = self._file.attached
        state = self.read_state()
        return DiskStatus(
            backend=self.name,
            role=self.role,
            connected=False,
            up_to_date=attached,
            resync_percent=None,
            detail={
                "path": str(self.path),
                "size": self.size,
                "attached": attached,
                "tracking": self.tracking,
                "dirty_blocks": sum(self._dirty),
                "copy_in_progress": self._next is not None,
                **state.to_dict(),
                "generation": self.read_generation(),
            },
        )

    def close(self) -> None:
        self.abort_copy()
        self._file.close()

    # ---- streams_copy ---------------------------------------------------------------

    def copy_chunks(self) -> list[Extent]:
        size, step = self.size, self.copy_chunk
        return [(o, min(step, size - o)) for o in range(0, size, step)]

    def begin_copy(self, *, full: bool) -> DiskBackend:
        """See :meth:`DiskBackend.begin_copy`; a copy still in progress is dropped.

        Raises:
            DiskError: not attached, or the fresh file cannot be created.
        """
        self.abort_copy()
        if not self._file.attached:
            raise DiskError(self.name, f"{self.path} is not attached")
        if not full:
            # Written in place: until the epoch commits the copy is neither the old nor
            # the new one, so it must not count as anybody's.
            self.clear_state()
            return self
        try:
            # Guest data: 0600, whatever the umask.
            with open_owner_only(self.next_path, "wb") as f:
                f.truncate(self.size)
        except OSError as err:
            raise DiskError(self.name, f"cannot create {self.next_path}: {err.strerror}") from err
        nxt = FileDisk(self.next_path)
        nxt.attach()
        self._next = nxt
        return nxt

    def commit_copy(self, lineage: str, epoch: int) -> None:
        """See :meth:`DiskBackend.commit_copy`.

        Raises:
            DiskError: the I/O failed (a full copy not swapped in leaves the old one).
        """
        nxt, self._next = self._next, None
        if nxt is not None:
            try:
                nxt.flush()
            finally:
                nxt.close()
            role = self.role
            self._file.close()
            try:
                os.replace(self.next_path, self.path)
            except OSError as err:
                raise DiskError(
                    self.name, f"cannot rename {self.next_path}: {err.strerror}"
                ) from err
            fsync_dir(self.path.parent)
            self._file = FileDisk(self.path)
            self._file.attach()
            self._file.role = role if role is not DiskRole.UNKNOWN else self._start_role
        self.write_state(lineage, epoch)

    def abort_copy(self) -> None:
        nxt, self._next = self._next, None
        if nxt is not None:
            nxt.close()
            with contextlib.suppress(FileNotFoundError):
                self.next_path.unlink()

    # ---- tracks_dirty ---------------------------------------------------------------

    def dirty_blocks(self) -> list[int]:
        """Indices of the dirty blocks."""
        return [i for i, d in enumerate(self._dirty) if d]

    def dirty_chunks(self) -> list[Extent]:
        size, blk = self.size, self.resync_block
        return [(b * blk, min(blk, size - b * blk)) for b in self.dirty_blocks()]

    def clear_dirty(self) -> None:
        self._dirty[:] = bytes(len(self._dirty))

    # ---- has_sidecar ----------------------------------------------------------------

    def read_state(self) -> CopyState:
        return read_sidecar(self.state_path)

    def write_state(self, lineage: str, epoch: int) -> None:
        """Flush the image, then write the sidecar (module docstring).

        Raises:
            DiskError: the flush or the sidecar write failed.
        """
        if self._file.attached:
            self._file.flush()
        else:
            _fdatasync_path(self.path)
        gen = self.generation
        if gen is None:
            gen = read_sidecar_generation(self.state_path)
        write_sidecar(self.state_path, CopyState(lineage, epoch), generation=gen)

    def read_generation(self) -> int | None:
        """The generation the sidecar records for this copy (None: unknown)."""
        return read_sidecar_generation(self.state_path)

    def record_generation(self, generation: int | None) -> None:
        """Record at once that this copy holds the data of tiebreaker generation
        ``generation`` (None: drop the recorded one, not known), keeping the copy state
        (lineage, epoch) as it is; later records keep it. A copy with no sidecar gets
        one that names no lineage (nobody's replica) but the generation.

        Raises:
            DiskError: the flush or the sidecar write failed.
        """
        self.generation = generation
        if generation is None and self.read_generation() is None:
            return  # nothing recorded, nothing to drop
        if self._file.attached:
            self._file.flush()
        write_sidecar(self.state_path, self.read_state(), generation=generation)

    def clear_state(self) -> None:
        remove_sidecar(self.state_path)

    # ---- lease ----------------------------------------------------------------------

    def tiebreaker(self) -> LeaseTiebreaker:
        raise DiskError(self.name, "the built-in disk has no lease")


# ---- by config (what the engine calls today; prefer the backend's methods) -----------


def disk_state_path(cfg: KemariConfig) -> Path:
    """The sidecar of the configured image: ``<disk.path>.kemari.json``."""
    return sidecar_path(cfg.disk.path)


def write_disk_state(cfg: KemariConfig, lineage: str, epoch: int) -> None:
    """Record that the configured image is copy ``lineage`` through ``epoch``: the image
    is flushed first, then the sidecar is replaced durably.

    Raises:
        DiskError: the flush or the write failed.
    """
    _fdatasync_path(cfg.disk.path)
    write_sidecar(disk_state_path(cfg), CopyState(lineage, epoch))


def read_disk_state(cfg: KemariConfig) -> dict[str, Any]:
    """The sidecar as a dict (``{}`` when there is none or it is unreadable)."""
    state = read_sidecar(disk_state_path(cfg))
    if state == CopyState():
        return {}
    return state.to_dict()


__all__ = [
    "DISK_COPY_CHUNK",
    "RESYNC_BLOCK",
    "BuiltinDisk",
    "disk_state_path",
    "fsync_dir",
    "read_disk_state",
    "read_sidecar",
    "read_sidecar_generation",
    "remove_sidecar",
    "sidecar_path",
    "write_disk_state",
    "write_sidecar",
]
