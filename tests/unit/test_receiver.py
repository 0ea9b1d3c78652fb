"""The epoch receiver over a plain numpy array (no QEMU, no sockets): it commits only
complete, verified epochs in order, and a rollback leaves exactly the last committed
checkpoint. Also the built-in disk copy it drives, on files in a temporary folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.config import KemariConfig, with_overrides
from kemari_suite.errors import FailoverError, ProtocolError, ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.replica.receiver import EpochReceiver
from kemari_suite.replica.replicadisk import BuiltinCopy
from kemari_suite.tap.epochs import IOOp, OpKind, encode

N = 64
PAGE = 4096
FULL = wire.EpochKind.FULL
DELTA = wire.EpochKind.DELTA


@dataclass
class Epoch:
    """One epoch's messages, in the order the primary sends them."""

    begin: wire.EpochBegin
    parts: list[wire.Pages | wire.DeviceState | wire.IOLog]
    end: wire.EpochEnd


def make_epoch(
    epoch: int,
    kind: wire.EpochKind,
    idx: np.ndarray,
    new: np.ndarray,
    old: np.ndarray | None = None,
    *,
    devstate: bytes | None = b"device-state",
    iologs: Sequence[bytes] = (),
    n_pages: int | None = None,
    bad_digest: bool = False,
) -> Epoch:
    begin = wire.EpochBegin(epoch=epoch, kind=kind, ram_size=N * PAGE, page_size=PAGE)
    parts: list[wire.Pages | wire.DeviceState | wire.IOLog] = [
        wire.Pages(epoch=epoch, encoded=PageEncoder("zstd").encode(idx, new, old))
    ]
    if devstate is not None:
        parts.append(wire.DeviceState(epoch=epoch, data=devstate))
    parts += [wire.IOLog(epoch=epoch, data=log) for log in iologs]
    dg = wire.EpochDigest(epoch)
    for p in parts:
        dg.update(p)
    digest = bytes(32) if bad_digest else dg.digest()
    count = len(idx) if n_pages is None else n_pages
    return Epoch(begin, parts, wire.EpochEnd(epoch=epoch, n_pages=count, digest=digest))


def feed(rx: EpochReceiver, ep: Epoch) -> None:
    """Everything but the EpochEnd."""
    rx.begin(ep.begin)
    feed_parts(rx, ep)


def feed_parts(rx: EpochReceiver, ep: Epoch) -> None:
    """The epoch's Pages, DeviceState and IOLog messages."""
    for p in ep.parts:
        if isinstance(p, wire.Pages):
            rx.receive_pages(p)
        elif isinstance(p, wire.DeviceState):
            rx.device_state(p)
        else:
            rx.io_log(p)


def deliver(rx: EpochReceiver, ep: Epoch) -> int:
    feed(rx, ep)
    return rx.end(ep.end)


@pytest.fixture
def ram() -> np.ndarray:
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, size=(N, PAGE), dtype=np.uint8)
    pages[::4] = 0
    return pages


def committed(ram: np.ndarray) -> tuple[EpochReceiver, np.ndarray]:
    """A receiver that committed FULL epoch 1 holding ``ram``."""
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    assert deliver(rx, make_epoch(1, FULL, np.arange(N), ram)) == 1
    return rx, ram.copy()


