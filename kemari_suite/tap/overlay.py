"""A byte-accurate interval map of pending disk writes: what reads must see before
the backend has it.

The map holds non-overlapping extents ``[start, end)``, each backed either by a slice of
an immutable ``bytes`` object (a logged write) or by zeros (a trim or write-zeroes), and
tagged with the epoch of the write that put it there. A later write replaces whatever it
overlaps, splitting the extents at its edges, so every byte has exactly the value of the
newest pending write to it.

When every epoch up to ``e`` has been applied to the backend, :meth:`Overlay.drop_through`
removes the extents tagged ``<= e``: the backend now holds exactly those bytes (an extent
still in the map is the newest write to its bytes; if it is tagged ``<= e``, that write
was applied last). Extents of later epochs stay and keep masking the backend.

Pure data structure: no I/O, no locking; use it from one thread (the event loop).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """``[start, end)`` holds ``data[boff : boff + end - start]``, or zeros if ``data`` is None."""

    start: int
    end: int
    data: bytes | None
    boff: int
    epoch: int

    def clip(self, start: int, end: int) -> Extent:
        """The part of this extent inside ``[start, end)`` (which must overlap it)."""
        s = max(start, self.start)
        e = min(end, self.end)
        return Extent(s, e, self.data, self.boff + (s - self.start), self.epoch)

    def view(self) -> memoryview | None:
        """The bytes of this extent (no copy), or None for zeros."""
        if self.data is None:
            return None
        return memoryview(self.data)[self.boff : self.boff + (self.end - self.start)]


@dataclass(frozen=True, slots=True)
class Piece:
    """One part of a read: ``length`` bytes at ``offset``, from the overlay or the backend.

    ``source`` is ``"overlay"`` (``data`` holds the bytes, or is None for zeros) or
    ``"backend"`` (read them from the backend).
    """

    offset: int
    length: int
    source: str
    data: memoryview | None = None


class Overlay:
    """Interval map of pending writes; see the module docstring."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._extents: list[Extent] = []

    def __len__(self) -> int:
        return len(self._extents)

    def __iter__(self) -> Iterator[Extent]:
        return iter(list(self._extents))

    @property
    def covered_bytes(self) -> int:
        return sum(x.end - x.start for x in self._extents)

    def _first_overlapping(self, start: int) -> int:
        """Index of the first extent whose end is beyond ``start``."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            return 0
        if self._extents[i].end <= start:
            return i + 1
        return i

    def put(self, offset: int, length: int, data: bytes | None, epoch: int) -> None:
        """Record a write of ``data`` (``len(data) == length``), or zeros if None.

        Raises:
            ValueError: negative offset or length, or data of the wrong size.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad extent offset={offset} length={length}")
        if data is not None and len(data) != length:
            raise ValueError(f"data is {len(data)} bytes, length says {length}")
        if length == 0:
            return
        start, end = offset, offset + length
        i = self._first_overlapping(start)
        j = i
        keep: list[Extent] = []
        while j < len(self._extents) and self._extents[j].start < end:
            x = self._extents[j]
            if x.start < start:
                keep.append(x.clip(x.start, start))
            if x.end > end:
                keep.append(x.clip(end, x.end))
            j += 1
        new = Extent(start, end, data, 0, epoch)
        replacement = sorted([*keep, new], key=lambda x: x.start)
        self._extents[i:j] = replacement
        self._starts[i:j] = [x.start for x in replacement]

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """Split ``[offset, offset + length)`` into overlay and backend pieces, in order.

        The overlay pieces reference immutable bytes, so the result stays valid after the
        map changes (a read may complete on another thread).
        """
        out: list[Piece] = []
        pos, end = offset, offset + length
        i = self._first_overlapping(offset)
        while pos < end:
            if i < len(self._extents) and self._extents[i].start < end:
                x = self._extents[i]
                if x.start > pos:
                    out.append(Piece(pos, x.start - pos, "backend"))
                    pos = x.start
                c = x.clip(pos, end)
                out.append(Piece(c.start, c.end - c.start, "overlay", c.view()))
                pos = c.end
                i += 1
            else:
                out.append(Piece(pos, end - pos, "backend"))
                pos = end
        return out

    def drop_through(self, epoch: int) -> int:
        """Remove the extents of epochs ``<= epoch``; return how many were removed."""
        before = len(self._extents)
        self._extents = [x for x in self._extents if x.epoch > epoch]
        self._starts = [x.start for x in self._extents]
        return before - len(self._extents)

    def clear(self) -> None:
        self._extents.clear()
        self._starts.clear()

    def check(self) -> None:
        """Assert the invariants (sorted, non-overlapping, non-empty); for tests.

        Raises:
            AssertionError: an invariant does not hold.
        """
        prev_end = -1
        assert self._starts == [x.start for x in self._extents]
        for x in self._extents:
            assert x.start < x.end, x
            assert x.start >= prev_end, x
            if x.data is not None:
                assert x.boff + (x.end - x.start) <= len(x.data), x
            prev_end = x.end


def assemble(pieces: list[Piece], backend: dict[int, bytes]) -> bytes:
    """Join read pieces; ``backend`` maps a backend piece's offset to the bytes read."""
    out = bytearray()
    for p in pieces:
        if p.source == "backend":
            chunk = backend[p.offset]
            if len(chunk) != p.length:
                raise ValueError(f"backend read at {p.offset}: {len(chunk)} of {p.length} bytes")
            out += chunk
        elif p.data is None:
            out += bytes(p.length)
        else:
            out += p.data
    return bytes(out)
