"""Pre-copy between sync points: once half-way, or every ``precopy_period_ms``."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from kemari_suite.checkpoint.shadow import TrackerCaps
from kemari_suite.checkpoint.syncpoint import (
    PRECOPY_MAX_BYTES_PER_PAGE,
    PRECOPY_MIN_PAGES,
    SyncPoints,
    precopy_schedule,
)
from kemari_suite.config import KemariConfig, ReplicationConfig, build
from kemari_suite.errors import ConfigError


def test_half_way_when_no_period() -> None:
    assert precopy_schedule(10.0, 1.0, 0) == [10.5]


def test_every_period_until_the_interval_ends() -> None:
    at = precopy_schedule(10.0, 0.1, 0.025)
    assert at == pytest.approx([10.025, 10.05, 10.075])
    # A period that divides the interval never schedules a pass at the sync point itself.
    assert precopy_schedule(0.0, 1.0, 0.25) == pytest.approx([0.25, 0.5, 0.75])
    assert precopy_schedule(0.0, 0.1, 0.2) == []


def test_a_period_under_10_ms_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="precopy_period_ms"):
        build(KemariConfig, {"replication": {"precopy_period_ms": 5}})
    assert ReplicationConfig().precopy_period_ms == 25


class _Triggers:
    """Fires ``fire_at`` (monotonic) with the reason "policy", else waits."""

    def __init__(self, fire_at: float | None) -> None:
        self.fire_at = fire_at

    async def wait_until(self, when: float) -> str | None:
        if self.fire_at is not None and self.fire_at <= when:
            await asyncio.sleep(max(0.0, self.fire_at - time.monotonic()))
            return "policy"
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        return None

    def clear(self) -> None:
        pass


def _syncs(
    period_ms: int, fire_after: float | None, bytes_per_page: int = 17
) -> tuple[SyncPoints, list[float]]:
    now = time.monotonic()
    agent: Any = SimpleNamespace(
        rcfg=ReplicationConfig(max_interval_ms=200, precopy_period_ms=period_ms),
        tracker=SimpleNamespace(
            caps=TrackerCaps(
                keeps_shadow=False,
                gives_previous=False,
                scan_during_capture=False,
                reset_needs_stop=False,
            )
        ),
        triggers=_Triggers(None if fire_after is None else now + fire_after),
        stopping=False,
    )
    syncs = SyncPoints(agent)
    syncs.last_sync = now
    syncs.last_dirty = PRECOPY_MIN_PAGES
    passes: list[float] = []

    async def counted() -> tuple[int, int]:
        passes.append(time.monotonic() - now)
        return 1000, 1000 * bytes_per_page

    syncs.precopy_pass = counted  # type: ignore[method-assign]
    return syncs, passes


def _session() -> Any:
    return SimpleNamespace(lost=asyncio.Event())


def test_passes_run_every_period_then_the_interval_fires() -> None:
    syncs, passes = _syncs(50, None)
    why = asyncio.run(syncs.wait_trigger(_session()))
    assert why == "interval"
    assert len(passes) == 3  # at 50, 100 and 150 ms of a 200 ms interval
    assert passes == sorted(passes) and passes[0] >= 0.049


def test_a_trigger_ends_the_passes() -> None:
    syncs, passes = _syncs(50, 0.075)
    why = asyncio.run(syncs.wait_trigger(_session()))
    assert why == "policy"
    assert len(passes) == 1


def test_no_period_means_one_pass_half_way() -> None:
    syncs, passes = _syncs(0, None)
    assert asyncio.run(syncs.wait_trigger(_session())) == "interval"
    assert len(passes) == 1 and passes[0] >= 0.099


def test_a_pass_of_incompressible_pages_is_the_epochs_last() -> None:
    syncs, passes = _syncs(50, None, bytes_per_page=PRECOPY_MAX_BYTES_PER_PAGE + 1)
    assert asyncio.run(syncs.wait_trigger(_session())) == "interval"
    assert len(passes) == 1, "passes went on resending incompressible pages"
    syncs, passes = _syncs(50, None, bytes_per_page=PRECOPY_MAX_BYTES_PER_PAGE)
    assert asyncio.run(syncs.wait_trigger(_session())) == "interval"
    assert len(passes) == 3
