"""The shared-disk lease block records the run's generation and whether the holder ran
alone; a host holding an older generation cannot write, and a stale standby can neither
take the lease over nor replay onto newer data."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.disk.shared import (
    SharedDiskBackend,
    SharedDiskConfig,
    create_shared_image,
    format_shared,
)
from kemari_suite.errors import LeaseError
from kemari_suite.ha.lease import LEASE_BLOCK, Lease, LeaseRecord, LeaseTiebreaker


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def lun(tmp_path: Path) -> Iterator[Path]:
    path = create_shared_image(tmp_path / "lun.img", 1 << 20)
    yield path
    path.unlink(missing_ok=True)


def _backend(cfg: SharedDiskConfig, node: str, clock: FakeClock) -> SharedDiskBackend:
    lease = Lease(
        cfg.lease_path,
        resource=cfg.resource,
        lease_s=cfg.lease_s,
        io_timeout_s=cfg.io_timeout_s,
        clock=clock,
        sleep=clock.sleep,
    )
    b = SharedDiskBackend(cfg, node, lease=lease)
    b.attach()
    return b


def test_the_solo_flag_round_trips_and_version_1_blocks_still_read() -> None:
    rec = LeaseRecord("vm", "a", 3, 7, 0.0, 3.0, 0.0, solo=True, solo_owner="a")
    back = LeaseRecord.decode(rec.encode(), "dev")
    assert back.solo and back.solo_owner == "a" and back.stale_for("b")
    assert not back.stale_for("a")
    assert len(rec.encode()) == LEASE_BLOCK
    # A block written by the previous version (no solo_owner) still reads, as paired.
    body = struct.pack("<8sII64s64sQQddd", b"KEMLEASE", 1, 0, b"vm", b"a", 3, 7, 0.0, 3.0, 0.0)
    v1 = (body + hashlib.sha256(body).digest()).ljust(LEASE_BLOCK, b"\0")
    old = LeaseRecord.decode(v1, "dev")
    assert (old.owner, old.generation, old.solo) == ("a", 3, False)


def test_a_host_with_an_older_generation_cannot_write(lun: Path) -> None:
    """alpha's own clock has not moved (a paused VM, a stalled host): its local view of
    the lease is still valid, but beta took it over. The generation on disk stops it."""
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ca, cb = FakeClock(), FakeClock()
    a, b = _backend(cfg, "alpha", ca), _backend(cfg, "beta", cb)
    try:
        a.promote()
        a.apply([(0, b"alpha 1")])
        assert b.lease is not None
        b.lease.try_acquire("beta")
        cb.t += cfg.lease_s
        b.promote()  # generation 2
        assert a.lease is not None and a.lease.valid()  # alpha still believes it holds it
        with pytest.raises(LeaseError, match=r"generation 2 .*newer than ours \(1\)"):
            a.apply([(0, b"alpha 2")])
        b.apply([(0, b"beta 1")])
        assert b.read(0, 7) == b"beta 11"  # alpha's first write, beta's over it; no "alpha 2"
    finally:
        a.close()
        b.close()


def test_solo_blocks_the_stale_takeover_and_replay(lun: Path) -> None:
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ca, cb = FakeClock(), FakeClock()
    a, b = _backend(cfg, "alpha", ca), _backend(cfg, "beta", cb)
    ta, tb = a.tiebreaker(), b.tiebreaker()

    async def scenario() -> None:
        d = await ta.ask("paired")
        assert d.granted and not d.solo
        g = d.generation
        d = await ta.ask("solo")  # the standby is gone; alpha writes alone from now on
        assert d.granted and d.solo and d.generation == g + 1
        assert (await ta.ask("renew")).granted  # renewals keep the flag and generation
        assert b.lease is not None
        rec = b.lease.holder()
        assert rec.solo and rec.generation == g + 1
        # alpha dies; beta watches far past the lease: still refused, with the reason.
        for _ in range(3):
            cb.t += cfg.lease_s
            d = await tb.ask("takeover")
            assert not d.granted and "stale" in d.reason and d.stale
        q = await tb.ask("query")
        assert q.stale and q.solo and q.owner == "alpha"
        # The disk layer refuses too (promote is what a replay at failover calls first).
        with pytest.raises(LeaseError, match="stale"):
            b.promote()
        # Protected again: the flag clears, and an expired lease may be taken over.
        ca.t += 1
        d = await ta.ask("paired")
        assert d.granted and not d.solo
        cb.t += cfg.lease_s
        assert not (await tb.ask("takeover")).granted  # a new value to watch
        cb.t += cfg.lease_s
        d = await tb.ask("takeover")
        assert d.granted and d.generation == g + 2 and not d.stale

    try:
        asyncio.run(scenario())
    finally:
        a.close()
        b.close()


def test_a_released_solo_lease_is_still_stale_for_the_other_host(lun: Path) -> None:
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ca, cb = FakeClock(), FakeClock()
    a, b = _backend(cfg, "alpha", ca), _backend(cfg, "beta", cb)
    ta, tb = LeaseTiebreaker(a.lease, "alpha"), LeaseTiebreaker(b.lease, "beta")  # type: ignore[arg-type]

    async def scenario() -> None:
        assert (await ta.ask("solo")).granted
        assert (await ta.ask("release")).granted
        d = await tb.ask("takeover")
        assert not d.granted and "stale" in d.reason
        assert (await ta.ask("renew")).granted  # alpha's own copy is the newest

    try:
        asyncio.run(scenario())
    finally:
        a.close()
        b.close()
