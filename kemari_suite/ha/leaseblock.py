"""The lease block itself: its layout (see :mod:`kemari_suite.ha.lease`) and the
4 KiB reads and writes that bypass the page cache."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kemari_suite.errors import LeaseError

LEASE_MAGIC = b"KEMLEASE"
LEASE_VERSION = 2
LEASE_BLOCK = 4096
_NAME_LEN = 64
#: flags bit: ``solo_owner`` runs (or ran) without a secondary.
FLAG_SOLO = 1
_V1_LAYOUT = struct.Struct("<8sII64s64sQQddd")


def _name(raw: bytes, device: str) -> str:
    try:
        return raw.rstrip(b"\0").decode()
    except UnicodeDecodeError as err:
        raise LeaseError(device, f"corrupted lease: bad name encoding ({err})") from err


@dataclass(frozen=True)
class LeaseRecord:
    """The decoded lease block (see the module docstring for the layout)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<8sII64s64sQQddd64s")

    resource: str
    owner: str | None
    generation: int
    counter: int
    expires_wall: float
    lease_s: float
    written_wall: float
    #: SOLO flag: every copy but ``solo_owner``'s is stale.
    solo: bool = False
    solo_owner: str | None = None

    def stale_for(self, node: str) -> bool:
        """Is ``node``'s copy stale (another host ran alone since it was paired)?"""
        return self.solo and (self.solo_owner or self.owner) != node

    def stale_reason(self) -> str:
        return (
            f"{self.solo_owner or self.owner} ran without a secondary after this copy's last "
            f"checkpoint (generation {self.generation}): the copy is stale, resuming or "
            "replaying it would lose acknowledged work"
        )

    def encode(self) -> bytes:
        """The 4096-byte block.

        Raises:
            LeaseError: a name does not fit in 64 bytes.
        """
        res, owner = self.resource.encode(), (self.owner or "").encode()
        solo_owner = (self.solo_owner or "").encode()
        if max(len(res), len(owner), len(solo_owner)) > _NAME_LEN:
            raise LeaseError(self.resource, "resource and owner names must fit in 64 bytes")
        body = self.LAYOUT.pack(
            LEASE_MAGIC,
            LEASE_VERSION,
            FLAG_SOLO if self.solo else 0,
            res,
            owner,
            self.generation,
            self.counter,
            self.expires_wall,
            self.lease_s,
            self.written_wall,
            solo_owner,
        )
        return (body + hashlib.sha256(body).digest()).ljust(LEASE_BLOCK, b"\0")

    @classmethod
    def decode(cls, block: bytes, device: str) -> LeaseRecord:
        """Raises LeaseError: unformatted (all zeroes), wrong magic/version, bad checksum."""
        if len(block) < cls.LAYOUT.size + 32:
            raise LeaseError(device, f"lease block too short ({len(block)} bytes)")
        if not any(block):
            raise LeaseError(device, "lease area is not formatted (all zeroes)")
        magic, version = block[:8], int.from_bytes(block[8:12], "little")
        if magic != LEASE_MAGIC:
            raise LeaseError(
                device, f"not a Kemari lease (magic {magic!r}): corrupted or wrong device"
            )
        if version not in (1, LEASE_VERSION):
            raise LeaseError(device, f"lease version {version}, expected {LEASE_VERSION}")
        layout = _V1_LAYOUT if version == 1 else cls.LAYOUT
        n = layout.size
        body, digest = block[:n], block[n : n + 32]
        if hashlib.sha256(body).digest() != digest:
            raise LeaseError(device, "corrupted lease: checksum mismatch")
        fields = layout.unpack(body)
        _magic, _version, flags, res, owner, gen, counter, exp, lease_s, written = fields[:10]
        solo_owner = _name(fields[10], device) if version >= 2 else ""
        return cls(
            _name(res, device),
            _name(owner, device) or None,
            gen,
            counter,
            exp,
            lease_s,
            written,
            solo=bool(flags & FLAG_SOLO),
            solo_owner=solo_owner or None,
        )


class _BlockIO:
    """Reads and writes one 4 KiB block, bypassing the page cache where possible."""

    def __init__(self, path: Path, offset: int, direct: bool | None) -> None:
        self.path, self.offset = path, offset
        self.buf = mmap.mmap(-1, LEASE_BLOCK)  # page-aligned, as O_DIRECT wants
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_SYNC
        try:
            st = os.stat(path)
        except OSError as err:
            raise LeaseError(str(path), f"cannot open: {err.strerror}") from err
        is_block = stat.S_ISBLK(st.st_mode)
        self.direct = False
        if direct is not False:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as err:
                if err.errno != errno.EINVAL or direct is True or is_block:
                    raise LeaseError(
                        str(path), f"cannot open with O_DIRECT: {err.strerror}"
                    ) from err
        if not self.direct:
            try:
                self.fd = os.open(path, flags)
            except OSError as err:
                raise LeaseError(str(path), f"cannot open: {err.strerror}") from err
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size < offset + LEASE_BLOCK:
            os.close(self.fd)
            raise LeaseError(
                str(path), f"{size} bytes: too small for a lease block at offset {offset}"
            )

    def read(self) -> bytes:
        try:
            if not self.direct:
                os.posix_fadvise(self.fd, self.offset, LEASE_BLOCK, os.POSIX_FADV_DONTNEED)
            n = os.preadv(self.fd, [self.buf], self.offset)
        except OSError as err:
            raise LeaseError(str(self.path), f"read failed: {err.strerror}") from err
        if n != LEASE_BLOCK:
            raise LeaseError(str(self.path), f"short read ({n} bytes)")
        return bytes(self.buf)

    def write(self, block: bytes) -> None:
        self.buf.seek(0)
        self.buf.write(block)
        try:
            n = os.pwritev(self.fd, [self.buf], self.offset)
            if not self.direct:
                os.fdatasync(self.fd)
        except OSError as err:
            raise LeaseError(str(self.path), f"write failed: {err.strerror}") from err
        if n != LEASE_BLOCK:
            raise LeaseError(str(self.path), f"short write ({n} bytes)")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.buf.close()
