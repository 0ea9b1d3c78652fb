"""Dirty-page encoding: kinds, round trips, validation and fuzzing of the decoder."""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import codec
from kemari_suite.protocol.codec import (
    HEADER_SIZE,
    PAGE_SIZE,
    CompressionName,
    PageEncoder,
    PageKind,
    blob_info,
    decode_pages,
    encode_pages,
    parse_pages,
)

COMPRESSIONS: list[CompressionName] = ["zstd", "lz4", "none"]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N_TOTAL = 64  # pages in the test RAM images


def text_pages(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = np.frombuffer(b"kemari replicates the memory of a running guest. ", dtype=np.uint8)
    pages = np.resize(words, (k, PAGE_SIZE)).copy()
    pages[:, ::97] = rng.integers(0, 256, pages[:, ::97].shape, dtype=np.uint8)
    return pages


def mixed_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[PageKind]]:
    """Six pages, one of each interesting case, with the kind each must get."""
    rng = np.random.default_rng(7)
    old = text_pages(6)
    new = old.copy()
    new[0] = 0  # ZERO
    # page 1 unchanged: SAME
    new[2, 100:400] = rng.integers(0, 256, 300, dtype=np.uint8)  # XOR
    new[3] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)  # RAW
    old[4] = 0
    new[4, :8] = 1  # was zero, now almost zero: XOR (delta == new, not fewer) -> RAW
    old[5] = 0  # stays zero: ZERO wins over SAME
    new[5] = 0
    kinds = [PageKind.ZERO, PageKind.SAME, PageKind.XOR, PageKind.RAW, PageKind.RAW, PageKind.ZERO]
    return np.array([1, 5, 6, 20, 40, 63], dtype=np.uint64), new, old, kinds


def image_with(indices: np.ndarray, pages: np.ndarray, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (N_TOTAL, PAGE_SIZE), dtype=np.uint8)
    image[indices.astype(np.intp)] = pages
    return image


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_applies_every_kind(compression: CompressionName) -> None:
    indices, new, old, kinds = mixed_batch()
    blob = encode_pages(indices, new, old, compression=compression)
    info = blob_info(blob)
    assert (info.n_pages, info.n_zero, info.n_same, info.n_xor, info.n_raw) == (6, 2, 1, 1, 2)
    assert info.compression == compression
    assert info.payload_size == 3 * PAGE_SIZE
    assert info.blob_size == len(blob)

    target = image_with(indices, old)
    expected = target.copy()
    expected[indices.astype(np.intp)] = new
    batch = decode_pages(blob, target)
    assert list(batch.kinds) == [int(k) for k in kinds]
    np.testing.assert_array_equal(target, expected)


def test_without_old_pages_are_raw_or_zero() -> None:
    indices, new, _, _ = mixed_batch()
    blob = encode_pages(indices, new)
    batch = parse_pages(blob, N_TOTAL)
    assert set(batch.kinds.tolist()) <= {PageKind.RAW, PageKind.ZERO}
    target = np.zeros((N_TOTAL, PAGE_SIZE), np.uint8)
    batch.apply_to(target)
    np.testing.assert_array_equal(target[indices.astype(np.intp)], new)


def test_full_epoch_of_raw_pages_takes_the_fast_path() -> None:
    rng = np.random.default_rng(1)
    new = rng.integers(1, 256, (N_TOTAL, PAGE_SIZE), dtype=np.uint8)
    target = np.zeros_like(new)
    decode_pages(encode_pages(np.arange(N_TOTAL), new), target)
    np.testing.assert_array_equal(target, new)


def test_parse_does_not_touch_anything_and_materialize_gives_new_pages() -> None:
    indices, new, old, _ = mixed_batch()
    batch = parse_pages(encode_pages(indices, new, old), N_TOTAL)
    assert not batch.payload.flags.writeable
    assert not batch.indices.flags.writeable
    np.testing.assert_array_equal(batch.materialize(old), new)
    with pytest.raises(ValueError, match="base"):
        batch.materialize(None)


def test_pages_staged_over_two_batches_apply_in_order() -> None:
    """The secondary stages a pre-copy, then the final version XORed against it."""
    rng = np.random.default_rng(5)
    indices = np.array([3, 9], dtype=np.uint64)
    v0 = text_pages(2, seed=1)
    v1 = v0.copy()
    v1[:, 10:200] = rng.integers(0, 256, (2, 190), dtype=np.uint8)
    v2 = v1.copy()
    v2[:, 3000:3100] = 0
    pre = encode_pages(indices, v1, v0)
    final = encode_pages(indices, v2, v1)
    committed = image_with(indices, v0)
    staging = committed.copy()
    decode_pages(pre, staging)
    decode_pages(final, staging)
    np.testing.assert_array_equal(staging[[3, 9]], v2)
    np.testing.assert_array_equal(committed[[3, 9]], v0)


