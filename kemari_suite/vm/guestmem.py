"""Find the guest workloads' probes in a copy or mapping of guest RAM.

The static workload programs (``guest/workloads``) keep their progress in a page-aligned
structure (``guest/workloads/kemari_probe.h``)::

    offset  size  field
    0       16    magic: b"KEMARI-COUNTER!!" (counter), b"KEMARI-MEMDIRTY!" (memdirty),
                  b"KEMARI-TOUCH!!!!" (the benchmarks' ktouch)
    16      8     value, uint64 little endian (counter value / pages dirtied so far)
    24      8     ticks per second (the counter's rate / memdirty's target pages per second)
    32      8     aux (counter: TCP port or 0; memdirty: working set in pages)
    40      8     pid of the guest process

Guest-physical pages sit at page-aligned offsets of the RAM file, so a probe is found by
looking at the first 16 bytes of every 4096-byte page: one strided numpy comparison.
Scan once with :func:`locate_probes`, then read the value at the offset it returned
with :func:`read_value`, which costs one 8-byte read.

The programs wipe the magic when they are stopped by SIGTERM or SIGINT, but a process
killed by SIGKILL leaves its page (with a stale value) until the guest reuses it; with
several hits, :func:`find_counter` reports the highest value.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
COUNTER_MAGIC = b"KEMARI-COUNTER!!"
MEMDIRTY_MAGIC = b"KEMARI-MEMDIRTY!"
STREAM_MAGIC = b"KEMARI-STREAM!!!"
#: The benchmarks' warm-up probe (``ktouch``, :mod:`kemari_suite.bench.touchprobe`): value
#: is the loops done so far (one word written in one page per loop), aux the working set
#: in pages.
TOUCH_MAGIC = b"KEMARI-TOUCH!!!!"

#: Anything exposing guest RAM through the buffer protocol, or a numpy array over it.
RamLike: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | npt.NDArray[np.generic]


@dataclass(frozen=True)
class ProbeHit:
    """One probe found in guest RAM."""

    #: Byte offset of the probe (page-aligned) in the scanned buffer.
    offset: int
    magic: bytes
    value: int
    ticks_per_second: int
    aux: int
    pid: int


def _as_bytes_array(ram: RamLike) -> npt.NDArray[np.uint8]:
    if isinstance(ram, np.ndarray):
        flat = ram.reshape(-1) if ram.flags.c_contiguous else np.ascontiguousarray(ram).reshape(-1)
        return flat.view(np.uint8)
    return np.frombuffer(ram, dtype=np.uint8)


def _words(magic: bytes) -> tuple[np.uint64, np.uint64]:
    if len(magic) != 16:
        raise ValueError(f"a probe magic is 16 bytes, got {len(magic)}")
    lo, hi = np.frombuffer(magic, dtype="<u8")
    return np.uint64(lo), np.uint64(hi)


def locate_probes(ram: RamLike, magic: bytes = COUNTER_MAGIC) -> list[ProbeHit]:
    """Every page of ``ram`` that starts with ``magic``, in address order.

    Raises ValueError if ``magic`` is not 16 bytes long.
    """
    data = _as_bytes_array(ram)
    npages = data.size // PAGE_SIZE
    if npages == 0:
        return []
    lo, hi = _words(magic)
    # (pages, 512) little-endian words: column 0 and 1 are each page's first 16 bytes.
    words = data[: npages * PAGE_SIZE].view("<u8").reshape(npages, PAGE_SIZE // 8)
    pages = np.flatnonzero((words[:, 0] == lo) & (words[:, 1] == hi))
    hits = []
    for page in pages.tolist():
        w = words[page, 2:6].tolist()
        hits.append(
            ProbeHit(
                offset=page * PAGE_SIZE,
                magic=magic,
                value=int(w[0]),
                ticks_per_second=int(w[1]),
                aux=int(w[2]),
                pid=int(w[3]),
            )
        )
    return hits


def read_value(ram: RamLike, offset: int, magic: bytes = COUNTER_MAGIC) -> int | None:
    """The value of the probe at ``offset``, or None if the magic is no longer there."""
    data = _as_bytes_array(ram)
    if offset < 0 or offset % PAGE_SIZE or offset + 24 > data.size:
        return None
    head = data[offset : offset + 24]
    if head[:16].tobytes() != magic:
        return None
    return int(head[16:24].view("<u8")[0])


def find_counter(ram: RamLike) -> int | None:
    """The guest counter's current value, or None if no counter runs in this RAM."""
    hits = locate_probes(ram, COUNTER_MAGIC)
    return max(h.value for h in hits) if hits else None


def find_memdirty(ram: RamLike) -> int | None:
    """Pages dirtied so far by the guest's ``memdirty``, or None if it is not running."""
    hits = locate_probes(ram, MEMDIRTY_MAGIC)
    return max(h.value for h in hits) if hits else None
