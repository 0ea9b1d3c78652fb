"""Sync policies: given the taps' I/O events and the clock, when to start a sync point.

Four policies, one small pure class each (no I/O, no clock of their own: every call
gets ``now``, in seconds of a monotonic clock)::

    output    the default: sync where output becomes visible, at each frame the guest
              sends; disk writes and flushes ride the open epoch (they reach the disk
              only after its commit, and nothing outside saw their acknowledgement)
    kemari    the seed's rule: sync at each outbound I/O event, disk included; events
              that arrive while a sync is in flight are coalesced into one sync after it
    remus     fixed epochs: a sync every ``interval`` seconds (start to start); events
              do not matter
    adaptive  event-driven like kemari, but never two syncs closer than
              ``min_spacing``; without events, one after ``max_interval``

Every policy also honours ``max_interval`` (a sync point at least that often, measured
from the start of the previous one), ``log_limit`` (a sync point once the open epoch has
logged that many bytes of disk writes: events report the bytes logged so far) and
on-demand requests (:meth:`SyncPolicy.demand`).
At most one sync is in flight: :meth:`next_sync` says nothing while one runs.

Events carry their epoch. A sync point covers every event of the epoch it closes
(``sync_started(epoch)``), including those that arrive after it started: QEMU's own
``stop`` flushes the disk inside the stopped window, and that flush must not ask for
another sync point. Only events of a later epoch are pending.

The protocol between the primary and a policy::

    policy.event(kind, epoch, now, logged)  each tap event (through SyncScheduler.notify)
    policy.next_sync()                   -> Due(at, reason) or None
    policy.sync_started(epoch, now)      the primary closes ``epoch`` (its epoch switch)
    policy.sync_finished(now)            acknowledged, or failed

:class:`SyncScheduler` is the asyncio driver around a policy for the primary's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kemari_suite.errors import ConfigError
from kemari_suite.tap.events import IOEvent

ALL_EVENTS: frozenset[IOEvent] = frozenset(IOEvent)


@dataclass(frozen=True)
class Due:
    """The next sync point should start at ``at`` (monotonic seconds; may be in the past,
    meaning now) because of ``reason`` ("net", "write", "flush", "interval", "demand")."""

    at: float
    reason: str


class SyncPolicy:
    """State shared by every policy; subclasses decide :meth:`next_sync`."""

    name = "base"

    def __init__(
        self,
        *,
        max_interval: float | None = None,
        triggers: frozenset[IOEvent] = ALL_EVENTS,
        log_limit: int | None = None,
    ) -> None:
        if max_interval is not None and max_interval <= 0:
            raise ValueError(f"max_interval must be positive, not {max_interval}")
        if log_limit is not None and log_limit <= 0:
            raise ValueError(f"log_limit must be positive, not {log_limit}")
        self.max_interval = max_interval
        self.triggers = triggers
        self.log_limit = log_limit
        self.in_flight = False
        #: The last epoch a sync point closed; its events are covered.
        self.closed_through = -1
        self.last_start: float | None = None
        self.last_finish: float | None = None
        #: Time of the first uncovered trigger event, its kind, and how many there are.
        self.pending_since: float | None = None
        self.pending_reason = ""
        self.pending_events = 0
        self._pending_max_epoch = -1
        self.demanded_at: float | None = None
        # Counters.
        self.events = 0
        self.covered_events = 0
        self.syncs = 0

    def event(self, kind: IOEvent | str, epoch: int, now: float, logged: int = 0) -> None:
        """A tap saw outbound I/O of ``kind`` in ``epoch``, which has now logged
        ``logged`` bytes of disk writes."""
        self.events += 1
        kind = IOEvent(kind)
        if epoch <= self.closed_through:
            self.covered_events += 1
            return
        reason = kind.value
        if kind not in self.triggers:
            if self.log_limit is None or logged < self.log_limit:
                return
            reason = "log-size"
        if self.pending_since is None:
            self.pending_since = now
            self.pending_reason = reason
        self.pending_events += 1
        self._pending_max_epoch = max(self._pending_max_epoch, epoch)

    def demand(self, now: float) -> None:
        """Someone asked for a sync point (operator command, API)."""
        if self.demanded_at is None:
            self.demanded_at = now

    def sync_started(self, epoch: int, now: float) -> None:
        """A sync point closed ``epoch``: it covers every event of epochs ``<= epoch``."""
        self.in_flight = True
        self.syncs += 1
        self.closed_through = max(self.closed_through, epoch)
        self.last_start = now
        self.demanded_at = None
        if self._pending_max_epoch <= self.closed_through:
            self.pending_since = None
            self.pending_reason = ""
            self.pending_events = 0

    def sync_finished(self, now: float) -> None:
        """The sync point in flight ended (acknowledged or failed)."""
        self.in_flight = False
        self.last_finish = now

    def _interval_due(self) -> Due | None:
        if self.max_interval is None:
            return None
        base = self.last_start if self.last_start is not None else -math.inf
        return Due(base + self.max_interval, "interval")

    def _earliest(self, *dues: Due | None) -> Due | None:
        real = [d for d in dues if d is not None]
        return min(real, key=lambda d: d.at) if real else None

    def next_sync(self) -> Due | None:
        """When the next sync point should start, or None (one is in flight, or nothing
        asks for one)."""
        raise NotImplementedError


class KemariPolicy(SyncPolicy):
    """Sync at each outbound I/O event, coalescing those that arrive during a sync."""

    name = "kemari"

    def next_sync(self) -> Due | None:
        if self.in_flight:
            return None
        demand = Due(self.demanded_at, "demand") if self.demanded_at is not None else None
        event = (
            Due(self.pending_since, self.pending_reason) if self.pending_since is not None else None
        )
        return self._earliest(demand, event, self._interval_due())


class OutputPolicy(KemariPolicy):
    """Sync at each frame the guest sends (and at the log and interval bounds).

    A disk write needs no sync point of its own: the block tap acknowledges it to the
    guest, holds it in the open epoch and applies it only after that epoch's commit. If
    the primary dies first, the standby resumes from a state in which the guest never
    saw the acknowledgement, and nothing outside can have depended on it, because the
    frames the guest sent after it are held until the same commit.
    """

    name = "output"

    def __init__(self, *, max_interval: float | None = None, log_limit: int | None = None) -> None:
        super().__init__(
            max_interval=max_interval, triggers=frozenset({IOEvent.NET}), log_limit=log_limit
        )


class RemusPolicy(SyncPolicy):
    """Fixed epochs of ``interval`` seconds, start to start."""

    name = "remus"

    def __init__(
        self, interval: float, *, max_interval: float | None = None, log_limit: int | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        super().__init__(max_interval=max_interval, triggers=frozenset(), log_limit=log_limit)
        self.interval = interval

    def next_sync(self) -> Due | None:
        if self.in_flight:
            return None
        demand = Due(self.demanded_at, "demand") if self.demanded_at is not None else None
        base = self.last_start if self.last_start is not None else -math.inf
        # Events do not matter here, the log bound does.
        full = Due(self.pending_since, "log-size") if self.pending_since is not None else None
        return self._earliest(
            demand, full, Due(base + self.interval, "interval"), self._interval_due()
        )


class AdaptivePolicy(SyncPolicy):
    """Event-driven, but at least ``min_spacing`` seconds between sync starts; and at most
    ``max_interval`` seconds without one."""

    name = "adaptive"

    def __init__(
        self,
        *,
        min_spacing: float,
        max_interval: float,
        triggers: frozenset[IOEvent] = ALL_EVENTS,
        log_limit: int | None = None,
    ) -> None:
        if min_spacing < 0:
            raise ValueError(f"min_spacing must not be negative, not {min_spacing}")
        super().__init__(max_interval=max_interval, triggers=triggers, log_limit=log_limit)
        self.min_spacing = min_spacing

    def next_sync(self) -> Due | None:
        if self.in_flight:
            return None
        demand = Due(self.demanded_at, "demand") if self.demanded_at is not None else None
        event = None
        if self.pending_since is not None:
            earliest = (
                self.last_start + self.min_spacing if self.last_start is not None else -math.inf
            )
            event = Due(max(self.pending_since, earliest), self.pending_reason)
        return self._earliest(demand, event, self._interval_due())


def make_policy(
    name: str,
    *,
    max_interval_ms: int,
    remus_interval_ms: int = 25,
    adaptive_min_spacing_ms: int = 5,
    epoch_log_limit_mib: int | None = None,
) -> SyncPolicy:
    """A policy by its config name (``tap.policy``; intervals and the log bound from
    ``tap.*`` and ``replication.max_interval_ms``).

    Raises:
        ConfigError: unknown name or a non-positive interval or bound.
    """
    bounds: dict[str, Any] = {
        "max_interval": max_interval_ms / 1000,
        "log_limit": epoch_log_limit_mib << 20 if epoch_log_limit_mib is not None else None,
    }
    try:
        if name == "output":
            return OutputPolicy(**bounds)
        if name == "kemari":
            return KemariPolicy(**bounds)
        if name == "remus":
            return RemusPolicy(remus_interval_ms / 1000, **bounds)
        if name == "adaptive":
            return AdaptivePolicy(min_spacing=adaptive_min_spacing_ms / 1000, **bounds)
    except ValueError as err:
        raise ConfigError(str(err), key="tap") from err
    raise ConfigError(
        f"unknown sync policy {name!r} (output, kemari, remus, adaptive)", key="tap.policy"
    )


class SyncScheduler:
    """Asyncio driver of a policy: the taps' event sink and the primary's trigger wait.

    ::

        sched = SyncScheduler(policy)
        BlockTap(..., on_event=sched.notify); FrameProxy(..., on_event=sched.notify)
        while protected:
            reason = await sched.wait_due()
            ... stop ... sched.started(epoch) at the epoch switch ... ack ...
            sched.finished()
    """

    def __init__(self, policy: SyncPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._wake = asyncio.Event()

    def notify(self, kind: IOEvent, epoch: int, logged: int = 0) -> None:
        """The taps' ``on_event`` (``logged``: the bytes of disk writes ``epoch`` logged
        so far, for the policy's log bound)."""
        self.policy.event(kind, epoch, self.clock(), logged)
        self._wake.set()

    def demand(self) -> None:
        self.policy.demand(self.clock())
        self._wake.set()

    def started(self, epoch: int) -> None:
        self.policy.sync_started(epoch, self.clock())

    def finished(self) -> None:
        self.policy.sync_finished(self.clock())
        self._wake.set()

    def wake(self) -> None:
        """Make :meth:`wait_due` look again (e.g. the agent is stopping)."""
        self._wake.set()

    async def wait_due(self, *, timeout: float | None = None) -> str | None:
        """Wait until the policy wants a sync point; return its reason (None on timeout)."""
        deadline = None if timeout is None else self.clock() + timeout
        while True:
            due = self.policy.next_sync()
            now = self.clock()
            if due is not None and due.at <= now:
                return due.reason
            waits = [t for t in (due.at if due else None, deadline) if t is not None]
            wait = max(0.0, min(waits) - now) if waits else None
            if deadline is not None and now >= deadline:
                return None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


__all__ = [
    "ALL_EVENTS",
    "AdaptivePolicy",
    "Due",
    "KemariPolicy",
    "OutputPolicy",
    "RemusPolicy",
    "SyncPolicy",
    "SyncScheduler",
    "make_policy",
]
