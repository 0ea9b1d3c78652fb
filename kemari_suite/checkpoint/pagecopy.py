"""Whole-page copies by index: the staging copy of the stopped window, and the shadow's.

The stopped window copies every dirty page out of guest RAM into the staging buffer
while the guest waits; for about 4000 scattered pages that copy was more than half of
the uffd-wp tracker's pause. numpy's ``take`` of 4096-byte rows copies each row in
small pieces (6.6 ms for 4000 pages in ``benchmarks/results/sizing.md``); one
``memcpy`` per page, in the package's C helper ``helpers/kemari_pagecopy.c``, runs at
memory speed. ::

    PageCopier.load(cache_dir)   gcc builds the helper once (cached by source hash)
        .gather(src, idx, out)   out[i] = src[idx[i]]      (stage, previous versions)
        .scatter(dst, idx, src)  dst[idx[i]] = src[i]      (commit into a shadow)

Without gcc or a writable cache the copier is numpy's, and ``reason`` says why; both
give the same bytes (``tests/unit/test_pagecopy.py``). The C path runs only on
C-contiguous uint8 rows of equal width and int64 indices, each checked against the
source's row count first: a bad index is a ``ValueError``, never a stray write.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from kemari_suite.errors import SetupError
from kemari_suite.vm.wphelper import PAGECOPY_SOURCE, build_helper

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _rows(a: np.ndarray, what: str) -> None:
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D uint8 array of pages, not {a.dtype} {a.shape}")


def _indices(idx: np.ndarray, n_rows: int) -> int:
    if idx.dtype != np.int64 or idx.ndim != 1:
        raise ValueError(f"page indices must be a 1-D int64 array, not {idx.dtype} {idx.shape}")
    k = len(idx)
    if k and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise ValueError(f"page index out of range 0..{n_rows - 1}")
    return k


class PageCopier:
    """Copies whole pages by index, with the C helper when one is loaded.

    ``PageCopier()`` is numpy's copy; :meth:`load` builds and loads the helper.
    ``name`` is "memcpy" or "numpy"; ``reason`` says why.
    """

    def __init__(self, library: Path | None = None, reason: str = "") -> None:
        self._gather = self._scatter = None
        if library is not None:
            lib = ctypes.CDLL(str(library))
            for fn in (lib.kemari_gather, lib.kemari_scatter):
                fn.argtypes = [_PTR, _PTR, _PTR, _I64, _I64]
                fn.restype = None
            self._gather, self._scatter = lib.kemari_gather, lib.kemari_scatter
        self.name = "numpy" if library is None else "memcpy"
        self.reason = reason or (
            "numpy's take (no helper loaded)" if library is None else f"C helper {library.name}"
        )

    @classmethod
    def load(cls, cache_dir: Path) -> PageCopier:
        """The C copier, built into ``cache_dir`` if needed; numpy's, with the reason,
        when it cannot be built (no gcc, a read-only cache)."""
        try:
            path = build_helper(cache_dir, source=PAGECOPY_SOURCE)
        except (SetupError, OSError) as err:
            return cls(reason=f"numpy's take: the C page copier is unavailable ({err})")
        try:
            return cls(path)
        except OSError as err:
            return cls(reason=f"numpy's take: cannot load {path} ({err})")

    def _fast(self, a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> bool:
        return (
            self._gather is not None
            and a.flags.c_contiguous
            and b.flags.c_contiguous
            and idx.flags.c_contiguous
            and a.shape[1] == b.shape[1]
        )

    def gather(self, src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[i] = src[idx[i]]`` for every index; returns ``out[:len(idx)]``.

        Raises:
            ValueError: not uint8 page rows, rows of different widths, ``out`` too
                small, an index out of range.
        """
        _rows(src, "source pages")
        _rows(out, "destination pages")
        k = _indices(idx, src.shape[0])
        if out.shape[0] < k or out.shape[1] != src.shape[1]:
            raise ValueError(f"destination {out.shape} cannot hold {k} pages of {src.shape[1]}")
        view = out[:k]
        if k and self._fast(src, out, idx):
            assert self._gather is not None
            self._gather(out.ctypes.data, src.ctypes.data, idx.ctypes.data, k, src.shape[1])
        elif k:
            # mode="clip": the default buffers the whole result before copying it.
            np.take(src, idx, axis=0, out=view, mode="clip")
        return view

    def scatter(self, dst: np.ndarray, idx: np.ndarray, src: np.ndarray) -> None:
        """``dst[idx[i]] = src[i]`` for every index.

        Raises:
            ValueError: not uint8 page rows, rows of different widths, ``src`` shorter
                than ``idx``, an index out of range.
        """
        _rows(src, "source pages")
        _rows(dst, "destination pages")
        k = _indices(idx, dst.shape[0])
        if src.shape[0] < k or src.shape[1] != dst.shape[1]:
            raise ValueError(f"source {src.shape} holds fewer than {k} pages of {dst.shape[1]}")
        if k and self._fast(dst, src, idx):
            assert self._scatter is not None
            self._scatter(dst.ctypes.data, src.ctypes.data, idx.ctypes.data, k, dst.shape[1])
        elif k:
            dst[idx] = src[:k]


#: numpy's copy: the default of every tracker until the agent loads the C helper.
NUMPY_COPIER = PageCopier()

__all__ = ["NUMPY_COPIER", "PageCopier"]
