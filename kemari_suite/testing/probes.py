"""Test instruments the replication engine calls but production leaves off.

:class:`CommitProbeLog` is a commit observer of the secondary's epoch receiver
(``on_commit(epoch, pages)``): at every commit it reads the value of one guest probe
from the replica and appends ``{"epoch", "t", "probe"}`` (``t`` wall clock) to a JSON
lines file. It is independent evidence of what the committed state may have sent: the
output-commit tests compare it with what reached the client. Enabled by
``[testing] commit_probe`` (see :class:`~kemari_suite.config.TestingConfig`).

The probe format belongs to the guest memory layer, which sits above this package:
the caller passes the functions that find and read a probe.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import numpy.typing as npt


class ProbeHit(Protocol):
    """One probe found in guest RAM (what the locate function returns)."""

    @property
    def offset(self) -> int: ...

    @property
    def value(self) -> int: ...


#: ``locate(pages, magic)``: every probe with that magic in the RAM image.
Locate = Callable[[npt.NDArray[np.uint8], bytes], Sequence[ProbeHit]]
#: ``read_value(pages, offset, magic)``: the probe's value at ``offset``, None if gone.
ReadValue = Callable[[npt.NDArray[np.uint8], int, bytes], "int | None"]


class CommitProbeLog:
    """Appends the probe's value at every commit to ``path``; see the module docstring.

    The probe is located once (the highest value wins among several hits) and then
    read at the same offset, located again only when it disappears.
    """

    def __init__(
        self,
        path: Path,
        magic: bytes,
        *,
        locate: Locate,
        read_value: ReadValue,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.magic = magic
        self._locate = locate
        self._read_value = read_value
        self._clock = clock
        self._offset: int | None = None
        self._file: IO[str] | None = None

    def read(self, pages: npt.NDArray[np.uint8]) -> int | None:
        """The probe's value in ``pages``, or None when there is none."""
        value = None
        if self._offset is not None:
            value = self._read_value(pages, self._offset, self.magic)
        if value is None:
            hits = self._locate(pages, self.magic)
            if hits:
                best = max(hits, key=lambda h: h.value)
                self._offset, value = best.offset, best.value
        return value

    def __call__(self, epoch: int, pages: npt.NDArray[np.uint8]) -> None:
        record: dict[str, Any] = {"epoch": epoch, "t": self._clock(), "probe": self.read(pages)}
        if self._file is None:
            self._file = self.path.open("a", buffering=1)
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["CommitProbeLog", "Locate", "ProbeHit", "ReadValue"]
