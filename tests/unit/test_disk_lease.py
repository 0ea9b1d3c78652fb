"""The shared-storage lease, with two "hosts": two Lease objects on one temp file, each
with its own fake monotonic clock (and a wall clock that is deliberately wrong)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kemari_suite.errors import ConnectError, LeaseError
from kemari_suite.ha.lease import (
    LEASE_BLOCK,
    Lease,
    LeaseRecord,
    LeaseTiebreaker,
)

LEASE_S = 3.0


class FakeClock:
    """A monotonic clock that only moves when told; sleep() moves it (and may run a hook,
    which is how a test makes the other host act during our settle pause)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.on_sleep: Callable[[], None] | None = None

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        hook, self.on_sleep = self.on_sleep, None
        if hook is not None:
            hook()


@pytest.fixture
def lease_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "lease.img"
    path.write_bytes(bytes(2 * LEASE_BLOCK))
    yield path
    path.unlink(missing_ok=True)


def host(path: Path, clock: FakeClock, *, wall: float = 1.7e9, **kw: object) -> Lease:
    return Lease(
        path,
        resource="kemari0",
        lease_s=LEASE_S,
        io_timeout_s=0.5,
        clock=clock,
        wall=lambda: wall,
        sleep=clock.sleep,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def pair(lease_file: Path) -> Iterator[tuple[Lease, FakeClock, Lease, FakeClock]]:
    ca, cb = FakeClock(1000.0), FakeClock(50.0)  # unrelated clocks, as on two hosts
    a = host(lease_file, ca, wall=1.7e9)
    b = host(lease_file, cb, wall=1.0e9)  # b's wall clock is years behind: irrelevant
    a.format()
    yield a, ca, b, cb
    a.close()
    b.close()


def test_record_roundtrip_and_layout() -> None:
    rec = LeaseRecord("kemari0", "alpha", 3, 17, 1.5e9, 3.0, 1.4e9)
    block = rec.encode()
    assert len(block) == LEASE_BLOCK
    assert block[:8] == b"KEMLEASE"
    assert block[80:85] == b"alpha"
    assert LeaseRecord.decode(block, "dev") == rec
    free = LeaseRecord("kemari0", None, 0, 0, 0.0, 3.0, 0.0)
    assert LeaseRecord.decode(free.encode(), "dev").owner is None
    with pytest.raises(LeaseError, match="64 bytes"):
        LeaseRecord("kemari0", "x" * 65, 0, 0, 0.0, 3.0, 0.0).encode()


def test_claim_free_lease_then_other_host_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ca, b, _cb = pair
    rec = a.acquire("alpha")
    assert (rec.owner, rec.generation) == ("alpha", 1)
    assert a.valid()
    att = b.try_acquire("beta")
    assert not att.granted
    assert "held by alpha" in att.reason
    assert att.wait_left_s == LEASE_S
    assert b.holder().owner == "alpha"
    with pytest.raises(LeaseError, match="held by alpha"):
        b.acquire("beta")


def test_live_holder_is_never_taken_over(pair) -> None:  # type: ignore[no-untyped-def]
    a, ca, b, cb = pair
    a.acquire("alpha")
    for _ in range(20):  # 20 s of watching, the holder renews every second
        ca.t += 1.0
        a.renew()
        cb.t += 1.0
        assert not b.try_acquire("beta").granted
    assert a.holder().owner == "alpha"
    assert a.valid()


def test_takeover_after_the_counter_stood_still_on_the_acquirers_clock(pair) -> None:  # type: ignore[no-untyped-def]
    a, ca, b, cb = pair
    a.acquire("alpha")
    gen = a.generation
    # a stops renewing (crashed / partitioned). Its own view runs out first.
    assert not b.try_acquire("beta").granted  # starts watching
    cb.t += LEASE_S - 0.01
    att = b.try_acquire("beta")
    assert not att.granted and att.wait_left_s == pytest.approx(0.01)
    ca.t += LEASE_S
    assert not a.valid()
    cb.t += 0.02
    att = b.try_acquire("beta")
    assert att.granted, att.reason
    assert "taken over from alpha" in att.reason
    assert att.record.owner == "beta"
    assert att.record.generation == gen + 1  # takeover bumps the generation
    # The old holder finds out on its next renewal and must stop.
    with pytest.raises(LeaseError, match="now held by beta") as info:
        a.renew()
    assert "generation 2, ours was 1" in info.value.reason
    assert a.node is None and not a.valid()
    # And b renews normally.
    cb.t += 1
    assert b.renew().counter == att.record.counter + 1


def test_expiry_never_trusts_the_holders_wall_clock(pair) -> None:  # type: ignore[no-untyped-def]
    """alpha's wall clock is far ahead of beta's: its expires_wall lies decades in beta's
    future, yet beta takes over after lease_s of its own clock, no sooner, no later."""
    a, _ca, b, cb = pair
    rec = a.acquire("alpha")
    assert rec.expires_wall == pytest.approx(1.7e9 + LEASE_S)
    b.try_acquire("beta")
    cb.t += LEASE_S
    assert b.try_acquire("beta").granted


def test_a_fresh_watcher_must_watch_a_whole_period(pair, lease_file: Path) -> None:  # type: ignore[no-untyped-def]
    """A restarted standby has no history: it cannot take over before watching lease_s."""
    a, _ca, b, cb = pair
    a.acquire("alpha")
    cb.t += 100
    b.try_acquire("beta")
    cb2 = FakeClock(7.0)
    b2 = host(lease_file, cb2)
    try:
        assert not b2.try_acquire("beta").granted
        cb2.t += LEASE_S / 2
        assert not b2.try_acquire("beta").granted
        cb2.t += LEASE_S / 2
        assert b2.try_acquire("beta").granted
    finally:
        b2.close()


def test_longer_lease_of_the_holder_is_respected(lease_file: Path) -> None:
    ca, cb = FakeClock(), FakeClock()
    a = Lease(
        lease_file, resource="kemari0", lease_s=10.0, clock=ca, sleep=ca.sleep, io_timeout_s=0.5
    )
    b = host(lease_file, cb)
    try:
        a.format()
        a.acquire("alpha")
        b.try_acquire("beta")
        cb.t += LEASE_S + 1
        att = b.try_acquire("beta")
        assert not att.granted and "of 10.00 s" in att.reason
        cb.t += 6.0
        assert b.try_acquire("beta").granted
    finally:
        a.close()
        b.close()


def test_race_for_a_free_lease_has_one_winner(pair) -> None:  # type: ignore[no-untyped-def]
    """Both read 'free'; during alpha's settle pause beta writes its claim: the last
    writer wins and alpha sees it on its re-read."""
    a, ca, b, _cb = pair
    results = {}

    free_block = b._io.read()
    real_read = b._io.read

    def beta_claims() -> None:
        # beta's read happened before alpha's write: it saw the lease free.
        stale = iter([free_block])
        b._io.read = lambda: next(stale, None) or real_read()
        results["beta"] = b.try_acquire("beta")

    ca.on_sleep = beta_claims
    results["alpha"] = a.try_acquire("alpha")
    assert results["beta"].granted
    assert not results["alpha"].granted
    assert "lost the race for the lease to beta" in results["alpha"].reason
    assert a.holder().owner == "beta"
    assert a.node is None and b.node == "beta"


def test_late_renewal_after_a_takeover_write_fails(pair) -> None:  # type: ignore[no-untyped-def]
    """alpha renews while beta is in its settle pause after writing a takeover: alpha's
    read sees beta's claim, so alpha's renewal fails and beta keeps the lease."""
    a, _ca, b, cb = pair
    a.acquire("alpha")
    b.try_acquire("beta")
    cb.t += LEASE_S
    errors: list[LeaseError] = []

    def alpha_renews() -> None:
        try:
            a.renew()
        except LeaseError as err:
            errors.append(err)

    cb.on_sleep = alpha_renews
    att = b.try_acquire("beta")
    assert att.granted
    assert len(errors) == 1 and "now held by beta" in errors[0].reason
    assert a.node is None


def test_renewal_overwrites_a_takeover_in_flight(pair) -> None:  # type: ignore[no-untyped-def]
    """alpha read its own record just before beta's takeover write, and its renewal
    lands during beta's settle pause: beta's re-read sees alpha and backs off."""
    a, _ca, b, cb = pair
    a.acquire("alpha")
    b.try_acquire("beta")
    cb.t += LEASE_S
    rec_before = a._read()

    def alpha_renew_lands() -> None:
        a._io.write(replace(rec_before, counter=rec_before.counter + 1).encode())

    cb.on_sleep = alpha_renew_lands
    att = b.try_acquire("beta")
    assert not att.granted and "lost the race" in att.reason and "alpha" in att.reason
    assert a.renew().owner == "alpha"


def test_release_then_immediate_claim(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ca, b, _cb = pair
    a.acquire("alpha")
    freed = a.release()
    assert freed.owner is None and freed.generation == 1
    assert not a.valid()
    att = b.try_acquire("beta")
    assert att.granted and att.record.generation == 2
    with pytest.raises(LeaseError, match="without holding"):
        a.renew()
    with pytest.raises(LeaseError, match="without holding"):
        a.release()


def test_readopt_own_lease_after_restart(pair, lease_file: Path) -> None:  # type: ignore[no-untyped-def]
    a, _ca, _b, _cb = pair
    a.acquire("alpha")
    a2 = host(lease_file, FakeClock(0.0))
    try:
        att = a2.try_acquire("alpha")
        assert att.granted and "already ours" in att.reason
        assert att.record.generation == 1
    finally:
        a2.close()


def test_slow_io_is_refused(lease_file: Path) -> None:
    class Jumpy(FakeClock):
        def __call__(self) -> float:
            self.t += 0.4  # every look at the clock costs 0.4 s: I/O is "slow"
            return self.t

    c = Jumpy()
    slow = host(lease_file, c)
    try:
        slow.format()
        with pytest.raises(LeaseError, match="slower than io_timeout_s"):
            slow.acquire("alpha")
        assert slow.holder().owner is None
    finally:
        slow.close()


# ---- corruption and formatting -----------------------------------------------------------


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    ("offset", "data", "words"),
    [
        (150, b"\x01", "checksum mismatch"),
        (0, b"NOTLEASE", "not a Kemari lease"),
        (8, b"\x09\x00\x00\x00", "lease version 9"),
    ],
)
def test_corruption_is_detected_and_never_used(
    pair,
    lease_file: Path,
    offset: int,
    data: bytes,
    words: str,  # type: ignore[no-untyped-def]
) -> None:
    a, _ca, b, _cb = pair
    a.acquire("alpha")
    corrupt(lease_file, offset, data)
    with pytest.raises(LeaseError, match=words):
        b.try_acquire("beta")
    with pytest.raises(LeaseError, match=words):
        a.renew()
    with pytest.raises(LeaseError, match="refusing to format"):
        b.format()
    b.format(force=True)
    assert b.holder().owner is None


def test_unformatted_and_foreign_resource(lease_file: Path) -> None:
    c = FakeClock()
    lease = host(lease_file, c)
    other = Lease(lease_file, resource="other-vm", clock=c, sleep=c.sleep)
    try:
        with pytest.raises(LeaseError, match="not formatted"):
            lease.acquire("alpha")
        other.format()
        with pytest.raises(LeaseError, match="belongs to resource 'other-vm'"):
            lease.holder()
        with pytest.raises(LeaseError, match="already holds a lease of 'other-vm'"):
            lease.format()
    finally:
        lease.close()
        other.close()


def test_device_checks(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(bytes(100))
    with pytest.raises(LeaseError, match="too small"):
        Lease(small, resource="r")
    with pytest.raises(LeaseError, match="cannot open"):
        Lease(tmp_path / "missing", resource="r")
    with pytest.raises(LeaseError, match="aligned"):
        Lease(small, resource="r", offset=100)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_io(lease_file: Path, direct: bool) -> None:
    c = FakeClock()
    try:
        lease = host(lease_file, c, direct=direct, offset=LEASE_BLOCK)
    except LeaseError as err:
        pytest.skip(f"file system refuses O_DIRECT: {err}")
    try:
        assert lease.direct is direct
        lease.format()
        lease.acquire("alpha")
        with open(lease_file, "rb") as f:
            raw = f.read()
        assert raw[:LEASE_BLOCK] == bytes(LEASE_BLOCK)  # block 0 untouched
        assert raw[LEASE_BLOCK : LEASE_BLOCK + 8] == b"KEMLEASE"
    finally:
        lease.close()


# ---- the tiebreaker interface -------------------------------------------------------------


def test_tiebreaker_mirrors_the_witness(pair) -> None:  # type: ignore[no-untyped-def]
    a, ca, b, cb = pair
    ta, tb = LeaseTiebreaker(a, "alpha"), LeaseTiebreaker(b, "beta")

    async def scenario() -> None:
        d = await ta.ask("renew")  # a free lease is claimed, like the witness does
        assert d.granted and d.owner == "alpha" and d.generation == 1
        assert ta.lease_valid(LEASE_S, margin_s=0.2)
        d = await tb.ask("renew")
        assert not d.granted and d.reason == "lease held by alpha"
        d = await tb.ask("takeover")
        assert not d.granted and d.expires_in == LEASE_S
        ca.t += 1
        assert (await ta.ask("renew")).granted
        d = await ta.ask("query")
        assert d.granted and d.reason == "query"
        # alpha goes silent; beta keeps asking every heartbeat while it watches.
        for _ in range(2):
            cb.t += 1
            assert not (await tb.ask("takeover")).granted
        ca.t += LEASE_S
        assert not ta.lease_valid(LEASE_S, margin_s=0.2)
        cb.t += 1.99  # the watch began at beta's first look after alpha's last renewal
        assert not (await tb.ask("takeover")).granted
        cb.t += 0.01
        d = await tb.ask("takeover")
        assert d.granted and d.owner == "beta" and d.generation == 2, d.reason
        d = await ta.ask("renew")
        assert not d.granted and "now held by beta" in d.reason
        assert ta.last_granted_sent is None
        d = await ta.ask("release")
        assert not d.granted and "owner is beta" in d.reason
        d = await tb.ask("release")
        assert d.granted and d.owner is None

    asyncio.run(scenario())


def test_tiebreaker_reports_corruption_as_refusal_and_io_failure_as_connect_error(
    pair,
    lease_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    _a, _ca, b, _cb = pair
    tb = LeaseTiebreaker(b, "beta")
    corrupt(lease_file, 100, b"\xff")

    async def ask() -> None:
        d = await tb.ask("takeover")
        assert not d.granted and "checksum mismatch" in d.reason

    asyncio.run(ask())

    class Broken:
        def read(self) -> bytes:
            raise LeaseError("lease.img", "read failed: Input/output error") from OSError(5, "EIO")

        def close(self) -> None:
            pass

    b._io = Broken()  # type: ignore[assignment]
    with pytest.raises(ConnectError, match="Input/output error"):
        asyncio.run(tb.ask("takeover"))


def test_io_error_is_a_lease_error_caused_by_oserror(lease_file: Path) -> None:
    """A lease on a device that goes away: renewal raises LeaseError caused by OSError."""
    c = FakeClock()
    lease = host(lease_file, c)
    try:
        lease.format()
        lease.acquire("alpha")
        os.close(lease._io.fd)
        with pytest.raises(LeaseError, match="read failed") as info:
            lease.renew()
        assert isinstance(info.value.__cause__, OSError)
        lease._io.fd = os.open(os.devnull, os.O_RDONLY)  # so close() has something
    finally:
        lease.close()


def test_stale_holder_with_the_same_name_is_caught_by_the_generation(
    pair,
    lease_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    """An old agent process of alpha (generation 1) must not renew the lease a newer
    alpha process holds after beta held and released it (generation 3)."""
    a, _ca, b, cb = pair
    a.acquire("alpha")
    b.try_acquire("beta")
    cb.t += LEASE_S
    assert b.try_acquire("beta").granted
    b.release()
    a2 = host(lease_file, FakeClock(0.0))
    try:
        assert a2.acquire("alpha").generation == 3
        with pytest.raises(LeaseError, match="generation 3, ours was 1"):
            a.renew()
        assert a2.renew().owner == "alpha"
    finally:
        a2.close()
