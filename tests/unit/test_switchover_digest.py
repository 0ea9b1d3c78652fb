"""The digest a switchover resumes with: the standby keeps its replica's digest pieces
current (every write marks its piece, a refresh re-hashes the marked ones), so the digest
at the resume costs only the last epochs, and it is still the digest of every byte the
guest resumes from: a standby whose RAM differs never gets a delta."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kemari_suite.checkpoint.baseline import DIGEST_MISMATCH, SwitchBaseline, delta_refusal
from kemari_suite.checkpoint.syncpoint import SyncPoints
from kemari_suite.config import KemariConfig
from kemari_suite.errors import ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.replica.receiver import EpochReceiver
from kemari_suite.replica.store import ReplicaStore
from kemari_suite.service.metrics import Artifacts
from kemari_suite.vm.guestram import DIGEST_PIECE_PAGES, GuestRAM, RamDigests, ram_digest
from tests.unit.test_receiver import FULL, PAGE, N, deliver, delta, feed, make_epoch


@pytest.fixture
def ram() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, size=(N, PAGE), dtype=np.uint8)


def test_refreshed_pieces_give_the_full_digest_after_epochs_and_a_rollback(
    ram: np.ndarray,
) -> None:
    rx = EpochReceiver(ram.copy())
    pieces = RamDigests(rx.pages)
    rx.written = pieces.touched
    assert pieces.refresh() == -(-N // DIGEST_PIECE_PAGES) and pieces.stale == 0
    ep, after = delta(ram, 1, seed=1)
    rx.adopt_baseline(0)
    deliver(rx, ep)
    # An epoch applied, then rolled back: its pages were written twice.
    feed(rx, delta(after, 2, seed=2)[0])
    rx.rollback()
    assert 0 < pieces.stale < N // DIGEST_PIECE_PAGES
    assert pieces.digest() == ram_digest(after) == ram_digest(rx.pages, threads=1)
    assert pieces.stale == 0


def test_a_write_not_marked_is_what_the_marks_exist_for(ram: np.ndarray) -> None:
    pieces = RamDigests(ram)
    before = pieces.digest()
    ram[5, 7] ^= 1
    # Unmarked, the kept piece hides the change; marked, the digest sees it.
    assert pieces.digest() == before
    pieces.touched(np.array([5]))
    assert pieces.digest() == ram_digest(ram) != before


def test_a_refresh_beside_a_writer_stays_exact() -> None:
    """The rule: the writer marks after writing, the refresh clears before reading."""
    pages = np.zeros((4096, PAGE), np.uint8)
    pieces = RamDigests(pages)
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(5)
        while not stop.is_set():
            idx = rng.choice(len(pages), 64, replace=False)
            pages[idx, rng.integers(0, PAGE)] += 1
            pieces.touched(idx)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(5):
            pieces.refresh(threads=2)
    finally:
        stop.set()
        t.join()
    assert pieces.digest() == ram_digest(pages)


def test_stop_ends_a_background_refresh_and_refuses_a_digest() -> None:
    """Closing the store stops the refresh thread (its task's cancel cannot) before the
    pages go; a digest asked for afterwards is refused, never a digest of half the RAM."""
    pages = np.random.default_rng(3).integers(0, 256, (16384, PAGE), dtype=np.uint8)
    pieces = RamDigests(pages)
    t = threading.Thread(target=pieces.refresh, kwargs={"nice": 1})
    t.start()
    pieces.stop()
    # stop() waited for the refresh: it is over, with pieces left unhashed.
    t.join(timeout=0.5)
    assert not t.is_alive()
    assert pieces.stale > 0
    assert pieces.refresh() == pieces.stale  # meant to, hashed none
    with pytest.raises(ReplicationError, match="closed"):
        pieces.digest()


def test_closing_the_store_stops_its_digests(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.open()
    assert store.digests is not None
    digests = store.digests
    store.close(keep_file=False)
    with pytest.raises(ReplicationError):
        digests.digest()


def _store(tmp_path: Path) -> ReplicaStore:
    return ReplicaStore(
        KemariConfig(), tmp_path / "vm.ram", tmp_path / "run", N, Artifacts(tmp_path / "art")
    )


def test_a_standby_whose_ram_differs_never_gets_a_delta(tmp_path: Path, ram: np.ndarray) -> None:
    """The switchover's resume hashes only what changed since the last refresh, and that
    digest still tells a kept RAM that misses one epoch, or one byte, from the checkpoint."""
    store = _store(tmp_path)
    store.open()
    try:
        rx = store.receiver
        assert rx is not None and store.ram is not None and store.digests is not None
        deliver(rx, make_epoch(1, FULL, np.arange(N), ram))

        async def refresh() -> None:
            store.refresh_digests()
            while store.digests is not None and store.digests.stale:
                await asyncio.sleep(0.01)

        asyncio.run(refresh())
        missed_epoch = store.ram.pages.copy()
        ep, after = delta(ram, 2, seed=3)
        deliver(rx, ep)
        feed(rx, delta(after, 3, seed=4)[0])
        store.roll_back_locked("failover")
        checkpoint = store.ram.pages.copy()
        assert np.array_equal(checkpoint, after)
        store.unmap()
        ours = SwitchBaseline(2, "3f2a", store.checkpoint_digest())
    finally:
        store.close(keep_file=False)

    def kept(pages: np.ndarray) -> wire.RamState:
        return wire.RamState(epoch=2, lineage="3f2a", digest=ram_digest(pages))

    assert delta_refusal(ours, kept(checkpoint)) == ""
    assert delta_refusal(ours, kept(missed_epoch)) == DIGEST_MISMATCH
    one_byte = checkpoint.copy()
    # A page no epoch since the refresh wrote: only a full digest would see it.
    untouched = np.setdiff1d(np.arange(N), np.flatnonzero((after != ram).any(axis=1)))
    one_byte[untouched[0], 100] ^= 1
    assert delta_refusal(ours, kept(one_byte)) == DIGEST_MISMATCH


def test_a_digest_mismatch_is_a_full_copy_and_said_loudly(tmp_path: Path) -> None:
    artifacts = Artifacts(tmp_path / "art")
    ours = SwitchBaseline(epoch=12, lineage="3f2a", digest=bytes(range(32)))
    known = asyncio.Event()
    known.set()
    peer = SimpleNamespace(
        ram_known=known, ram=wire.RamState(epoch=12, lineage="3f2a", digest=bytes(32))
    )
    agent = SimpleNamespace(baseline=ours, peer=peer, artifacts=artifacts)
    kind, why = asyncio.run(SyncPoints(agent).first_epoch_kind())  # type: ignore[arg-type]
    artifacts.close()
    assert kind is wire.EpochKind.FULL and why == DIGEST_MISMATCH
    events = [json.loads(line) for line in (tmp_path / "art" / "events.jsonl").open()]
    assert [e["event"] for e in events] == ["switchover-digest-mismatch"]
    assert events[0]["epoch"] == 12


def test_a_mapping_populated_in_the_background_reads_the_same(tmp_path: Path) -> None:
    """The new primary maps its guest's RAM at once and faults it in at a low priority:
    the resumed guest does not wait for that."""
    path = tmp_path / "vm.ram"
    data = np.random.default_rng(2).integers(0, 256, size=(N, PAGE), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    ram = GuestRAM(path, populate=False)
    try:
        assert ram.populate_in_background() is ram
        assert np.array_equal(ram.pages, data)
    finally:
        ram.close()
