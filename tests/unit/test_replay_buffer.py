"""The standby's replay buffer: order, what a commit discards, the bound, the sink."""

from __future__ import annotations

import asyncio

import pytest

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.replica.replay import ReplayBuffer


def f(tag: int, size: int = 60) -> bytes:
    """A frame that says which one it is."""
    return tag.to_bytes(4, "big") + bytes(size - 4)


def test_frames_come_back_in_arrival_order_across_epochs() -> None:
    buf = ReplayBuffer()
    buf.add(5, [f(1), f(2)])
    buf.add(5, [f(3)])
    buf.add(6, [f(4)])
    buf.add(8, [f(5), f(6)])
    assert buf.epochs() == [5, 6, 8]
    assert buf.take(5) == [f(1), f(2), f(3), f(4), f(5), f(6)]
    assert buf.take(5) == []
    assert buf.stats.kept_frames == buf.stats.kept_bytes == 0
    assert buf.stats.taken_frames == 6


def test_a_commit_discards_what_its_checkpoint_contains_and_keeps_its_own_epoch() -> None:
    # A frame tagged e reached QEMU while e was open: checkpoint e may lack it (it came
    # during the stopped window), checkpoint e + 1 has it.
    buf = ReplayBuffer()
    buf.add(4, [f(1)])
    buf.add(5, [f(2), f(3)])
    buf.add(6, [f(4)])
    assert buf.committed(5) == 1
    assert buf.epochs() == [5, 6]
    assert buf.committed(6) == 2
    assert buf.take(6) == [f(4)]
    assert buf.stats.committed_frames == 3


def test_take_at_the_resumed_checkpoint_replays_it_and_everything_after() -> None:
    buf = ReplayBuffer()
    for epoch in range(3, 9):
        buf.add(epoch, [f(epoch)])
    buf.committed(5)
    # Failover to checkpoint 6 (committed after the last add): 6, 7, 8 replayed.
    assert buf.take(6) == [f(6), f(7), f(8)]


def test_a_copy_older_than_the_committed_checkpoint_is_not_kept() -> None:
    buf = ReplayBuffer()
    buf.committed(7)
    buf.add(6, [f(1)])
    assert buf.take(7) == []
    assert buf.stats.stale_frames == 1


def test_tags_never_go_back_on_one_link() -> None:
    buf = ReplayBuffer()
    buf.add(9, [f(1)])
    with pytest.raises(ProtocolError, match="epoch 8 after epoch 9"):
        buf.add(8, [f(2)])
    # A new link starts again (its first checkpoint contains the old link's frames).
    assert buf.clear() == 1
    buf.add(2, [f(3)])
    assert buf.take(2) == [f(3)]
    assert buf.stats.cleared_frames == 1


def test_the_frame_bound_drops_the_oldest_and_counts() -> None:
    buf = ReplayBuffer(limit_frames=3)
    buf.add(1, [f(i) for i in range(5)])
    assert buf.stats.overflow_frames == 2
    assert buf.stats.overflow_bytes == 120
    assert buf.take(1) == [f(2), f(3), f(4)]


def test_the_byte_bound_drops_the_oldest_and_counts() -> None:
    buf = ReplayBuffer(limit_bytes=250)
    buf.add(1, [f(1, 100), f(2, 100)])
    buf.add(2, [f(3, 100)])
    assert buf.stats.kept_bytes == 200
    assert buf.stats.overflow_frames == 1
    assert buf.take(1) == [f(2, 100), f(3, 100)]


def test_a_bound_below_one_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplayBuffer(limit_frames=0)


def test_after_take_frames_still_arriving_go_straight_to_the_sink() -> None:
    buf = ReplayBuffer()
    buf.add(3, [f(1)])
    assert buf.take(3) == [f(1)]
    got: list[bytes] = []
    buf.sink = lambda frames: got.extend(frames) or len(frames)
    buf.add(4, [f(2), f(3)])
    assert got == [f(2), f(3)]
    assert buf.take(4) == []
    assert buf.stats.taken_frames == 3


def test_the_dispatch_entry_keeps_the_message_frames() -> None:
    buf = ReplayBuffer()
    asyncio.run(buf.on_message(None, wire.GuestFrames(epoch=2, frames=(f(1), f(2)))))
    assert buf.take(2) == [f(1), f(2)]
    status = buf.status()
    assert status["received_frames"] == 2 and status["epochs"] == []


class FakeIO:
    """A GuestIO whose guest takes ``room`` frames, then none."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got: list[bytes] = []

    def inject(self, frames: list[bytes]) -> int:
        took = frames[: max(0, self.room - len(self.got))]
        self.got += took
        return len(took)


def test_the_failover_replays_after_cont_and_reports_it() -> None:
    from kemari_suite.replica.failover import Failover, FailoverReport

    buf = ReplayBuffer(limit_frames=3)
    buf.add(6, [f(1)])
    buf.add(7, [f(2), f(3), f(4)])  # f(1) overflows
    buf.committed(7)
    fo = Failover(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        life=None,  # type: ignore[arg-type]
        artifacts=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        witness=None,
        probe=None,
        replay=buf,
    )
    report = FailoverReport(reason="test", epoch=7, detected_at=0.0)
    io = FakeIO(room=4)
    fo._replay(io, report)  # type: ignore[arg-type]
    assert io.got == [f(2), f(3), f(4)]
    assert (report.replayed_frames, report.replay_dropped) == (3, 0)
    assert report.replay_overflow_frames == 1
    # A switchover's old primary still forwards: straight into the running guest.
    buf.add(8, [f(5), f(6)])
    assert io.got[-1] == f(5)
    assert (report.replayed_frames, report.replay_dropped) == (4, 1)
