"""Files readable by their owner alone: guest memory, device state, logs, keys.

Guest RAM, the replica, device-state captures, epoch logs and the artifacts of a run
hold the guest's memory or what it did, so every file the agents write is mode 0600 and
every folder they create is 0700. Two layers make that hold:

- the agents (and the QEMU they start, which inherits it) run with umask 0o077, set once
  at start by :func:`set_owner_only_umask` (the systemd units also say ``UMask=0077``);
  this covers the files QEMU and libraries create, which no helper here sees;
- every file this package creates goes through :func:`open_owner_only`,
  :func:`write_owner_only` or :func:`mkdir_owner_only`, which set the mode themselves,
  so it holds even in a process whose umask nobody set (a test, a library caller), and
  for a file that already existed with a wider mode.

This sits in the protocol layer so that every layer above (vm, service, replica, disk)
can use it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any

#: The umask of the agents and QEMU: nothing for group or others.
OWNER_ONLY_UMASK = 0o077
#: Mode of every file the agents write.
FILE_MODE = 0o600
#: Mode of every folder the agents create.
DIR_MODE = 0o700

_OPEN_FLAGS = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "r+": os.O_RDWR | os.O_CREAT,
    "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
}


def set_owner_only_umask() -> int:
    """Set the process umask to 0o077 (for the agent and every process it starts, QEMU
    included); returns the umask it replaces. Call once, at start, before any thread:
    the umask is process-wide."""
    return os.umask(OWNER_ONLY_UMASK)


def open_owner_only(path: str | os.PathLike[str], mode: str = "w", **kw: Any) -> IO[Any]:
    """:func:`open` for writing, the file mode 0600 whatever the umask, even for a file
    that already existed with a wider mode.

    ``mode`` is one of "w", "a", "x", "r+", "w+", with "b" for binary; ``kw`` goes to
    :func:`os.fdopen` (``buffering``, ``encoding``...).

    Raises:
        ValueError: an unsupported ``mode``.
        OSError: the file cannot be opened.
    """
    base = mode.replace("b", "")
    if base not in _OPEN_FLAGS:
        raise ValueError(f"unsupported mode {mode!r} (one of {', '.join(_OPEN_FLAGS)}, +b)")
    fd = os.open(path, _OPEN_FLAGS[base] | os.O_CLOEXEC, FILE_MODE)
    try:
        # O_CREAT leaves an existing file's mode as it was.
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def write_owner_only(
    path: str | os.PathLike[str], data: bytes | str, *, durable: bool = False
) -> Path:
    """Replace ``path`` with ``data`` atomically (a temporary file beside it, renamed
    over it), mode 0600. ``durable`` also fsyncs the file and the folder, so that a host
    crash leaves the old or the new content.

    Raises:
        OSError: the file cannot be written or renamed (the temporary file is removed).
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open_owner_only(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return p


def mkdir_owner_only(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) mode 0700. An existing folder is left as
    it is: it may be a shared one such as /dev/shm or /run.

    Raises:
        OSError: the folder cannot be created.
    """
    p = Path(path)
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
            # mkdir's mode is filtered by the umask; a narrower one is fine, say it exactly.
            os.chmod(d, DIR_MODE)
    return p


def loose_bits(mode: int) -> int:
    """The permission bits of ``mode`` that let group or others in (0: owner only)."""
    return mode & 0o077


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "OWNER_ONLY_UMASK",
    "loose_bits",
    "mkdir_owner_only",
    "open_owner_only",
    "set_owner_only_umask",
    "write_owner_only",
]
