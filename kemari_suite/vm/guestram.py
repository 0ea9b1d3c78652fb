"""Guest RAM as a numpy array: the agent's mapping of QEMU's shared RAM file.

QEMU runs with ``-object memory-backend-file,mem-path=/dev/shm/<vm>.ram,share=on``, so
guest RAM is an ordinary file on a tmpfs. The primary's agent maps that same file
read-only and reads guest pages directly; the secondary maps its replica file read-write
and applies committed pages to it. :attr:`GuestRAM.pages` is a view of shape
``(n_pages, PAGE_SIZE)`` (``uint8``) over the mapping, with no copy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import threading
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

#: The nice value of digests hashed in the background (:meth:`RamDigests.refresh`).
BACKGROUND_NICE = 10

#: Pages per piece of :func:`ram_digest` (16 KiB): small, so that a replica's digest
#: after a few epochs costs about the pages they wrote (:class:`RamDigests`), not much
#: more; larger pieces make a full digest cheaper (fewer calls) but an update dearer.
DIGEST_PIECE_PAGES = 4


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
    (about 100 ms for 256 MiB on two threads here); the standby keeps it current with
    :class:`RamDigests`.
    """
    return RamDigests(pages).digest(threads=threads)


class RamDigests:
    """The pieces' digests of :func:`ram_digest`, kept while ``pages`` change, so that the
    digest of what they hold at some moment costs only the pieces written since the last
    :meth:`refresh`.

    The one rule that keeps it exact, with writers on other threads: a writer marks the
    pages it wrote *after* writing them (:meth:`touched`); :meth:`refresh` clears a
    piece's mark *before* hashing it. So a piece whose mark is clear was hashed after its
    last write. One refresh at a time (a lock): two would break that order. :meth:`digest`
    needs the pages still (no writer) while it runs; a background refresh (``nice``)
    gives way to it at the next piece, its remaining pieces still marked.
    """

    def __init__(self, pages: np.ndarray) -> None:
        self.pages = pages
        n = pages.shape[0]
        self.n_pages = n
        pieces = -(-n // DIGEST_PIECE_PAGES)
        #: Pieces written (or never hashed) since their digest was taken.
        self.marks = np.ones(pieces, dtype=bool)
        self.digests: list[bytes] = [b""] * pieces
        self._lock = threading.Lock()
        #: Set while :meth:`digest` waits: a background refresh stops early.
        self._wanted = False
        #: Set by :meth:`stop`: no piece is read any more (the pages go away).
        self._stopped = False

    def stop(self) -> None:
        """Stop any refresh at its next piece and wait for it to end: call it before the
        pages are unmapped (a thread still hashing would read freed memory). Idempotent;
        :meth:`refresh` and :meth:`digest` hash nothing afterwards."""
        self._stopped = True
        with self._lock:
            pass

    def touched(self, pages: np.ndarray) -> None:
        """Pages ``pages`` (indices) were written: their pieces' digests are stale."""
        self.marks[np.asarray(pages, dtype=np.intp) // DIGEST_PIECE_PAGES] = True

    @property
    def stale(self) -> int:
        """How many pieces :meth:`digest` would hash."""
        return int(np.count_nonzero(self.marks))

    def refresh(self, *, threads: int = 1, nice: int = 0, background: bool = True) -> int:
        """Hash every marked piece (writers may go on meanwhile); returns how many it
        meant to. ``nice`` > 0: on threads of their own at that lower priority (background
        work never competes with the guest's vCPUs on an equal footing). A ``background``
        refresh stops early when :meth:`digest` is called."""
        with self._lock:
            todo = np.flatnonzero(self.marks)
            parts = np.array_split(todo, threads) if len(todo) > threads > 1 else [todo]
            work = functools.partial(self._hash, nice=nice, background=background)
            if len(parts) == 1 and not nice:
                work(todo)
            else:
                with ThreadPoolExecutor(len(parts), thread_name_prefix="kemari-digest") as pool:
                    list(pool.map(work, parts))
            return len(todo)

    def digest(self, *, threads: int = 1, nice: int = 0) -> bytes:
        """The digest of the pages as they are (:func:`ram_digest`), hashing only the
        marked pieces; the caller keeps the pages still meanwhile.

        Raises:
            ReplicationError: :meth:`stop` came first or meanwhile.
        """
        self._wanted = True
        try:
            self.refresh(threads=threads, nice=nice, background=False)
        finally:
            self._wanted = False
        if self._stopped:
            raise ReplicationError("RAM digest not taken: its pages were closed meanwhile")
        total = hashlib.sha256(f"kemari-ram {self.n_pages} {PAGE_SIZE}".encode())
        for part in self.digests:
            total.update(part)
        return total.digest()

    def _hash(self, pieces: np.ndarray, *, nice: int, background: bool) -> None:
        if nice:
            # This thread only (Linux: a thread is a task of its own).
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        flat = self.pages.reshape(-1)
        step = DIGEST_PIECE_PAGES * PAGE_SIZE
        for p in pieces.tolist():
            if self._stopped or (background and self._wanted):
                return
            self.marks[p] = False  # before the read: a write from now on marks it again
            self.digests[p] = hashlib.sha256(flat[p * step : (p + 1) * step].data).digest()


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

    def populate_in_background(self) -> GuestRAM:
        """Fault the whole mapping in, as ``populate=True`` does, but on a thread of its
        own at a low priority (:data:`BACKGROUND_NICE`), so that mapping a running
        guest's RAM takes no CPU from it at once (50-70 ms for 256 MiB here). Returns
        ``self``."""
        pages = self.pages  # the thread's view keeps the mapping alive

        def run() -> None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            step = 1 << 14
            for start in range(0, len(pages), step):
                # One byte of every page: a read fault maps each one.
                int(pages[start : start + step, 0].max())

        threading.Thread(target=run, name="kemari-populate", daemon=True).start()
        return self

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
