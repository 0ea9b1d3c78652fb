"""Pre-shared keys: where they come from, what is refused, how a new one is made.

The replication key authenticates every frame on the replication link (HMAC-SHA256),
so it must be at least as long as the MAC (:data:`MIN_KEY_BYTES`), and it is read from
a key file (``replication.key_file``) that only its owner can read. An inline
``replication.key`` is still accepted when it is long enough; setting both is refused,
since nobody could tell which one the peer has.

A key file holds the key as text on one line (``kemari key generate`` writes 64 hex
digits: 32 random bytes); surrounding whitespace is not part of the key.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError
from kemari_suite.protocol.files import FILE_MODE, open_owner_only

#: Shortest key accepted, in bytes (HMAC-SHA256 wants at least its output size).
MIN_KEY_BYTES = 32
#: Random bytes in a generated key (written as twice as many hex digits).
GENERATED_KEY_BYTES = 32


def check_key_length(key: bytes, *, what: str, where: str = "") -> bytes:
    """``key`` itself, when it is at least :data:`MIN_KEY_BYTES` long.

    Raises:
        ConfigError: (key ``what``) a shorter key; ``where`` names its file, if any.
    """
    if len(key) < MIN_KEY_BYTES:
        src = f"the key in {where}" if where else "the key"
        raise ConfigError(
            f"{src} is {len(key)} bytes; keys must be at least {MIN_KEY_BYTES} bytes "
            "(`kemari key generate` writes one)",
            key=what,
        )
    return key


def read_key_file(path: str | os.PathLike[str], *, what: str) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: (key ``what``) the file cannot be read or is not a regular file,
            is readable or writable by group or others (the message names the file and
            its mode), or holds a key shorter than :data:`MIN_KEY_BYTES`.
    """
    p = Path(path)
    try:
        # Non-blocking: a FIFO in the key file's place must not hang the agent.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"cannot read key file {p}: {err.strerror}", key=what) from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"key file {p} is not a regular file", key=what)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read().strip()
        except OSError as err:
            raise ConfigError(f"cannot read key file {p}: {err.strerror}", key=what) from err
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"key file {p} has mode {mode:04o}: group or others can reach it; "
            f"it must be readable by its owner alone (chmod 600 {p})",
            key=what,
        )
    if not data:
        raise ConfigError(f"key file {p} is empty", key=what)
    return check_key_length(data, what=what, where=str(p))


def load_replication_key(cfg: KemariConfig) -> bytes:
    """The replication link's pre-shared key: from ``replication.key_file``, else the
    inline ``replication.key``.

    Raises:
        ConfigError: no key at all, both set, an unsafe or unreadable key file, or a
            key shorter than :data:`MIN_KEY_BYTES` (each message names the key or file).
    """
    r = cfg.replication
    if r.key_file and r.key:
        raise ConfigError(
            "set replication.key_file or replication.key, not both", key="replication.key"
        )
    if r.key_file:
        return read_key_file(r.key_file, what="replication.key_file")
    if r.key:
        return check_key_length(r.key.encode("utf-8"), what="replication.key")
    raise ConfigError(
        "no replication key: set replication.key_file (`kemari key generate -o FILE` "
        "writes one); the agents refuse an unauthenticated link",
        key="replication.key_file",
    )


def generate_key() -> str:
    """A new random key as text: :data:`GENERATED_KEY_BYTES` random bytes in hex."""
    return secrets.token_hex(GENERATED_KEY_BYTES)


def write_key_file(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a new random key to ``path``, mode 0600, atomically: the key is written to
    a temporary file beside it, then renamed into place, so no reader ever sees a
    partial key or a wider mode. Returns the path.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
        OSError: the file cannot be written.
    """
    p = Path(path)
    if p.exists() and not force:
        raise FileExistsError(f"{p} exists (pass --force to replace it)")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open_owner_only(tmp, "x") as f:
            f.write(generate_key() + "\n")
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, p)
        else:
            # link(2) fails if the name appeared meanwhile: never replace a key by accident.
            os.link(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    os.chmod(p, FILE_MODE)
    _fsync_dir(p.parent)
    return p


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "GENERATED_KEY_BYTES",
    "MIN_KEY_BYTES",
    "check_key_length",
    "generate_key",
    "load_replication_key",
    "read_key_file",
    "write_key_file",
]