def test_compressible_delta_stays_under_1500_bytes_per_page() -> None:
    k = 1000
    rng = np.random.default_rng(11)
    old = text_pages(k)
    new = old.copy()
    starts = rng.integers(0, PAGE_SIZE - 300, k)
    for i, s in enumerate(starts):
        new[i, s : s + 300] = rng.integers(0, 256, 300, dtype=np.uint8)
    for compression in COMPRESSIONS[:2]:
        blob = encode_pages(np.arange(k), new, old, compression=compression)
        assert len(blob) / k <= 1500, (compression, len(blob) / k)
        assert blob_info(blob).n_xor == k


def test_empty_batch() -> None:
    empty = np.empty((0, PAGE_SIZE), np.uint8)
    for compression in COMPRESSIONS:
        blob = encode_pages(np.empty(0, np.uint64), empty, empty, compression=compression)
        target = np.zeros((4, PAGE_SIZE), np.uint8)
        batch = decode_pages(blob, target)
        assert batch.info.n_pages == 0 and not target.any()


def test_zstd_threads_and_negative_levels_decode_the_same() -> None:
    indices, new, old, _ = mixed_batch()
    for encoder in (PageEncoder("zstd", threads=2), PageEncoder("zstd", level=-5)):
        target = image_with(indices, old)
        decode_pages(encoder.encode(indices, new, old), target)
        np.testing.assert_array_equal(target[indices.astype(np.intp)], new)


def test_encoder_rejects_bad_input() -> None:
    new = np.zeros((2, PAGE_SIZE), np.uint8)
    with pytest.raises(ValueError, match="increasing"):
        encode_pages(np.array([5, 5]), new)
    with pytest.raises(ValueError, match="increasing"):
        encode_pages(np.array([6, 5]), new)
    with pytest.raises(ValueError, match="negative"):
        encode_pages(np.array([-1, 5]), new)
    with pytest.raises(ValueError, match="1-D"):
        encode_pages(np.array([1, 2, 3]), new)
    with pytest.raises(ValueError, match="shape"):
        encode_pages(np.array([1]), np.zeros((1, 100), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_pages(np.array([1]), np.zeros((1, PAGE_SIZE), np.int16))
    with pytest.raises(ValueError, match="old has 1 pages"):
        encode_pages(np.array([1, 2]), new, np.zeros((1, PAGE_SIZE), np.uint8))
    with pytest.raises(ValueError, match="compression"):
        PageEncoder("gzip")  # type: ignore[arg-type]


def test_decoder_rejects_bad_targets() -> None:
    blob = encode_pages(np.array([1]), np.ones((1, PAGE_SIZE), np.uint8))
    with pytest.raises(ValueError):
        decode_pages(blob, np.zeros((4, PAGE_SIZE), np.uint16))
    read_only = np.zeros((4, PAGE_SIZE), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        decode_pages(blob, read_only)
    with pytest.raises(ValueError, match="C-contiguous"):
        decode_pages(blob, np.zeros((4, 2 * PAGE_SIZE), np.uint8)[:, :PAGE_SIZE])


# --- validation of hostile blobs ------------------------------------------------------------


def header(
    k: int,
    raw: int,
    comp: int,
    *,
    code: int = 1,
    magic: bytes = b"KMPG",
    version: int = 1,
    page_size: int = PAGE_SIZE,
    reserved: int = 0,
) -> bytes:
    return struct.pack("<4sBBHIIQQ", magic, version, code, reserved, page_size, k, raw, comp)


def forge(indices: list[int], kinds: list[int], payload: bytes, *, code: int = 1) -> bytes:
    k = len(indices)
    n_data = sum(1 for x in kinds if x in (PageKind.RAW, PageKind.XOR))
    pad = bytes(((k + 7) & ~7) - k)
    return (
        header(k, n_data * PAGE_SIZE, len(payload), code=code)
        + np.array(indices, "<u8").tobytes()
        + bytes(kinds)
        + pad
        + payload
    )


def test_page_beyond_the_target_is_rejected_and_target_untouched() -> None:
    blob = encode_pages(np.array([3, N_TOTAL]), np.ones((2, PAGE_SIZE), np.uint8))
    target = np.zeros((N_TOTAL, PAGE_SIZE), np.uint8)
    with pytest.raises(ProtocolError, match="beyond"):
        decode_pages(blob, target)
    assert not target.any()
    with pytest.raises(ProtocolError, match="beyond"):
        parse_pages(blob, N_TOTAL).apply_to(target)


def test_more_pages_than_the_image_is_rejected() -> None:
    blob = encode_pages(np.arange(5), np.zeros((5, PAGE_SIZE), np.uint8))
    with pytest.raises(ProtocolError, match="5 pages for a RAM image of 4"):
        parse_pages(blob, 4)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "truncated"),
        (b"KMPG" + bytes(10), "truncated"),
        (header(0, 0, 0, magic=b"XXXX"), "magic"),
        (header(0, 0, 0, version=2), "version 2"),
        (header(0, 0, 0, code=9), "compression code 9"),
        (header(0, 0, 0, reserved=1), "reserved"),
        (header(0, 0, 0, page_size=8192), "page size 8192"),
        (header(0, 0, 5), "declares"),
        (header(0, 0, 0) + b"x", "declares"),
        (header(2, 0, 0) + bytes(16) + bytes(8), "strictly increasing"),
        (forge([1, 2], [0, 9], b""), "unknown page kind 9"),
        (forge([1, 2], [0, 0], b"")[:-1] + b"\x01", "padding"),
        (header(1, PAGE_SIZE, 0) + bytes(8) + bytes(8), "payload size"),
        (forge([1], [PageKind.ZERO], b"junk"), "payload present"),
        (forge([1], [PageKind.RAW], bytes(100), code=0), "100 payload bytes"),
        (forge([1], [PageKind.RAW], b"\x28\xb5\x2f\xfd garbage"), "zstd"),
        (forge([1], [PageKind.RAW], b"\xff" * 20, code=2), "lz4"),
    ],
)
def test_malformed_blobs_are_protocol_errors(blob: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_pages(blob, N_TOTAL)


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    # One declared RAW page, but the frame says it inflates to 1 GiB.
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))
    assert len(bomb) < 100_000
    with pytest.raises(ProtocolError, match="declares 1073741824"):
        parse_pages(forge([1], [PageKind.RAW], bomb), N_TOTAL)
    # A frame without a content size is refused too.
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE_SIZE))
    with pytest.raises(ProtocolError, match="zstd"):
        parse_pages(forge([1], [PageKind.RAW], unsized), N_TOTAL)
    # Extra frames after the first are refused.
    one = zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE))
    with pytest.raises(ProtocolError, match="corrupt"):
        parse_pages(forge([1], [PageKind.RAW], one + one), N_TOTAL)


