"""Guest RAM as a numpy array: the agent's mapping of QEMU's shared RAM file.

QEMU runs with ``-object memory-backend-file,mem-path=/dev/shm/<vm>.ram,share=on``, so
guest RAM is an ordinary file on a tmpfs. The primary's agent maps that same file
read-only and reads guest pages directly; the secondary maps its replica file read-write
and applies committed pages to it. :attr:`GuestRAM.pages` is a view of shape
``(n_pages, PAGE_SIZE)`` (``uint8``) over the mapping, with no copy.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from kemari_suite.errors import ReplicationError
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only

#: Guest page size. x86 guests with 4 KiB pages; the RAM file must be a multiple of it.
PAGE_SIZE = 4096

# Pre-fault the whole mapping at map time, so that the first scan of a sync point (VM
# stopped) does not take one minor fault per page. Linux only; 0 elsewhere.
_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)

#: Pages per piece of :func:`ram_digest` (16 MiB): the pieces are hashed on two threads.
DIGEST_PIECE_PAGES = 4096


def create_ram_file(path: Path, size: int) -> Path:
    """Create the guest RAM file ``path`` of ``size`` bytes of zeros, mode 0600 (it holds
    guest memory), in a folder created 0700 if missing. A stale file is emptied first.

    QEMU keeps the mode of a RAM file that exists when it starts; one it creates itself
    gets QEMU's umask (the agent's: 0o077).

    Raises:
        OSError: the file cannot be created.
    """
    mkdir_owner_only(path.parent)
    with open_owner_only(path, "wb") as f:
        f.truncate(size)
    return path


def ram_digest(pages: np.ndarray, *, threads: int = 2) -> bytes:
    """SHA-256 over every page of guest RAM ``pages`` (``(n_pages, PAGE_SIZE)`` uint8).

    The RAM is hashed in fixed pieces of :data:`DIGEST_PIECE_PAGES` pages, on
    ``threads`` threads (hashlib releases the GIL), and the digest is that of the size and
    the pieces' digests in order: the same bytes give the same digest whatever the
    thread count. Both hosts of a switchover compute it over the checkpoint they hold
    (about 100 ms for 256 MiB on two threads here).
    """
    n = pages.shape[0]
    flat = pages.reshape(-1)
    step = DIGEST_PIECE_PAGES * PAGE_SIZE

    def piece(start: int) -> bytes:
        return hashlib.sha256(flat[start : start + step].data).digest()

    starts = range(0, n * PAGE_SIZE, step)
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="kemari-digest") as pool:
            parts = list(pool.map(piece, starts))
    else:
        parts = [piece(s) for s in starts]
    total = hashlib.sha256(f"kemari-ram {n} {PAGE_SIZE}".encode())
    for part in parts:
        total.update(part)
    return total.digest()


def file_digest(path: Path) -> bytes:
    """:func:`ram_digest` of the guest RAM file ``path``.

    Raises:
        ReplicationError: the file is missing, unreadable or not whole pages.
    """
    with GuestRAM(path, populate=False) as ram:
        return ram_digest(ram.pages)


class GuestRAM:
    """A shared mapping of a guest RAM file.

    Read-only by default (the primary never writes guest RAM); ``writable=True`` for the
    secondary's replica. Closing drops the agent's reference to the mapping; numpy views
    taken from :attr:`pages` before that stay valid and keep the mapping alive until they
    are gone, so a late reader can never touch unmapped memory.

    Raises:
        ReplicationError: the file is missing, unreadable, empty, or not a whole number
            of pages.
    """

    def __init__(self, path: Path, *, writable: bool = False, populate: bool = True) -> None:
        self._path = Path(path)
        self._writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(self._path, flags | os.O_CLOEXEC)
        except OSError as err:
            raise ReplicationError(f"cannot open guest RAM file {self._path}: {err}") from err
        try:
            size = os.fstat(fd).st_size
            if size <= 0 or size % PAGE_SIZE:
                raise ReplicationError(
                    f"guest RAM file {self._path} is {size} bytes, "
                    f"not a positive multiple of {PAGE_SIZE}"
                )
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            map_flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
            try:
                self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=map_flags, prot=prot)
            except OSError as err:
                raise ReplicationError(f"cannot map guest RAM file {self._path}: {err}") from err
        finally:
            # The mapping holds its own reference to the file.
            os.close(fd)
        self._size = size
        self._n_pages = size // PAGE_SIZE
        # A read-only mapping gives a read-only array: a stray write raises, it does not
        # corrupt the guest.
        self._pages: np.ndarray | None = np.frombuffer(self._mm, dtype=np.uint8).reshape(
            self._n_pages, PAGE_SIZE
        )

    @property
    def path(self) -> Path:
        return self._path

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def size(self) -> int:
        """Size of the RAM file in bytes."""
        return self._size

    @property
    def n_pages(self) -> int:
        return self._n_pages

    @property
    def closed(self) -> bool:
        return self._pages is None

    @property
    def pages(self) -> np.ndarray:
        """The guest pages, shape ``(n_pages, PAGE_SIZE)``, ``uint8``, no copy.

        Raises:
            ReplicationError: the mapping was closed.
        """
        if self._pages is None:
            raise ReplicationError(f"guest RAM {self._path} is closed")
        return self._pages

    def close(self) -> None:
        """Release the agent's mapping. Idempotent."""
        if self._mm is None:
            return
        self._pages = None
        mm, self._mm = self._mm, None
        try:
            mm.close()
        except BufferError:
            # Views handed out by .pages are still alive: they hold the mmap object,
            # which unmaps itself when the last one goes.
            pass

    def __enter__(self) -> GuestRAM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("rw" if self._writable else "ro")
        return f"GuestRAM({str(self._path)!r}, {self._n_pages} pages, {state})"
