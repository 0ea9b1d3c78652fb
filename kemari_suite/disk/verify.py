"""Compare two copies of a guest disk by block checksums (``kemari disk verify``).

The two copies usually live on different hosts: run ``kemari disk checksums IMAGE`` on
one, copy its JSON over, and ``kemari disk verify IMAGE --against THAT.json`` on the
other; or give two image paths when both are reachable. A copy that differs is reported
block by block, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kemari_suite.errors import DiskError

BLOCK = 64 << 10


@dataclass(frozen=True)
class Checksums:
    path: str
    size: int
    block: int
    sums: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {"path": self.path, "size": self.size, "block": self.block, "sums": list(self.sums)}
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> Checksums:
        """Raises DiskError naming ``source`` when the JSON is not a checksum list."""
        try:
            d = json.loads(text)
            return cls(str(d["path"]), int(d["size"]), int(d["block"]), tuple(d["sums"]))
        except (ValueError, KeyError, TypeError) as err:
            raise DiskError("verify", f"{source} is not a checksum file: {err}") from err


@dataclass
class VerifyResult:
    blocks: int
    block: int
    differing: list[int] = field(default_factory=list)
    size_a: int = 0
    size_b: int = 0

    @property
    def same(self) -> bool:
        return not self.differing and self.size_a == self.size_b


def checksums(path: str | os.PathLike[str], *, offset: int = 0, block: int = BLOCK) -> Checksums:
    """BLAKE2b of every ``block`` bytes of ``path`` from ``offset`` on.

    Raises:
        DiskError: the image cannot be read.
    """
    sums: list[str] = []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell() - offset
            f.seek(offset)
            while chunk := f.read(block):
                sums.append(hashlib.blake2b(chunk, digest_size=16).hexdigest())
    except OSError as err:
        raise DiskError("verify", f"cannot read {path}: {err.strerror}") from err
    return Checksums(str(path), max(0, size), block, tuple(sums))


def compare(a: Checksums, b: Checksums) -> VerifyResult:
    """Blocks that differ between two checksum lists (extra blocks count as differing).

    Raises:
        DiskError: the two lists use different block sizes.
    """
    if a.block != b.block:
        raise DiskError("verify", f"block sizes differ: {a.block} and {b.block}")
    n = max(len(a.sums), len(b.sums))
    diff = [i for i in range(n) if i >= len(a.sums) or i >= len(b.sums) or a.sums[i] != b.sums[i]]
    return VerifyResult(blocks=n, block=a.block, differing=diff, size_a=a.size, size_b=b.size)


def load_or_compute(spec: str, *, offset: int = 0) -> Checksums:
    """A checksum JSON file, or an image to checksum."""
    p = Path(spec)
    if p.suffix == ".json":
        try:
            return Checksums.from_json(p.read_text(), spec)
        except OSError as err:
            raise DiskError("verify", f"cannot read {spec}: {err.strerror}") from err
    return checksums(p, offset=offset)
