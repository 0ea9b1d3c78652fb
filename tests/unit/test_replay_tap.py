"""The frame proxy's side of replay: copies of LAN -> guest frames while PROTECTED, tagged
with the open epoch; none while UNPROTECTED; and injection into a resumed guest."""

from __future__ import annotations

import asyncio

from kemari_suite.tap.events import TapMode
from tests.unit.test_tap_net import Rig, frame, rig_test


async def lan_to_guest(rig: Rig, *frames: bytes) -> None:
    for f in frames:
        rig.lan.send(f)
    for f in frames:
        assert await rig.guest_recv() == f


@rig_test()
async def test_delivered_frames_are_copied_with_the_open_epoch(rig: Rig) -> None:
    copies: list[tuple[int, list[bytes]]] = []
    rig.proxy.forward = lambda epoch, frames: copies.append((epoch, list(frames)))
    await lan_to_guest(rig, frame(1), frame(2))
    rig.epoch = 3
    await lan_to_guest(rig, frame(3))
    assert [f for _, fs in copies for f in fs] == [frame(1), frame(2), frame(3)]
    assert [e for e, fs in copies for _ in fs] == [1, 1, 3]
    s = rig.proxy.stats
    assert (s.forwarded_frames, s.forwarded_bytes) == (3, 180)


@rig_test(mode=TapMode.UNPROTECTED)
async def test_no_copies_without_a_secondary(rig: Rig) -> None:
    copies: list[tuple[int, list[bytes]]] = []
    rig.proxy.forward = lambda epoch, frames: copies.append((epoch, frames))
    await lan_to_guest(rig, frame(1))
    assert copies == []


@rig_test()
async def test_a_failing_forward_never_costs_the_guest_its_frame(rig: Rig) -> None:
    def broken(epoch: int, frames: list[bytes]) -> None:
        raise RuntimeError("link gone")

    rig.proxy.forward = broken
    await lan_to_guest(rig, frame(1), frame(2))
    assert rig.proxy.stats.to_guest_frames == 2


@rig_test(mode=TapMode.UNPROTECTED)
async def test_inject_writes_kept_frames_to_the_guest_in_order(rig: Rig) -> None:
    kept = [frame(i, 100 + i) for i in range(5)]
    assert rig.proxy.inject(kept) == 5
    for f in kept:
        assert await rig.guest_recv() == f
    s = rig.proxy.stats
    assert (s.replayed_frames, s.replayed_bytes, s.replay_dropped) == (5, 510, 0)
    # Nothing goes to the LAN: a replay is input, not output.
    await asyncio.sleep(0.05)
    assert rig.lan_frames() == []


@rig_test(mode=TapMode.UNPROTECTED)
async def test_inject_without_a_guest_counts_what_it_dropped(rig: Rig) -> None:
    assert rig.writer is not None
    rig.writer.close()
    for _ in range(100):
        if rig.proxy.status()["state"] != "connected":
            break
        await asyncio.sleep(0.01)
    assert rig.proxy.inject([frame(1), frame(2)]) == 0
    assert rig.proxy.stats.replay_dropped == 2
