"""The first epoch after a planned switchover: a delta on the RAM the old primary kept,
only when both sides prove they hold the same checkpoint; anything else is a full copy.
The standby's side: the kept RAM as a baseline that a delta follows, never resumed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.checkpoint.baseline import SwitchBaseline, delta_refusal
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ProtocolError, ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.replica.receiver import EpochReceiver
from kemari_suite.replica.store import KeptRAM, ReplicaStore
from kemari_suite.service.metrics import Artifacts
from kemari_suite.vm.guestram import DIGEST_PIECE_PAGES, create_ram_file, ram_digest
from tests.unit.test_receiver import DELTA, FULL, PAGE, N, deliver, delta, make_epoch


@pytest.fixture
def ram() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(N, PAGE), dtype=np.uint8)


DIGEST = bytes(range(32))
OURS = SwitchBaseline(epoch=12, lineage="3f2a", digest=DIGEST)


def theirs(**kw: object) -> wire.RamState:
    fields: dict[str, object] = {"epoch": 12, "lineage": "3f2a", "digest": DIGEST, **kw}
    return wire.RamState(**fields)  # type: ignore[arg-type]


# ---- the primary's decision ---------------------------------------------------------------


def test_the_same_epoch_lineage_and_digest_allow_a_delta() -> None:
    assert delta_refusal(OURS, theirs()) == ""


@pytest.mark.parametrize(
    ("ours", "peer", "why"),
    [
        (None, theirs(), "no switchover checkpoint"),
        (SwitchBaseline(12, "3f2a", b""), theirs(), "digest is unknown"),
        (OURS, None, "did not say"),
        (OURS, wire.RamState(epoch=wire.NO_EPOCH), "keeps no switchover checkpoint"),
        (OURS, theirs(epoch=11), "keeps epoch 11, this host resumed 12"),
        (OURS, theirs(lineage="9e1b"), "lineage '9e1b'"),
        (OURS, theirs(digest=bytes(32)), "digest mismatch"),
        (OURS, theirs(digest=b""), "digest mismatch"),
    ],
    ids=["none-here", "no-digest-here", "no-answer", "none-there", "epoch", "lineage",
         "digest", "no-digest-there"],
)  # fmt: skip
def test_any_doubt_means_a_full_copy(
    ours: SwitchBaseline | None, peer: wire.RamState | None, why: str
) -> None:
    assert why in delta_refusal(ours, peer)


def test_the_digest_covers_every_byte_whatever_the_threads() -> None:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, size=(DIGEST_PIECE_PAGES + 5, PAGE), dtype=np.uint8)
    d = ram_digest(pages)
    assert d == ram_digest(pages, threads=1) and len(d) == 32
    pages[-1, -1] ^= 1
    assert ram_digest(pages) != d
    # The size is part of it: zeros of another size differ.
    assert ram_digest(np.zeros((2, PAGE), np.uint8)) != ram_digest(np.zeros((3, PAGE), np.uint8))


# ---- the standby's baseline ---------------------------------------------------------------


def test_a_delta_follows_the_kept_checkpoint_and_makes_it_resumable(ram: np.ndarray) -> None:
    rx = EpochReceiver(ram.copy())
    rx.adopt_baseline(12)
    assert rx.committed_epoch == 12 and rx.baseline_epoch == 12
    # No device state: a failover cannot resume a baseline.
    assert not rx.resumable
    ep, after = delta(ram, 13, seed=1)
    assert deliver(rx, ep) == 13
    assert np.array_equal(rx.pages, after)
    assert rx.resumable and rx.baseline_epoch == -1


def test_a_delta_that_does_not_follow_the_baseline_is_refused(ram: np.ndarray) -> None:
    rx = EpochReceiver(ram.copy())
    rx.adopt_baseline(12)
    ep, _ = delta(ram, 14, seed=1)
    with pytest.raises(ReplicationError, match="does not follow committed 12"):
        rx.begin(ep.begin)


def test_a_full_epoch_replaces_the_baseline(ram: np.ndarray) -> None:
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    rx.adopt_baseline(12)
    assert deliver(rx, make_epoch(13, FULL, np.arange(N), ram)) == 13
    assert rx.resumable and rx.baseline_epoch == -1
    assert np.array_equal(rx.pages, ram)


def test_only_a_fresh_replica_takes_a_baseline(ram: np.ndarray) -> None:
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    deliver(rx, make_epoch(1, FULL, np.arange(N), ram))
    with pytest.raises(ProtocolError, match="fresh replica"):
        rx.adopt_baseline(1)


def test_a_disk_copy_rides_only_the_first_delta_on_a_baseline(ram: np.ndarray) -> None:
    rx = EpochReceiver(ram.copy())
    rx.adopt_baseline(12)
    ep, _ = delta(ram, 13, seed=1)
    rx.begin(ep.begin)
    # Allowed past the kind check: this replica has no disk copy to write.
    with pytest.raises(ReplicationError, match="has none"):
        rx.disk_copy("3f2a", incremental=True)
    rx.rollback()
    rx2 = EpochReceiver(ram.copy())
    rx2.adopt_baseline(12)
    deliver(rx2, delta(ram, 13, seed=1)[0])
    rx2.begin(wire.EpochBegin(epoch=14, kind=DELTA, ram_size=N * PAGE, page_size=PAGE))
    with pytest.raises(ProtocolError, match="outside a FULL epoch"):
        rx2.disk_copy("3f2a", incremental=True)


def _store(tmp_path: Path, kept: KeptRAM | None) -> ReplicaStore:
    return ReplicaStore(
        KemariConfig(), tmp_path / "vm.ram", tmp_path / "run", N, Artifacts(tmp_path / "art"), kept
    )


def test_the_store_keeps_the_switchover_ram_and_says_so(tmp_path: Path, ram: np.ndarray) -> None:
    path = create_ram_file(tmp_path / "vm.ram", N * PAGE)
    path.write_bytes(ram.tobytes())
    store = _store(tmp_path, KeptRAM(path, epoch=12, lineage="3f2a"))
    store.open()
    try:
        assert store.ram is not None and np.array_equal(store.ram.pages, ram)
        assert store.ram_state() == (12, "3f2a", ram_digest(ram))
        assert not store.resumable
        ep, _ = delta(ram, 13, seed=2)
        assert store.synchronization(ep.begin).startswith("delta synchronization")

        async def commit() -> None:
            await store.begin(ep.begin)
            for p in ep.parts:
                if isinstance(p, wire.Pages):
                    await store.pages(p)
                elif isinstance(p, wire.DeviceState):
                    await store.device_state(p)

            async def after(epoch: int, devstate: bytes) -> None:
                return None

            await store.end(ep.end, after)

        asyncio.run(commit())
        # Committed: an ordinary replica now, no longer offered as a baseline.
        assert store.resumable and store.ram_state() == (-1, "", b"")
        assert store.kept_status() is None
    finally:
        store.close(keep_file=False)


def test_a_kept_file_of_another_size_is_dropped_for_zeros(tmp_path: Path) -> None:
    path = create_ram_file(tmp_path / "vm.ram", (N - 1) * PAGE)
    store = _store(tmp_path, KeptRAM(path, epoch=12, lineage=""))
    store.open()
    try:
        assert store.ram_state() == (-1, "", b"")
        assert store.ram is not None and not store.ram.pages.any()
        assert store.committed_epoch == -1
    finally:
        store.close(keep_file=False)
