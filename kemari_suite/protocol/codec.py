"""Dirty-page encoding: one blob per batch of pages, built with numpy, compressed once.

The primary stages the dirty pages of an epoch as a ``(k, 4096)`` uint8 array ``new``;
the compare tracker's shadow gives the previously sent version of each page, ``old``.
Each page becomes one of:

``ZERO``  all zeros; no payload.
``SAME``  identical to the previously sent version; no payload.
``XOR``   payload is ``new ^ old``, chosen when it has fewer nonzero 64-bit words than
          the page itself (the delta of a page with a few hundred changed bytes is
          mostly zeros and compresses to a few hundred bytes).
``RAW``   payload is the page.

The choice is vectorized (nonzero 64-bit words per page) and the payloads of
all pages are compressed in a single call: per-page compressor calls from Python cost
far more than the compression itself for thousands of pages.

Blob layout, little-endian (numpy's native order; the frame around it is big-endian)::

    offset  size  field
    0       4     magic b"KMPG"
    4       1     format version (1)
    5       1     compression: 0 none, 1 zstd, 2 lz4 (block, no stored size)
    6       2     reserved, 0
    8       4     page size (4096)
    12      4     k, number of pages
    16      8     payload size before compression (= pages with RAW or XOR * page size)
    24      8     compressed payload size
    32      8*k   page numbers, uint64, strictly increasing
    32+8k   k     page kinds, uint8 (PageKind), then zero bytes up to a multiple of 8
    32+8k+K ...   compressed payload: the RAW/XOR pages in index order (K = k rounded
                  up to a multiple of 8, so an uncompressed payload stays aligned)

``XOR`` and ``SAME`` are relative to the receiver's current copy of the page, which
must be the version the sender's ``old`` held (on the secondary: the last version it
received, committed or staged). After a resynchronisation the sender must send
without ``old`` (FULL epoch) until both sides agree again.

Decoding validates every field against the blob's length and the target's size, and
never decompresses more than the size the kinds imply, so a forged blob can neither
write outside the target nor make the receiver allocate more than the RAM it mirrors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, TypeAlias

import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard

from kemari_suite.errors import ProtocolError

PAGE_SIZE = 4096
_WORDS = PAGE_SIZE // 8

MAGIC = b"KMPG"
FORMAT_VERSION = 1

#: magic, version, compression, reserved, page size, k, raw size, compressed size
_HEADER = struct.Struct("<4sBBHIIQQ")
HEADER_SIZE = _HEADER.size  # 32: keeps the index array 8-byte aligned within the blob

CompressionName = Literal["zstd", "lz4", "none"]
_COMPRESSION_CODES: dict[str, int] = {"none": 0, "zstd": 1, "lz4": 2}
_COMPRESSION_NAMES: dict[int, CompressionName] = {0: "none", 1: "zstd", 2: "lz4"}

Blob: TypeAlias = bytes | bytearray | memoryview
U8Array: TypeAlias = npt.NDArray[np.uint8]
U64Array: TypeAlias = npt.NDArray[np.uint64]


class PageKind(IntEnum):
    """How one page is carried in a blob."""

    ZERO = 0
    RAW = 1
    XOR = 2
    SAME = 3


_N_KINDS = len(PageKind)


@dataclass(frozen=True)
class BlobInfo:
    """What a blob holds, read from its header and kind array (no decompression)."""

    n_pages: int
    n_zero: int
    n_raw: int
    n_xor: int
    n_same: int
    compression: CompressionName
    #: Payload bytes before compression (RAW and XOR pages times the page size).
    payload_size: int
    compressed_size: int
    blob_size: int


@dataclass(frozen=True, eq=False)
class PageBatch:
    """A decoded, validated blob that has not been applied anywhere yet.

    ``payload`` holds one row per RAW or XOR page, in index order. All arrays are
    read-only views; the batch can be kept (the secondary buffers pre-copied pages
    until the epoch commits) and applied later with :meth:`apply_to`.
    """

    indices: U64Array
    kinds: U8Array
    payload: U8Array
    info: BlobInfo

    def apply_to(self, target: U8Array) -> None:
        """Write the batch into ``target`` (``(n, 4096)`` uint8, C-contiguous, writable).

        XOR pages are applied against ``target``'s current content, SAME pages leave it.

        Raises:
            ProtocolError: a page number is beyond the target.
            ValueError: ``target`` has the wrong type, shape or layout.
        """
        t64 = _target_words(target)
        _check_range(self.indices, t64.shape[0])
        p64 = self.payload.view(np.uint64)
        kinds = self.kinds
        n_raw, n_xor = self.info.n_raw, self.info.n_xor
        zero = kinds == PageKind.ZERO
        if zero.any():
            t64[self.indices[zero]] = 0
        # Payload rows are the RAW and XOR pages in index order; when only one of the
        # two kinds is present the payload is used as is, without a gather.
        data_kinds = kinds[(kinds == PageKind.RAW) | (kinds == PageKind.XOR)]
        if n_raw:
            src = p64 if not n_xor else p64[data_kinds == PageKind.RAW]
            t64[self.indices[kinds == PageKind.RAW]] = src
        if n_xor:
            src = p64 if not n_raw else p64[data_kinds == PageKind.XOR]
            # Indices are strictly increasing, so the gather / xor / scatter has no
            # duplicate targets.
            idx = self.indices[kinds == PageKind.XOR]
            pages = t64[idx]
            np.bitwise_xor(pages, src, out=pages)
            t64[idx] = pages

    def materialize(self, base: U8Array | None) -> U8Array:
        """The full new content of every page in the batch, as a new ``(k, 4096)`` array.

        ``base`` holds the receiver's previous version of each page of the batch, in the
        same order (only its XOR and SAME rows are read); it may be None when the batch
        has no XOR or SAME page.

        Raises:
            ValueError: ``base`` is missing or has the wrong shape.
        """
        k = len(self.kinds)
        out = np.zeros((k, PAGE_SIZE), dtype=np.uint8)
        o64 = out.view(np.uint64)
        p64 = self.payload.view(np.uint64)
        kinds = self.kinds
        data = (kinds == PageKind.RAW) | (kinds == PageKind.XOR)
        rows = np.cumsum(data) - 1
        raw = kinds == PageKind.RAW
        o64[raw] = p64[rows[raw]]
        xor = kinds == PageKind.XOR
        same = kinds == PageKind.SAME
        if xor.any() or same.any():
            if base is None:
                raise ValueError("batch has XOR or SAME pages: base versions are needed")
            b64 = _page_words(base, "base", rows=k)
            o64[xor] = b64[xor] ^ p64[rows[xor]]
            o64[same] = b64[same]
        return out


class PageEncoder:
    """Encodes page batches; holds one compressor (use one encoder per thread).

    ``level`` is the zstd level (negative levels are faster); ``threads`` is zstd's
    worker count (0: compress in the calling thread, which measured as fast as two
    workers on a two-core host and leaves the other core to the VM).
    """

    def __init__(
        self, compression: CompressionName = "zstd", *, level: int = 1, threads: int = 0
    ) -> None:
        if compression not in _COMPRESSION_CODES:
            raise ValueError(f"unknown compression {compression!r}")
        self.compression: CompressionName = compression
        self._code = _COMPRESSION_CODES[compression]
        self._zstd = (
            zstandard.ZstdCompressor(level=level, threads=threads, write_content_size=True)
            if compression == "zstd"
            else None
        )

    def encode(
        self,
        indices: npt.NDArray[np.integer],
        new: U8Array,
        old: U8Array | None = None,
    ) -> bytes:
        """Encode pages ``indices`` with contents ``new`` (and previous versions ``old``).

        Raises:
            ValueError: indices not strictly increasing or negative, shapes disagree.
        """
        n64 = _page_words(new, "new")
        k = n64.shape[0]
        idx = _check_indices(indices, k)
        nz_new = _nonzero_words(n64)
        payload: U64Array
        if old is None:
            kinds = np.where(nz_new == 0, np.uint8(PageKind.ZERO), np.uint8(PageKind.RAW))
            kinds = kinds.astype(np.uint8, copy=False)
            data = nz_new != 0
            payload = n64 if bool(data.all()) else n64[data]
        else:
            o64 = _page_words(old, "old", rows=k)
            delta = np.bitwise_xor(n64, o64)
            nz_delta = _nonzero_words(delta)
            kinds = np.full(k, PageKind.RAW, dtype=np.uint8)
            kinds[nz_delta < nz_new] = PageKind.XOR
            kinds[nz_delta == 0] = PageKind.SAME
            # ZERO last: a zero page never depends on the receiver's copy.
            kinds[nz_new == 0] = PageKind.ZERO
            raw = kinds == PageKind.RAW
            xor = kinds == PageKind.XOR
            data = raw | xor
            if not xor.any():
                # No deltas (say, random content): the pages themselves, uncopied if all.
                payload = n64 if bool(data.all()) else n64[data]
            else:
                if raw.any():
                    delta[raw] = n64[raw]
                payload = delta if bool(data.all()) else delta[data]
        raw_size = payload.shape[0] * PAGE_SIZE
        compressed = self._compress(payload) if raw_size else b""
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, self._code, 0, PAGE_SIZE, k, raw_size, len(compressed)
        )
        pad = bytes(_kinds_area(k) - k)
        return b"".join((header, idx.tobytes(), kinds.tobytes(), pad, compressed))

    def _compress(self, payload: U64Array) -> Blob:
        raw = payload.data.cast("B")
        if self._zstd is not None:
            return self._zstd.compress(raw)
        if self.compression == "lz4":
            return lz4.block.compress(raw, mode="default", store_size=False)
        return raw


def encode_pages(
    indices: npt.NDArray[np.integer],
    new: U8Array,
    old: U8Array | None = None,
    *,
    compression: CompressionName = "zstd",
    level: int = 1,
) -> bytes:
    """Encode one batch of pages with a fresh :class:`PageEncoder` (see there).

    Raises:
        ValueError: indices not strictly increasing or negative, shapes disagree.
    """
    return PageEncoder(compression, level=level).encode(indices, new, old)


def blob_info(blob: Blob) -> BlobInfo:
    """Read a blob's header and kinds without decompressing.

    Raises:
        ProtocolError: the blob is malformed.
    """
    return _parse_structure(memoryview(blob).cast("B"), None)[0]


def parse_pages(blob: Blob, n_pages_total: int) -> PageBatch:
    """Validate and decompress a blob for a RAM image of ``n_pages_total`` pages.

    Nothing is applied; see :meth:`PageBatch.apply_to`.

    Raises:
        ProtocolError: any inconsistency: bad magic, version, compression or sizes,
            page numbers not strictly increasing or beyond ``n_pages_total``, unknown
            kinds, a payload that does not decompress to exactly the declared size.
    """
    view = memoryview(blob).cast("B")
    info, indices, kinds, compressed = _parse_structure(view, n_pages_total)
    payload = _decompress(info, compressed).reshape(-1, PAGE_SIZE)
    payload.flags.writeable = False
    return PageBatch(indices=indices, kinds=kinds, payload=payload, info=info)


def decode_pages(blob: Blob, target: U8Array) -> PageBatch:
    """Apply a blob to ``target`` (``(n, 4096)`` uint8, writable) in place.

    The blob is fully validated and decompressed before the first byte of ``target``
    changes, so a rejected blob leaves ``target`` untouched.

    Raises:
        ProtocolError: the blob is malformed or does not fit ``target``.
        ValueError: ``target`` has the wrong type, shape or layout.
    """
    t64 = _target_words(target)
    batch = parse_pages(blob, t64.shape[0])
    batch.apply_to(target)
    return batch


# --- internals ---------------------------------------------------------------------------


def _page_words(pages: U8Array, name: str, rows: int | None = None) -> U64Array:
    if not isinstance(pages, np.ndarray) or pages.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 numpy array")
    if pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise ValueError(f"{name} must have shape (k, {PAGE_SIZE}), not {pages.shape}")
    if rows is not None and pages.shape[0] != rows:
        raise ValueError(f"{name} has {pages.shape[0]} pages, expected {rows}")
    if not pages.flags.c_contiguous:
        pages = np.ascontiguousarray(pages)
    return pages.view(np.uint64)


def _target_words(target: U8Array) -> U64Array:
    t64 = _page_words(target, "target")
    if not target.flags.c_contiguous or not target.flags.writeable:
        raise ValueError("target must be C-contiguous and writable")
    return t64


def _check_indices(indices: npt.NDArray[np.integer], k: int) -> U64Array:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.shape[0] != k:
        raise ValueError(f"indices must be a 1-D array of {k} page numbers")
    if k >= 2**32:
        raise ValueError("too many pages for one blob")
    if k == 0:
        return np.empty(0, dtype="<u8")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("indices must be integers")
    if idx.dtype.kind == "i" and int(idx.min()) < 0:
        raise ValueError("negative page number")
    out = idx.astype("<u8", copy=False)
    if k > 1 and not bool((out[1:] > out[:-1]).all()):
        raise ValueError("page numbers must be strictly increasing")
    return out


def _nonzero_words(pages: U64Array) -> npt.NDArray[np.int64]:
    """Nonzero 64-bit words per page; ``count_nonzero(axis=1)`` in under half the time.

    The (k, 512) bool mask is read as (k, 64) uint64 words of eight 0/1 bytes; summing
    64 such words per page cannot carry between bytes (at most 64 per byte lane), and
    the eight lane sums are the count.
    """
    mask = np.not_equal(pages, 0).view(np.uint64)
    lanes = mask.sum(axis=1, dtype=np.uint64)
    return lanes.view(np.uint8).reshape(-1, 8).sum(axis=1, dtype=np.int64)


def _kinds_area(k: int) -> int:
    return (k + 7) & ~7


def _check_range(indices: U64Array, n_pages_total: int) -> None:
    if len(indices) and int(indices[-1]) >= n_pages_total:
        raise ProtocolError(
            f"page blob: page {int(indices[-1])} beyond a RAM image of {n_pages_total} pages"
        )


def _parse_structure(
    view: memoryview, n_pages_total: int | None
) -> tuple[BlobInfo, U64Array, U8Array, memoryview]:
    if len(view) < HEADER_SIZE:
        raise ProtocolError(f"page blob truncated: {len(view)} bytes, header is {HEADER_SIZE}")
    magic, version, code, reserved, page_size, k, raw_size, comp_size = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"page blob: bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise ProtocolError(
            f"page blob format version {version}, this node reads version {FORMAT_VERSION}"
        )
    if code not in _COMPRESSION_NAMES:
        raise ProtocolError(f"page blob: unknown compression code {code}")
    if reserved != 0:
        raise ProtocolError("page blob: reserved header field is not zero")
    if page_size != PAGE_SIZE:
        raise ProtocolError(f"page blob: page size {page_size}, expected {PAGE_SIZE}")
    if n_pages_total is not None and k > n_pages_total:
        raise ProtocolError(f"page blob: {k} pages for a RAM image of {n_pages_total} pages")
    kinds_area = _kinds_area(k)
    expected = HEADER_SIZE + 8 * k + kinds_area + comp_size
    if expected != len(view):
        raise ProtocolError(
            f"page blob: header declares {expected} bytes ({k} pages, {comp_size} compressed),"
            f" blob has {len(view)}"
        )
    idx_end = HEADER_SIZE + 8 * k
    indices = np.frombuffer(view, dtype="<u8", count=k, offset=HEADER_SIZE)
    kinds = np.frombuffer(view, dtype=np.uint8, count=k, offset=idx_end)
    if any(view[idx_end + k : idx_end + kinds_area]):
        raise ProtocolError("page blob: padding after the kinds is not zero")
    indices.flags.writeable = False
    kinds.flags.writeable = False
    if k > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ProtocolError("page blob: page numbers are not strictly increasing")
    if n_pages_total is not None:
        _check_range(indices, n_pages_total)
    counts = np.bincount(kinds, minlength=_N_KINDS)
    if len(counts) > _N_KINDS:
        bad = int(kinds.max())
        raise ProtocolError(f"page blob: unknown page kind {bad}")
    n_zero, n_raw, n_xor, n_same = (int(c) for c in counts)
    if raw_size != (n_raw + n_xor) * PAGE_SIZE:
        raise ProtocolError(
            f"page blob: payload size {raw_size} does not match {n_raw} RAW + {n_xor} XOR pages"
        )
    info = BlobInfo(
        n_pages=k,
        n_zero=n_zero,
        n_raw=n_raw,
        n_xor=n_xor,
        n_same=n_same,
        compression=_COMPRESSION_NAMES[code],
        payload_size=raw_size,
        compressed_size=comp_size,
        blob_size=len(view),
    )
    return info, indices, kinds, view[idx_end + kinds_area :]


def _decompress(info: BlobInfo, data: memoryview) -> U8Array:
    size = info.payload_size
    if size == 0:
        if len(data):
            raise ProtocolError("page blob: payload present but no page needs one")
        return np.empty(0, dtype=np.uint8)
    if info.compression == "none":
        if len(data) != size:
            raise ProtocolError(f"page blob: {len(data)} payload bytes, expected {size}")
        return np.frombuffer(data, dtype=np.uint8)
    out: bytes
    try:
        if info.compression == "zstd":
            # The frame's own content size decides the allocation inside zstandard,
            # so check it before decompressing: no decompression bombs.
            declared = zstandard.frame_content_size(data)
            if declared != size:
                raise ProtocolError(
                    f"page blob: zstd frame declares {declared} bytes, expected {size}"
                )
            out = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=size, allow_extra_data=False
            )
        else:
            out = lz4.block.decompress(data, uncompressed_size=size)
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as err:
        raise ProtocolError(f"page blob: {info.compression} payload is corrupt: {err}") from err
    if len(out) != size:
        raise ProtocolError(f"page blob: payload decompressed to {len(out)} bytes, expected {size}")
    return np.frombuffer(out, dtype=np.uint8)