def delta(ram: np.ndarray, epoch: int, seed: int, **kw: object) -> tuple[Epoch, np.ndarray]:
    """A DELTA epoch over ``ram`` and the pages it ends with."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(N, 10, replace=False)).astype(np.int64)
    new = ram[idx].copy()
    new[:, :200] ^= 0x5A
    after = ram.copy()
    after[idx] = new
    return make_epoch(epoch, DELTA, idx, new, ram[idx], **kw), after  # type: ignore[arg-type]


# ---- commit --------------------------------------------------------------------------


def test_full_then_delta_epochs_commit(ram: np.ndarray) -> None:
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    seen: list[tuple[int, int]] = []
    rx.on_commit(lambda epoch, pages: seen.append((epoch, int(pages[1, 0]))))
    assert deliver(rx, make_epoch(1, FULL, np.arange(N), ram, devstate=b"one")) == 1
    assert np.array_equal(rx.pages, ram)
    assert (rx.committed_epoch, rx.committed_devstate, rx.open) == (1, b"one", None)
    ep2, after = delta(ram, 2, seed=1, devstate=b"two")
    assert deliver(rx, ep2) == 2
    assert np.array_equal(rx.pages, after)
    assert (rx.committed_epoch, rx.committed_devstate, rx.epochs_committed) == (2, b"two", 2)
    assert seen == [(1, int(ram[1, 0])), (2, int(after[1, 0]))]


def test_a_full_epoch_may_follow_any_committed_one(ram: np.ndarray) -> None:
    rx, _ = committed(ram)
    fresh = np.roll(ram, 1, axis=0)
    assert deliver(rx, make_epoch(9, FULL, np.arange(N), fresh)) == 9
    assert np.array_equal(rx.pages, fresh)


# ---- refused epochs ------------------------------------------------------------------


def test_bad_digest_rolls_back_exactly(ram: np.ndarray) -> None:
    rx, before = committed(ram)
    ep, after = delta(ram, 2, seed=2, bad_digest=True)
    feed(rx, ep)
    assert np.array_equal(rx.pages, after), "pages are applied as they arrive"
    with pytest.raises(ProtocolError, match="digest"):
        rx.end(ep.end)
    dropped = rx.rollback()
    assert dropped is not None and dropped.epoch == 2 and dropped.pages == 10
    assert np.array_equal(rx.pages, before), "undo log not applied"
    assert (rx.committed_epoch, rx.committed_devstate, rx.open) == (1, b"device-state", None)
    # The same epoch, sent again intact, commits.
    ep, after = delta(ram, 2, seed=2)
    assert deliver(rx, ep) == 2 and np.array_equal(rx.pages, after)


def test_rollback_mid_epoch_restores_the_committed_bytes(ram: np.ndarray) -> None:
    rx, before = committed(ram)
    ep, _ = delta(ram, 2, seed=3)
    rx.begin(ep.begin)
    pages = ep.parts[0]
    assert isinstance(pages, wire.Pages)
    rx.receive_pages(pages)
    # A second batch touching some of the same pages: undone in reverse order.
    idx = np.array([0, 1, 2, 3], dtype=np.int64)
    rx.receive_pages(
        wire.Pages(epoch=2, encoded=PageEncoder().encode(idx, np.full((4, PAGE), 7, np.uint8)))
    )
    assert not np.array_equal(rx.pages, before)
    rx.rollback()
    assert np.array_equal(rx.pages, before)
    assert rx.rollback() is None, "nothing left to roll back"


def test_delta_out_of_order_is_refused(ram: np.ndarray) -> None:
    empty = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    with pytest.raises(ReplicationError, match="does not follow"):
        empty.begin(wire.EpochBegin(epoch=0, kind=DELTA, ram_size=N * PAGE, page_size=PAGE))
    rx, before = committed(ram)
    for epoch in (1, 3):
        with pytest.raises(ReplicationError, match="does not follow"):
            rx.begin(wire.EpochBegin(epoch=epoch, kind=DELTA, ram_size=N * PAGE, page_size=PAGE))
    assert rx.open is None and np.array_equal(rx.pages, before)


def test_data_for_an_epoch_that_is_not_open_is_a_protocol_error(ram: np.ndarray) -> None:
    rx, _ = committed(ram)
    ep, _ = delta(ram, 2, seed=4)
    pages = ep.parts[0]
    assert isinstance(pages, wire.Pages)
    with pytest.raises(ProtocolError, match="while epoch None is open"):
        rx.receive_pages(pages)
    rx.begin(ep.begin)
    with pytest.raises(ProtocolError, match="data for epoch 5"):
        rx.device_state(wire.DeviceState(epoch=5, data=b"x"))
    with pytest.raises(ProtocolError):
        rx.io_log(wire.IOLog(epoch=1, data=b""))
    with pytest.raises(ProtocolError):
        rx.end(wire.EpochEnd(epoch=3, n_pages=0, digest=bytes(32)))
    with pytest.raises(ProtocolError, match="is open"):
        rx.begin(ep.begin)


def test_epoch_end_without_device_state_is_refused(ram: np.ndarray) -> None:
    rx, before = committed(ram)
    ep, _ = delta(ram, 2, seed=5, devstate=None)
    feed(rx, ep)
    with pytest.raises(ReplicationError, match="without device state"):
        rx.end(ep.end)
    rx.rollback()
    assert rx.committed_epoch == 1 and np.array_equal(rx.pages, before)


def test_an_epoch_missing_pages_is_refused(ram: np.ndarray) -> None:
    rx, _ = committed(ram)
    ep, _ = delta(ram, 2, seed=6, n_pages=11)
    feed(rx, ep)
    with pytest.raises(ReplicationError, match="claims 11 pages, 10 arrived"):
        rx.end(ep.end)


def test_another_ram_size_is_refused() -> None:
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8))
    with pytest.raises(ReplicationError, match="configs differ"):
        rx.begin(wire.EpochBegin(epoch=1, kind=FULL, ram_size=2 * N * PAGE, page_size=PAGE))
    with pytest.raises(ValueError):
        EpochReceiver(np.zeros((N, 512), np.uint8))


def test_a_closed_receiver_takes_no_more_epochs(ram: np.ndarray) -> None:
    rx, before = committed(ram)
    ep, _ = delta(ram, 2, seed=7)
    view = rx.pages
    feed(rx, ep)
    assert rx.close() is not None
    assert np.array_equal(view, before), "close rolls the open epoch back"
    with pytest.raises(ProtocolError, match="closed"):
        rx.begin(ep.begin)


# ---- I/O logs ------------------------------------------------------------------------


def _log(epoch: int, offset: int, data: bytes) -> bytes:
    return encode(epoch, [IOOp(OpKind.WRITE, offset, len(data), data)])


def test_committed_io_logs_are_kept_until_durable(ram: np.ndarray) -> None:
    rx, _ = committed(ram)
    ep2, after = delta(ram, 2, seed=8, iologs=[_log(2, 0, b"a" * 512)])
    deliver(rx, ep2)
    ep3, _ = delta(after, 3, seed=9, iologs=[_log(3, 512, b"b" * 512)])
    feed(rx, ep3)
    assert rx.pending_iologs() == [_log(2, 0, b"a" * 512)], "uncommitted logs are not kept"
    rx.end(ep3.end)
    assert len(rx.pending_iologs()) == 2
    rx.durable(2)
    assert rx.pending_iologs() == [_log(3, 512, b"b" * 512)]
    rx.durable(1)  # never goes back
    assert rx.durable_epoch == 2 and len(rx.pending_iologs()) == 1


@dataclass
class FakeDisk:
    """Records the calls of the ReplicaDisk contract."""

    calls: list[str] = field(default_factory=list)
    copying: bool = False

    def begin_copy(self, lineage: str, *, incremental: bool) -> None:
        self.calls.append(f"begin {lineage} {'incremental' if incremental else 'full'}")
        self.copying = True

    def write_now(self, log: bytes) -> None:
        self.calls.append(f"write {len(log)}")

    def commit(self, epoch: int, logs: Sequence[bytes]) -> None:
        self.calls.append(f"commit {epoch} {len(logs)}")
        self.copying = False

    def abort(self) -> None:
        self.calls.append("abort")
        self.copying = False


def test_a_disk_copy_goes_through_the_replica_disk(ram: np.ndarray) -> None:
    disk = FakeDisk()
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8), disk=disk)
    log = _log(1, 0, b"x" * 512)
    ep = make_epoch(1, FULL, np.arange(N), ram, iologs=[log])
    rx.begin(ep.begin)
    assert rx.disk_copy("L1", incremental=False) == 1
    feed_parts(rx, ep)
    rx.end(ep.end)
    assert disk.calls == ["begin L1 full", f"write {len(log)}", "commit 1 1"]
    assert rx.pending_iologs() == [], "a disk copy here keeps no logs for replay"
    # A delta's logs wait for the commit; a rolled-back copy is aborted.
    ep2, _ = delta(ram, 2, seed=10, iologs=[log])
    deliver(rx, ep2)
    assert disk.calls[-1] == "commit 2 1"
    rx.begin(make_epoch(3, FULL, np.arange(N), ram).begin)
    rx.disk_copy("L2", incremental=True)
    rx.rollback()
    assert disk.calls[-2:] == ["begin L2 incremental", "abort"]


def test_a_disk_copy_needs_a_full_epoch_and_a_disk(ram: np.ndarray) -> None:
    rx, _ = committed(ram)
    with pytest.raises(ProtocolError, match="outside a FULL epoch"):
        rx.disk_copy("L", incremental=False)
    ep, _ = delta(ram, 2, seed=11)
    rx.begin(ep.begin)
    with pytest.raises(ProtocolError, match="outside a FULL epoch"):
        rx.disk_copy("L", incremental=False)
    rx.rollback()
    rx.begin(make_epoch(5, FULL, np.arange(N), ram).begin)
    with pytest.raises(ReplicationError, match="has none"):
        rx.disk_copy("L", incremental=False)


# ---- the built-in disk copy, on files --------------------------------------------------


def _builtin(tmp_path: Path) -> tuple[KemariConfig, BuiltinCopy]:
    img = tmp_path / "disk.img"
    img.write_bytes(b"o" * 8192)
    cfg = with_overrides(KemariConfig(), disk={"path": str(img), "backend": "builtin"})
    disk = BuiltinCopy.open(cfg)
    assert disk is not None
    return cfg, disk


def test_builtin_disk_full_copy_replaces_the_old_at_commit(tmp_path: Path, ram: np.ndarray) -> None:
    cfg, disk = _builtin(tmp_path)
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8), disk=disk)
    ep = make_epoch(1, FULL, np.arange(N), ram, iologs=[_log(1, 4096, b"n" * 4096)])
    rx.begin(ep.begin)
    rx.disk_copy("L1", incremental=False)
    feed_parts(rx, ep)
    assert Path(cfg.disk.path + ".next").exists()
    assert Path(cfg.disk.path).read_bytes() == b"o" * 8192, "old copy untouched until commit"
    rx.end(ep.end)
    assert not Path(cfg.disk.path + ".next").exists()
    assert Path(cfg.disk.path).read_bytes() == bytes(4096) + b"n" * 4096
    assert disk.state() == {"lineage": "L1", "epoch": 1}
    # A delta's writes land at its commit, under the same lineage.
    ep2, _ = delta(ram, 2, seed=12, iologs=[_log(2, 0, b"d" * 10)])
    deliver(rx, ep2)
    assert Path(cfg.disk.path).read_bytes()[:10] == b"d" * 10
    assert json.loads(Path(cfg.disk.path + ".kemari.json").read_text())["epoch"] == 2
    disk.close()


def test_builtin_disk_rolled_back_copy_leaves_the_old_one(tmp_path: Path, ram: np.ndarray) -> None:
    cfg, disk = _builtin(tmp_path)
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8), disk=disk)
    rx.begin(make_epoch(1, FULL, np.arange(N), ram).begin)
    rx.disk_copy("L1", incremental=False)
    rx.io_log(wire.IOLog(epoch=1, data=_log(1, 0, b"z" * 100)))
    rx.rollback()
    assert not Path(cfg.disk.path + ".next").exists()
    assert Path(cfg.disk.path).read_bytes() == b"o" * 8192
    # An incremental copy cut short leaves a copy that is nobody's.
    rx.begin(make_epoch(1, FULL, np.arange(N), ram).begin)
    rx.disk_copy("L1", incremental=True)
    rx.rollback()
    assert not disk.state().get("lineage"), "an interrupted in-place copy is nobody's"
    disk.close()


def test_builtin_disk_failover_refuses_a_diverged_copy(tmp_path: Path, ram: np.ndarray) -> None:
    cfg, disk = _builtin(tmp_path)
    rx = EpochReceiver(np.zeros((N, PAGE), np.uint8), disk=disk)
    ep = make_epoch(1, FULL, np.arange(N), ram)
    rx.begin(ep.begin)
    rx.disk_copy("L1", incremental=False)
    feed_parts(rx, ep)
    rx.end(ep.end)
    with pytest.raises(FailoverError, match="diverged"):
        disk.prepare_failover(2)
    disk.prepare_failover(1)
    assert not Path(cfg.disk.path + ".kemari.json").exists(), "nobody's replica any more"


def test_a_page_sent_again_in_one_epoch_is_logged_for_undo_once(ram: np.ndarray) -> None:
    rx, before = committed(ram)
    ep, _ = delta(ram, 2, seed=5)
    rx.begin(ep.begin)
    idx = np.array([4, 5, 6], dtype=np.int64)
    for value in (11, 12, 13):  # pre-copy passes, then the stop, resending the same pages
        rx.receive_pages(
            wire.Pages(
                epoch=2, encoded=PageEncoder().encode(idx, np.full((3, PAGE), value, np.uint8))
            )
        )
    assert rx.open is not None
    logged = np.concatenate([i for i, _ in rx.open.undo])
    assert sorted(logged.tolist()) == [4, 5, 6], "each page's first old version, once"
    assert np.all(rx.pages[idx] == 13)
    rx.rollback()
    assert np.array_equal(rx.pages, before)
    # The next epoch logs those pages afresh (nothing left marked from the rolled back one).
    rx.begin(ep.begin)
    rx.receive_pages(
        wire.Pages(epoch=2, encoded=PageEncoder().encode(idx, np.full((3, PAGE), 9, np.uint8)))
    )
    assert rx.open is not None
    assert sorted(np.concatenate([i for i, _ in rx.open.undo]).tolist()) == [4, 5, 6]
    rx.rollback()
    assert np.array_equal(rx.pages, before)
