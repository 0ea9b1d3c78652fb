"""Sync policies on a fake clock, and the asyncio scheduler around them."""

from __future__ import annotations

import asyncio

import pytest

from kemari_suite.errors import ConfigError
from kemari_suite.tap.events import IOEvent
from kemari_suite.tap.policy import (
    AdaptivePolicy,
    Due,
    KemariPolicy,
    OutputPolicy,
    RemusPolicy,
    SyncPolicy,
    SyncScheduler,
    make_policy,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sync(policy: SyncPolicy, epoch: int, start: float, end: float) -> None:
    policy.sync_started(epoch, start)
    assert policy.next_sync() is None  # nothing while one is in flight
    policy.sync_finished(end)


def test_kemari_syncs_at_each_event_and_coalesces_during_a_sync() -> None:
    pol = KemariPolicy()
    assert pol.next_sync() is None  # no event, no interval: nothing to do
    pol.event(IOEvent.NET, 1, now=1.0)
    assert pol.next_sync() == Due(1.0, "net")
    pol.event(IOEvent.WRITE, 1, now=1.5)
    assert pol.next_sync() == Due(1.0, "net")  # the first event decides
    pol.sync_started(1, 2.0)
    # During the sync: events of the closed epoch (QEMU's stop-time flush) are covered;
    # events of the new epoch are held back until the sync ends, then one sync for all.
    pol.event(IOEvent.FLUSH, 1, now=2.1)
    assert pol.covered_events == 1
    pol.event(IOEvent.NET, 2, now=2.2)
    pol.event(IOEvent.NET, 2, now=2.3)
    assert pol.next_sync() is None
    pol.sync_finished(2.5)
    assert pol.next_sync() == Due(2.2, "net")
    assert pol.pending_events == 2
    sync(pol, 2, 2.5, 2.6)
    assert pol.next_sync() is None
    assert pol.syncs == 2 and pol.events == 5


def test_kemari_max_interval_and_demand() -> None:
    pol = KemariPolicy(max_interval=0.1)
    assert pol.next_sync() == Due(float("-inf"), "interval")  # never synced: now
    sync(pol, 1, 5.0, 5.02)
    assert pol.next_sync() == Due(5.1, "interval")
    pol.demand(5.03)
    assert pol.next_sync() == Due(5.03, "demand")
    sync(pol, 2, 5.03, 5.04)
    assert pol.next_sync() == Due(5.13, "interval")
    with pytest.raises(ValueError):
        KemariPolicy(max_interval=0)


def test_kemari_event_triggers_can_be_narrowed() -> None:
    pol = KemariPolicy(triggers=frozenset({IOEvent.NET}))
    pol.event(IOEvent.WRITE, 1, 1.0)
    assert pol.next_sync() is None
    pol.event("net", 1, 2.0)
    assert pol.next_sync() == Due(2.0, "net")


def test_remus_fixed_epochs_ignore_events() -> None:
    pol = RemusPolicy(0.025)
    assert pol.next_sync() is not None and pol.next_sync().at == float("-inf")  # type: ignore[union-attr]
    sync(pol, 1, 10.0, 10.004)
    pol.event(IOEvent.NET, 2, 10.005)
    assert pol.next_sync() == Due(10.025, "interval")
    # A sync slower than the interval: the next one is due at once.
    sync(pol, 2, 10.025, 10.07)
    assert pol.next_sync() == Due(10.05, "interval")
    with pytest.raises(ValueError):
        RemusPolicy(0)


def test_adaptive_spaces_event_syncs_and_bounds_quiet_spells() -> None:
    pol = AdaptivePolicy(min_spacing=0.005, max_interval=0.1)
    sync(pol, 1, 1.000, 1.001)
    assert pol.next_sync() == Due(1.1, "interval")
    pol.event(IOEvent.NET, 2, 1.002)
    assert pol.next_sync() == Due(1.005, "net")  # held to the minimum spacing
    sync(pol, 2, 1.005, 1.006)
    pol.event(IOEvent.WRITE, 3, 1.050)
    assert pol.next_sync() == Due(1.050, "write")  # spacing already satisfied
    pol.demand(1.049)
    assert pol.next_sync() == Due(1.049, "demand")
    with pytest.raises(ValueError):
        AdaptivePolicy(min_spacing=-1, max_interval=1)


def test_make_policy_from_config_values() -> None:
    pol = make_policy("remus", max_interval_ms=100, remus_interval_ms=25)
    assert isinstance(pol, RemusPolicy) and pol.interval == 0.025 and pol.max_interval == 0.1
    pol = make_policy("adaptive", max_interval_ms=100, adaptive_min_spacing_ms=5)
    assert isinstance(pol, AdaptivePolicy) and pol.min_spacing == 0.005
    assert isinstance(make_policy("kemari", max_interval_ms=100), KemariPolicy)
    out = make_policy("output", max_interval_ms=100)
    assert isinstance(out, OutputPolicy) and out.triggers == {IOEvent.NET}
    with pytest.raises(ConfigError, match="unknown sync policy"):
        make_policy("colo", max_interval_ms=100)
    with pytest.raises(ConfigError):
        make_policy("remus", max_interval_ms=100, remus_interval_ms=0)


def test_output_policy_syncs_at_frames_and_lets_disk_writes_ride_the_epoch() -> None:
    pol = OutputPolicy(max_interval=1.0, log_limit=1000)
    pol.sync_started(0, 0.0)
    pol.sync_finished(0.01)
    pol.event(IOEvent.WRITE, 1, now=0.1, logged=400)
    pol.event(IOEvent.FLUSH, 1, now=0.2)
    assert pol.next_sync() == Due(1.0, "interval")  # no sync point of their own
    pol.event(IOEvent.NET, 1, now=0.3)
    assert pol.next_sync() == Due(0.3, "net")
    sync(pol, 1, 0.3, 0.31)
    # The log bound: a write that takes the open epoch's log to the limit asks for one.
    pol.event(IOEvent.WRITE, 2, now=0.4, logged=999)
    assert pol.next_sync() == Due(1.3, "interval")
    pol.event(IOEvent.WRITE, 2, now=0.5, logged=1000)
    assert pol.next_sync() == Due(0.5, "log-size")
    sync(pol, 2, 0.5, 0.52)
    assert pol.next_sync() == Due(1.5, "interval")


def test_the_log_bound_holds_for_every_policy() -> None:
    for name in ("kemari", "remus", "adaptive", "output"):
        pol = make_policy(name, max_interval_ms=1000, epoch_log_limit_mib=1)
        assert pol.log_limit == 1 << 20
        pol.sync_started(0, 0.0)
        pol.sync_finished(0.0)
        pol.triggers = frozenset()  # only the bound is left
        pol.event(IOEvent.WRITE, 1, now=0.01, logged=(1 << 20) - 1)
        assert pol.pending_since is None, name
        pol.event(IOEvent.WRITE, 1, now=0.02, logged=1 << 20)
        assert pol.next_sync() == Due(0.02, "log-size"), name
    with pytest.raises(ConfigError, match="log_limit"):
        make_policy("output", max_interval_ms=100, epoch_log_limit_mib=0)


def test_scheduler_wakes_on_events_and_deadlines() -> None:
    async def go() -> None:
        sched = SyncScheduler(KemariPolicy(max_interval=0.2))
        sched.started(0)
        sched.finished()
        waiter = asyncio.ensure_future(sched.wait_due())
        await asyncio.sleep(0.02)
        assert not waiter.done()
        sched.notify(IOEvent.NET, 1)
        assert await asyncio.wait_for(waiter, 1) == "net"
        sched.started(1)
        sched.notify(IOEvent.NET, 2)  # during the sync: waits for finished()
        waiter = asyncio.ensure_future(sched.wait_due())
        await asyncio.sleep(0.02)
        assert not waiter.done()
        sched.finished()
        assert await asyncio.wait_for(waiter, 1) == "net"
        sched.started(2)
        sched.finished()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(sched.wait_due(), 1) == "interval"
        assert 0.15 < loop.time() - t0 < 0.5
        sched.started(3)
        assert await sched.wait_due(timeout=0.05) is None
        sched.finished()
        sched.demand()
        assert await sched.wait_due() == "demand"

    asyncio.run(go())
