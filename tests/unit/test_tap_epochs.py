"""The epoch log: overlay reads against a reference bytearray, the I/O log wire format,
and the life of an epoch (pending, shipped, committed, applied)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_suite.errors import ProtocolError, TapError
from kemari_suite.tap.epochs import (
    HEADER,
    MAGIC,
    OP,
    VERSION,
    ZERO_CHUNK,
    EpochLog,
    EpochState,
    IOOp,
    OpKind,
    encode,
    ops_to_writes,
    parse,
    replay,
)
from kemari_suite.tap.overlay import Overlay, assemble

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DISK = 8192


class MemBackend:
    """A BlockBackend in a bytearray that records what it was asked to do."""

    def __init__(self, size: int = DISK, fill: int = 0) -> None:
        self.size = size
        self.data = bytearray([fill]) * size
        self.applied: list[tuple[int, int]] = []
        self.flushes = 0

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.size
        return bytes(self.data[offset : offset + length])

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        for off, buf in writes:
            assert off + len(buf) <= self.size
            self.data[off : off + len(buf)] = buf
            self.applied.append((off, len(buf)))

    def flush(self) -> None:
        self.flushes += 1


def pattern(seed: int, n: int) -> bytes:
    """Distinct bytes per position, so that a slice taken at the wrong place shows."""
    return bytes((seed + 31 * i) % 256 for i in range(n))


def read_through(log: EpochLog, backend: MemBackend, offset: int, length: int) -> bytes:
    pieces = log.read_pieces(offset, length)
    got = {p.offset: backend.read(p.offset, p.length) for p in pieces if p.source == "backend"}
    return assemble(pieces, got)


# ---- overlay --------------------------------------------------------------------------

extent = st.tuples(st.integers(0, 600), st.integers(0, 200))


@FUZZ
@given(st.lists(st.tuples(extent, st.booleans(), st.integers(0, 255)), max_size=40), extent)
def test_overlay_matches_reference(
    writes: list[tuple[tuple[int, int], bool, int]], probe: tuple[int, int]
) -> None:
    base = bytes((i * 7) % 251 for i in range(1000))
    ref = bytearray(base)
    ov = Overlay()
    for (off, n), zero, fill in writes:
        data = None if zero else pattern(fill, n)
        ov.put(off, n, data, 0)
        ref[off : off + n] = bytes(n) if zero else pattern(fill, n)
        ov.check()
    off, n = probe
    pieces = ov.pieces(off, n)
    assert sum(p.length for p in pieces) == n
    got = {p.offset: base[p.offset : p.offset + p.length] for p in pieces if p.source == "backend"}
    assert assemble(pieces, got) == bytes(ref[off : off + n])


def test_overlay_splits_and_merges_by_position() -> None:
    ov = Overlay()
    ov.put(0, 10, b"a" * 10, 1)
    ov.put(3, 4, b"bbbb", 2)
    ov.check()
    assert [(x.start, x.end, x.epoch) for x in ov] == [(0, 3, 1), (3, 7, 2), (7, 10, 1)]
    ov.put(0, 10, None, 3)
    assert [(x.start, x.end, x.data) for x in ov] == [(0, 10, None)]
    with pytest.raises(ValueError):
        ov.put(0, 3, b"ab", 1)
    with pytest.raises(ValueError):
        ov.put(-1, 3, None, 1)


# ---- the log against a reference -------------------------------------------------------

op_strategy = st.one_of(
    st.tuples(
        st.just("write"),
        st.integers(0, DISK - 1),
        st.integers(1, 1500),
        st.integers(0, 255),
        st.booleans(),
    ),
    st.tuples(
        st.sampled_from(["trim", "zero"]),
        st.integers(0, DISK - 1),
        st.integers(1, 3000),
        st.just(0),
        st.booleans(),
    ),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0), st.just(False)),
    st.tuples(st.just("next-epoch"), st.just(0), st.just(0), st.just(0), st.just(False)),
    st.tuples(st.just("commit-apply"), st.just(0), st.just(0), st.just(0), st.just(False)),
)


@FUZZ
@given(st.lists(op_strategy, max_size=60), st.lists(st.tuples(extent, extent), max_size=5))
def test_reads_see_pending_writes_and_apply_reaches_the_backend(
    script: list[tuple[str, int, int, int, bool]], probes: list[tuple[tuple[int, int], object]]
) -> None:
    backend = MemBackend(fill=0x5A)
    guest = bytearray(backend.data)  # what the guest must read back
    log = EpochLog()
    epoch = 1
    for kind, off, n, fill, fua in script:
        n = min(n, DISK - off)
        if kind == "write":
            data = pattern(fill, n)
            log.record_write(epoch, off, data, fua=fua)
            guest[off : off + n] = data
        elif kind in ("trim", "zero"):
            rec = log.record_trim if kind == "trim" else log.record_write_zeroes
            rec(epoch, off, n, fua=fua)
            guest[off : off + n] = bytes(n)
        elif kind == "flush":
            log.record_flush(epoch)
        elif kind == "next-epoch":
            epoch += 1
        else:
            # The sync point closes the open epoch, the secondary acknowledges it, the
            # applier writes it; then a new epoch is open.
            payload = log.serialize(epoch)
            shipped = parse(payload)
            log.committed(epoch)
            for rec_ in log.pending_through(epoch):
                backend.apply(ops_to_writes(rec_.ops))
            # The secondary's replay of the same log gives the same bytes.
            assert ops_to_writes(shipped.ops) == ops_to_writes(
                [op for r in log.pending_through(epoch) for op in r.ops]
            )
            log.applied(epoch)
            epoch += 1
        log.overlay.check()
        assert read_through(log, backend, 0, DISK) == bytes(guest)
    for (off, n), _ in probes:
        n = min(n, DISK - off)
        assert read_through(log, backend, off, n) == bytes(guest[off : off + n])
    # Everything committed and applied: the backend alone holds the guest's view.
    log.committed(epoch)
    for rec_ in log.pending_through(epoch):
        backend.apply(ops_to_writes(rec_.ops))
    log.applied(epoch)
    assert len(log.overlay) == 0
    assert bytes(backend.data) == bytes(guest)


# ---- wire format ----------------------------------------------------------------------

ops_st = st.lists(
    st.one_of(
        st.builds(
            lambda off, data, fua: IOOp(OpKind.WRITE, off, len(data), data, fua),
            st.integers(0, 1 << 40),
            st.binary(min_size=1, max_size=64),
            st.booleans(),
        ),
        st.builds(
            lambda k, off, n, fua: IOOp(k, off, n, None, fua),
            st.sampled_from([OpKind.TRIM, OpKind.WRITE_ZEROES]),
            st.integers(0, 1 << 40),
            st.integers(1, (1 << 32) - 1),
            st.booleans(),
        ),
        st.just(IOOp(OpKind.FLUSH)),
    ),
    max_size=20,
)


@FUZZ
@given(st.integers(0, (1 << 64) - 1), ops_st)
def test_serialize_parse_roundtrip(epoch: int, ops: list[IOOp]) -> None:
    payload = encode(epoch, ops)
    rec = parse(payload)
    assert rec.epoch == epoch
    assert list(rec.ops) == ops
    assert rec.needs_flush == any(op.kind is OpKind.FLUSH or op.fua for op in ops)
    assert payload[:4] == MAGIC and payload[4] == VERSION


@FUZZ
@given(ops_st.filter(bool), st.data())
def test_every_truncation_is_refused(ops: list[IOOp], data: st.DataObject) -> None:
    payload = encode(7, ops)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(ProtocolError):
        parse(payload[:cut])


@FUZZ
@given(st.binary(max_size=200))
def test_garbage_never_crashes(blob: bytes) -> None:
    try:
        parse(blob)
    except ProtocolError:
        pass
    try:
        parse(MAGIC + bytes([VERSION]) + blob)
    except ProtocolError:
        pass


def _op(kind: int, flags: int, off: int, n: int) -> bytes:
    return OP.pack(kind, flags, off, n)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "shorter than its header"),
        (HEADER.pack(b"XIOL", VERSION, 0, 0, 1, 0), "bad magic"),
        (HEADER.pack(MAGIC, 2, 0, 0, 1, 0), "version 2"),
        (HEADER.pack(MAGIC, VERSION, 1, 0, 1, 0), "header flags"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1), "truncated"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(9, 0, 0, 1), "unknown kind"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(2, 2, 0, 1), "unknown flags"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(4, 0, 0, 512), "flush op"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(4, 1, 0, 0), "flush op"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(2, 0, 0, 0), "bad extent"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(3, 0, (1 << 64) - 1, 1), "bad extent"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(1, 0, 0, 4) + b"ab", "data truncated"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 0) + b"x", "trailing"),
        (HEADER.pack(MAGIC, VERSION, 0, 0, 1, 1) + _op(1, 0, 0, 1) + b"ab", "trailing"),
    ],
)
def test_malformed_logs_are_refused(payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse(payload)


def test_layout_is_as_documented() -> None:
    payload = encode(5, [IOOp(OpKind.WRITE, 512, 3, b"abc", True), IOOp(OpKind.FLUSH)])
    assert payload == (
        b"KIOL\x01\x00\x00\x00"
        + struct.pack("!QI", 5, 2)
        + struct.pack("!BBQI", 1, 1, 512, 3)
        + b"abc"
        + struct.pack("!BBQI", 4, 0, 0, 0)
    )
    assert encode(9, []) == b"KIOL\x01\x00\x00\x00" + struct.pack("!QI", 9, 0)


# ---- transitions ----------------------------------------------------------------------


def test_epoch_life_and_misuse() -> None:
    log = EpochLog()
    log.record_write(3, 0, b"x" * 10)
    log.record_flush(3)
    log.record_trim(4, 100, 50, fua=True)
    assert log.pending_epochs() == [3, 4]
    assert log.needs_flush(3) and log.needs_flush(4)
    with pytest.raises(TapError, match="never go back"):
        log.record_write(2, 0, b"y")
    with pytest.raises(TapError, match="applied before it committed"):
        log.applied(3)
    assert log.committed(3) == [3]
    rec3 = log.record(3)
    assert rec3 is not None and rec3.state is EpochState.COMMITTED
    assert log.next_to_apply() is log.record(3)
    log.applied(3)
    assert log.pending_epochs() == [4]
    assert log.next_to_apply() is None
    assert log.next_to_apply(include_uncommitted=True) is log.record(4)
    log.applied(4, force=True)
    assert log.pending_epochs() == [] and len(log.overlay) == 0
    assert log.applied_through == 4 and log.committed_through == 3
    log.record_write(5, 0, b"z")
    log.committed(5)
    with pytest.raises(TapError, match="committed already"):
        log.record_write(5, 0, b"late")
    with pytest.raises(TapError, match="bad extent"):
        log.record_write_zeroes(6, -1, 4)
    with pytest.raises(TapError, match="bad extent"):
        log.record_trim(6, 0, 0)


def test_serialize_ships_earlier_unshipped_epochs_once() -> None:
    log = EpochLog()
    # Logged while protection restarts (the open epoch is still 10) ...
    log.record_write(10, 0, b"a")
    log.record_write(11, 1, b"b")
    # ... the first sync point closes 11 and carries both; again for 11: same bytes.
    first = log.serialize(11)
    assert [op.data for op in parse(first).ops] == [b"a", b"b"]
    assert parse(first).epoch == 11
    assert log.serialize(11) == first
    log.record_write(12, 2, b"c")
    # With pipelined sync points (12 sent before 11 is acknowledged), 12 carries only 12.
    assert [op.data for op in parse(log.serialize(12)).ops] == [b"c"]
    log.committed(11)
    assert log.pending_epochs() == [10, 11, 12]
    assert [r.epoch for r in log.pending_through(11)] == [10, 11]
    assert log.pending_bytes() == 3
    assert parse(log.serialize(13)).ops == ()


def test_zero_ranges_become_chunked_zero_writes() -> None:
    n = 2 * ZERO_CHUNK + 5
    writes = ops_to_writes([IOOp(OpKind.TRIM, 7, n), IOOp(OpKind.FLUSH)])
    assert [(off, len(b)) for off, b in writes] == [
        (7, ZERO_CHUNK),
        (7 + ZERO_CHUNK, ZERO_CHUNK),
        (7 + 2 * ZERO_CHUNK, 5),
    ]
    assert all(not any(b) for _, b in writes)


def test_replay_applies_logs_in_order_then_flushes() -> None:
    backend = MemBackend()
    logs = [
        encode(1, [IOOp(OpKind.WRITE, 0, 4, b"abcd")]),
        encode(2, [IOOp(OpKind.WRITE_ZEROES, 1, 2), IOOp(OpKind.FLUSH)]),
    ]
    assert replay(backend, logs) == 6
    assert bytes(backend.data[:4]) == b"a\0\0d"
    assert backend.flushes == 1
    with pytest.raises(ProtocolError):
        replay(backend, [b"junk"])
