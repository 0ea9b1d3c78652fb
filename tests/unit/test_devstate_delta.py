"""Device state sent as a change to the previous epoch's: the encoding, the receiver
that applies it to the state it committed last, and the sender that chooses it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kemari_suite.checkpoint.sender import EpochSender
from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.devstatedelta import apply_delta, encode_delta
from kemari_suite.replica.receiver import EpochReceiver
from tests.unit.test_receiver import DELTA, FULL, PAGE, N, deliver, make_epoch


def _state(seed: int, size: int = 400_000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _changed(state: bytes, *spots: int) -> bytes:
    b = bytearray(state)
    for at in spots:
        b[at : at + 8] = bytes(8)
    return bytes(b)


def test_a_few_changed_bytes_travel_as_a_small_delta() -> None:
    a = _state(1)
    b = _changed(a, 10, 5000, 399_000)
    data = encode_delta(a, b)
    assert data is not None and len(data) < 2000
    assert apply_delta(a, data, len(b)) == b


def test_no_delta_across_lengths_or_when_it_would_not_save() -> None:
    a = _state(1)
    assert encode_delta(a, a[:-1]) is None
    assert encode_delta(a, _state(2)) is None  # all new bytes: send the state itself


def test_a_delta_that_does_not_fit_its_base_is_a_protocol_error() -> None:
    a, b = _state(1), _changed(_state(1), 100)
    data = encode_delta(a, b)
    assert data is not None
    with pytest.raises(ProtocolError, match="on a base of"):
        apply_delta(a[:-1], data, len(b))
    with pytest.raises(ProtocolError, match="does not decompress"):
        apply_delta(a, b"not zstd at all", len(b))


def _epoch_with_delta(epoch: int, base_epoch: int, base: bytes, state: bytes) -> object:
    ep = make_epoch(epoch, DELTA, np.array([], np.int64), np.zeros((0, PAGE), np.uint8),
                    np.zeros((0, PAGE), np.uint8), devstate=None)  # fmt: skip
    data = encode_delta(base, state)
    assert data is not None
    msg = wire.DeviceStateDelta(epoch=epoch, base_epoch=base_epoch, size=len(state), data=data)
    ep.parts.append(msg)  # type: ignore[arg-type]
    dg = wire.EpochDigest(epoch)
    for p in ep.parts:
        dg.update(p)
    ep.end = wire.EpochEnd(epoch=epoch, n_pages=0, digest=dg.digest())
    return ep


def _deliver_any(rx: EpochReceiver, ep: object) -> int:
    rx.begin(ep.begin)  # type: ignore[attr-defined]
    for p in ep.parts:  # type: ignore[attr-defined]
        if isinstance(p, wire.Pages):
            rx.receive_pages(p)
        elif isinstance(p, wire.DeviceStateDelta):
            rx.device_state_delta(p)
        elif isinstance(p, wire.DeviceState):
            rx.device_state(p)
    return rx.end(ep.end)  # type: ignore[attr-defined]


def test_the_receiver_applies_a_delta_to_the_state_it_committed_last() -> None:
    ram = np.zeros((N, PAGE), np.uint8)
    a = _state(3)
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    assert deliver(rx, make_epoch(1, FULL, np.arange(N), ram, devstate=a)) == 1
    b = _changed(a, 42)
    assert _deliver_any(rx, _epoch_with_delta(2, 1, a, b)) == 2
    assert rx.committed_devstate == b
    # A delta on any other base is refused: the link starts again from a full sync.
    with pytest.raises(ProtocolError, match="last committed device state is epoch 2"):
        _deliver_any(rx, _epoch_with_delta(3, 1, a, _changed(a, 7)))


def test_the_sender_sends_a_delta_only_after_the_previous_epoch_on_its_connection() -> None:
    sent: list[wire.Message] = []

    async def send(msg: wire.Message) -> int:
        sent.append(msg)
        return 1

    async def run() -> None:
        s = EpochSender(send, PageEncoder("zstd"), n_pages=N)
        a = _state(4)
        for epoch, state in ((5, a), (6, _changed(a, 9)), (8, _changed(a, 11))):
            await s.begin(epoch, DELTA)
            await s.end(n_pages=0, devstate=state, io_log=b"")

    asyncio.run(run())
    kinds = [(type(m).__name__, m.epoch) for m in sent if "DeviceState" in type(m).__name__]
    # Epoch 8 does not follow 6: its base is unknown to the receiver, so the whole state.
    assert kinds == [("DeviceState", 5), ("DeviceStateDelta", 6), ("DeviceState", 8)]