def test_lz4_that_inflates_beyond_the_declared_size_is_refused() -> None:
    big = lz4.block.compress(bytes(2 * PAGE_SIZE), store_size=False)
    with pytest.raises(ProtocolError, match="lz4"):
        parse_pages(forge([1], [PageKind.RAW], big, code=2), N_TOTAL)
    small = lz4.block.compress(bytes(PAGE_SIZE // 2), store_size=False)
    with pytest.raises(ProtocolError):
        parse_pages(forge([1], [PageKind.RAW], small, code=2), N_TOTAL)


# --- property tests and fuzzing -------------------------------------------------------------

PAGES = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(0, 6), st.just(PAGE_SIZE)),
    elements=st.sampled_from([0, 0, 0, 1, 7, 255]),
)


@given(st.data(), st.sampled_from(COMPRESSIONS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_batches_round_trip(data: st.DataObject, compression: CompressionName) -> None:
    new = data.draw(PAGES, label="new")
    k = new.shape[0]
    indices = np.array(
        sorted(data.draw(st.sets(st.integers(0, N_TOTAL - 1), min_size=k, max_size=k))),
        dtype=np.int64,
    )
    use_old = data.draw(st.booleans(), label="use_old")
    old = None
    if use_old:
        old = new.copy()
        flips = data.draw(
            hnp.arrays(np.uint8, new.shape, elements=st.sampled_from([0, 0, 0, 0, 1, 128])),
            label="flips",
        )
        old ^= flips
    blob = encode_pages(indices, new, old, compression=compression)
    target = image_with(indices, old if old is not None else np.zeros_like(new))
    expected = target.copy()
    expected[indices] = new
    decode_pages(blob, target)
    np.testing.assert_array_equal(target, expected)


def only_protocol_errors(blob: bytes) -> None:
    target = np.zeros((N_TOTAL, PAGE_SIZE), np.uint8)
    try:
        decode_pages(blob, target)
    except ProtocolError:
        assert not target.any()


@given(st.binary(max_size=600))
@FUZZ
def test_fuzz_random_blobs(blob: bytes) -> None:
    only_protocol_errors(blob)


@given(st.binary(max_size=600))
@FUZZ
def test_fuzz_random_bodies_behind_a_plausible_header(body: bytes) -> None:
    k = min(len(body) // 9, 40)
    for code in (0, 1, 2):
        comp = len(body) - 8 * k - ((k + 7) & ~7)
        if comp < 0:
            continue
        for raw in (0, PAGE_SIZE, comp):
            only_protocol_errors(header(k, raw, comp, code=code) + body)


@given(st.data())
@FUZZ
def test_fuzz_mutations_of_valid_blobs(data: st.DataObject) -> None:
    indices, new, old, _ = mixed_batch()
    compression = data.draw(st.sampled_from(COMPRESSIONS))
    blob = bytearray(encode_pages(indices, new, old, compression=compression))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    only_protocol_errors(bytes(blob[:cut]))
    only_protocol_errors(bytes(blob))


def test_header_layout_constant() -> None:
    assert HEADER_SIZE == 32


@given(
    hnp.arrays(
        np.uint64,
        st.tuples(st.integers(0, 5), st.just(PAGE_SIZE // 8)),
        elements=st.sampled_from([0, 0, 1, 2**63, 2**64 - 1]),
    )
)
@settings(max_examples=100, deadline=None)
def test_nonzero_word_count_matches_numpy(words: np.ndarray) -> None:
    np.testing.assert_array_equal(codec._nonzero_words(words), np.count_nonzero(words, axis=1))
    full = np.ones((2, PAGE_SIZE // 8), np.uint64)
    assert codec._nonzero_words(full).tolist() == [512, 512]
