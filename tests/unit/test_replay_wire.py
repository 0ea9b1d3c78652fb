"""GuestFrames on the replication link: round trip, golden bytes, malformed payloads under
a valid MAC (a clear ProtocolError, the session failed, nothing delivered), and the
primary's forwarder cutting batches to the payload limit."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kemari_suite.checkpoint.forward import FrameForwarder, batches
from kemari_suite.errors import ProtocolError
from kemari_suite.protocol.messages import MAX_GUEST_FRAME
from kemari_suite.protocol.wire import (
    MAX_SMALL_PAYLOAD,
    Ack,
    GuestFrames,
    Message,
    SessionState,
)
from tests.unit.test_wire import established_pair, raw_frame


def payload(epoch: int, *frames: bytes) -> bytes:
    return struct.pack("!QI", epoch, len(frames)) + b"".join(
        struct.pack("!I", len(f)) + f for f in frames
    )


def test_round_trip_both_ways_keeps_order_and_bytes() -> None:
    primary, secondary = established_pair()
    frames = (b"\x01" * 60, bytes(range(256)) * 6, b"\x02" * 1514)
    msg = GuestFrames(epoch=41, frames=frames)
    [got] = secondary.feed(primary.encode(msg))
    assert got == msg
    assert isinstance(got, GuestFrames) and got.frames == frames
    assert all(isinstance(f, bytes) for f in got.frames)
    assert primary.feed(secondary.encode(msg)) == [msg]


def test_golden_bytes() -> None:
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    raw = payload(9, b"ab", b"c")
    # epoch, count, then each frame as length and bytes
    assert raw.hex() == "0000000000000009" + "00000002" + "000000026162" + "0000000163"
    assert secondary.feed(raw_frame(GuestFrames.TYPE, raw, 2, key)) == [
        GuestFrames(epoch=9, frames=(b"ab", b"c"))
    ]


def test_a_list_is_kept_as_a_tuple() -> None:
    assert GuestFrames(epoch=1, frames=[b"x"]) == GuestFrames(epoch=1, frames=(b"x",))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        # The second frame is shorter than its length says.
        (struct.pack("!QIIsI", 1, 2, 1, b"a", 5) + b"ab", r"frames\[1\] needs"),
        # A frame length beyond the payload.
        (struct.pack("!QII", 1, 1, 100) + b"short", r"frames\[0\] needs"),
        # A count no payload of this size can hold.
        (struct.pack("!QI", 1, 2**32 - 1), "says 4294967295 frames"),
        # An empty frame.
        (payload(1, b""), "frame 0 is 0 bytes"),
        # Bytes after the last frame.
        (payload(1, b"abc") + b"zz", "2 trailing bytes"),
        # No count at all.
        (struct.pack("!Q", 1), "frames needs"),
    ],
)
def test_malformed_payload_is_a_clear_protocol_error(raw: bytes, match: str) -> None:
    primary, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    with pytest.raises(ProtocolError, match=match) as info:
        secondary.feed(raw_frame(GuestFrames.TYPE, raw, 2, key))
    assert "malformed GuestFrames payload" in str(info.value)
    assert info.value.frame_type == GuestFrames.TYPE
    # Sticky: the link is dropped (the standby keeps its committed checkpoint, the
    # primary reconnects), never a message half-read.
    assert secondary.state is SessionState.FAILED
    with pytest.raises(ProtocolError, match="failed earlier"):
        secondary.feed(primary.encode(Ack(epoch=1)))


def test_a_frame_longer_than_qemu_passes_is_refused_both_ways() -> None:
    big = b"x" * (MAX_GUEST_FRAME + 1)
    with pytest.raises(ValueError, match="not 1 to"):
        GuestFrames(epoch=1, frames=(big,))
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    with pytest.raises(ProtocolError, match="frame 0 is"):
        secondary.feed(raw_frame(GuestFrames.TYPE, payload(1, big), 2, key))


@given(st.lists(st.lists(st.binary(min_size=1, max_size=300), max_size=6), max_size=5))
@settings(max_examples=100, deadline=None)
def test_random_batches_round_trip_in_order(runs: list[list[bytes]]) -> None:
    primary, secondary = established_pair()
    msgs: list[Message] = [GuestFrames(epoch=i, frames=tuple(r)) for i, r in enumerate(runs)]
    assert secondary.feed(b"".join(primary.encode(m) for m in msgs)) == msgs


@given(st.lists(st.integers(1, 5000), max_size=40), st.integers(5004, 20000))
@settings(max_examples=100, deadline=None)
def test_batches_keep_order_and_fit_the_limit(sizes: list[int], limit: int) -> None:
    frames = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    runs = batches(frames, limit)
    assert [f for run in runs for f in run] == frames
    assert all(run and sum(4 + len(f) for f in run) <= limit for run in runs)


class FakeLink:
    """What the forwarder uses of a Link: it records what it was given."""

    def __init__(self, backlog: int = 0) -> None:
        self.sent: list[GuestFrames] = []
        self.closed = False
        self.backlog = backlog

    def send_nowait(self, msg: GuestFrames) -> int:
        primary, _ = established_pair()
        self.sent.append(msg)
        return len(primary.encode(msg))  # it must encode within the limit


def test_the_forwarder_splits_a_burst_into_messages_that_fit() -> None:
    link = FakeLink()
    fwd = FrameForwarder(link)  # type: ignore[arg-type]
    frames = [bytes([i]) * 60000 for i in range(40)]  # 2.4 MB in one wakeup
    fwd(12, frames)
    assert len(link.sent) > 1
    assert all(m.epoch == 12 for m in link.sent)
    assert [f for m in link.sent for f in m.frames] == frames
    assert fwd.status() == {
        "sent_frames": 40,
        "sent_bytes": 40 * 60000,
        "messages": len(link.sent),
        "skipped_frames": 0,
    }
    assert MAX_SMALL_PAYLOAD == GuestFrames.MAX


def test_the_forwarder_skips_and_counts_when_the_link_is_gone_or_far_behind() -> None:
    link = FakeLink(backlog=10)
    fwd = FrameForwarder(link, backlog_limit=5)  # type: ignore[arg-type]
    fwd(1, [b"a", b"b"])
    link.backlog, link.closed = 0, True
    fwd(1, [b"c"])
    assert link.sent == []
    assert fwd.skipped_frames == 3
