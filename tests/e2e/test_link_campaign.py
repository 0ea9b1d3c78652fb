"""The failover campaign's scenarios beyond the kill points: tampered frames, partitions
at every phase of a checkpoint, witness restarts, the secondary killed mid-apply.

Each test runs many trials on one pair (see :mod:`tests.e2e.linkcampaign` for the
scenarios and what makes a trial correct), records every trial, ends with a kill of the
primary checked by the client, and fails if any trial failed. ``KEMARI_KILLS_PER_POINT``
scales the trial counts (1 in CI, 20 in ``make e2e``); the tests without the ``slow``
mark are the sample ``make test`` runs.
"""

from __future__ import annotations

import os
import time
from itertools import cycle, islice

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.lab.pair import LabPair
from tests.conftest import needs_root
from tests.e2e.campaign import CounterWatcher
from tests.e2e.linkcampaign import (
    PHASES,
    TARGETS,
    Trial,
    TrialLog,
    campaign_options,
    inject_once,
    kill_primary_checked,
    partition_heal_once,
    partition_kill,
    relayed_pair,
    secondary_killed_mid_apply,
    watcher,
    witness_restart_once,
)
from tests.e2e.linkproxy import KINDS, Direction, Kind

pytestmark = [pytest.mark.e2e, needs_root]

KILLS = int(os.environ.get("KEMARI_KILLS_PER_POINT", "1"))
#: Tampered frames per (kind, direction) in the campaign: cheap, one pair for all.
INJECTIONS = 2 * KILLS
#: Partitions healed per phase (a pair's other phases in turn), before its kill.
HEALS = max(1, KILLS // 2)
WITNESS_RESTARTS = max(1, KILLS // 2)
SECONDARY_KILLS = max(1, KILLS // 4)


def _assert_all_ok(log: TrialLog) -> None:
    assert log.trials, "no trial ran"
    failed = log.failures()
    assert not failed, f"{len(failed)} of {len(log.trials)} trials failed:\n" + "\n".join(failed)


# --------------------------------------------------------------------------- injections


def _inject(
    lab_factory, base_config: KemariConfig, plan: list[tuple[Kind, Direction]], final: str
) -> None:
    targets = {d: cycle(t) for d, t in TARGETS.items()}
    with (
        TrialLog("inject") as log,
        relayed_pair(lab_factory(), base_config, campaign_options()) as (pair, proxy),
        watcher(pair) as watch,
    ):
        for kind, direction in plan:
            log.add(inject_once(pair, proxy, watch, kind, direction, next(targets[direction])))
        log.add(kill_primary_checked(pair, watch, final))
    _assert_all_ok(log)


def test_injection_sample(lab_factory, base_config: KemariConfig) -> None:
    """Every kind of tamper once toward the secondary, and a forged frame back."""
    plan: list[tuple[Kind, Direction]] = [(k, "p2s") for k in KINDS] + [("forged", "s2p")]
    _inject(lab_factory, base_config, plan, "inject-final-failover")


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["p2s", "s2p"])
@pytest.mark.parametrize("kind", KINDS)
def test_injection_campaign(
    kind: Kind, direction: Direction, lab_factory, base_config: KemariConfig
) -> None:
    _inject(lab_factory, base_config, [(kind, direction)] * INJECTIONS, "inject-final-failover")


# --------------------------------------------------------------------------- partitions


def _partitions(lab_factory, base_config: KemariConfig, heals: list[str], kill_at: str) -> None:
    with (
        TrialLog("partition") as log,
        relayed_pair(lab_factory(), base_config, campaign_options()) as (pair, proxy),
        watcher(pair) as watch,
    ):
        for phase in heals:
            log.add(partition_heal_once(pair, proxy, watch, phase))
        log.add(partition_kill(pair, proxy, watch, kill_at))
    _assert_all_ok(log)


def test_partition_sample(lab_factory, base_config: KemariConfig) -> None:
    """A cut healed while the secondary applies, and a cut before the ack, then a kill."""
    _partitions(lab_factory, base_config, ["secondary-apply", "window-stage"], "before-ack")


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_partition_at_phase(phase: str, lab_factory, base_config: KemariConfig) -> None:
    """Cuts healed at this phase and the following ones in turn, then a cut at this
    phase with the primary killed in it."""
    start = PHASES.index(phase)
    heals = list(islice(cycle(PHASES[start:] + PHASES[:start]), HEALS))
    _partitions(lab_factory, base_config, heals, phase)


# --------------------------------------------------------------------------- witness


def test_witness_restart_paired(lab_factory, base_config: KemariConfig) -> None:
    """The witness restarted while the pair is protected: the holder keeps its lease
    and stays protected; a failover afterwards still works."""
    with (
        TrialLog("witness-restart-paired") as log,
        relayed_pair(lab_factory(), base_config, campaign_options()) as (pair, _),
        watcher(pair) as watch,
    ):
        for _ in range(WITNESS_RESTARTS):
            log.add(witness_restart_once(pair, watch, "protected", "witness-restart-paired"))
        log.add(kill_primary_checked(pair, watch, "witness-restart-paired-final-failover"))
    _assert_all_ok(log)


def test_witness_restart_solo(lab_factory, base_config: KemariConfig) -> None:
    """The witness restarted while the primary runs alone: the holder keeps its lease;
    once the primary dies, the stale standby's takeover is refused (the witness kept
    the solo run on disk)."""
    with (
        TrialLog("witness-restart-solo") as log,
        relayed_pair(lab_factory(), base_config, campaign_options()) as (pair, proxy),
        watcher(pair) as watch,
    ):
        proxy.partition()
        pair.wait_state("primary", {"unprotected"}, 30)
        for _ in range(WITNESS_RESTARTS):
            log.add(witness_restart_once(pair, watch, "unprotected", "witness-restart-solo"))
        log.add(_stale_refused(pair, watch))
    _assert_all_ok(log)


def _stale_refused(pair: LabPair, watch: CounterWatcher) -> Trial:
    scenario = "witness-restart-solo-stale-refused"
    pair.kill("primary")
    # Twice the heartbeat timeout: the lease ran out, the standby asked and was refused.
    time.sleep(2 * pair.opts.heartbeat_timeout_ms / 1000)
    sec = pair.status("secondary")
    problems = []
    if sec["state"] != "standby":
        problems.append(f"the secondary is {sec['state']}")
    if "stale" not in str(sec.get("reason", "")):
        problems.append(f"not refused as stale: {sec.get('reason')!r}")
    if pair.qemu_pid("secondary") is not None:
        problems.append("a second guest was started")
    if watch.rewinds():
        problems.append("the client saw the counter go back")
    return Trial(scenario, not problems, "; ".join(problems), {"reason": sec.get("reason")})


# --------------------------------------------------------------------------- the secondary


def test_secondary_killed_mid_apply(lab_factory, base_config: KemariConfig) -> None:
    """The secondary dies while applying pages, again and again; the primary goes on
    unprotected and is protected again by a new secondary; the client never sees the
    counter go back, through a final failover too."""
    with (
        TrialLog("secondary-killed-mid-apply") as log,
        relayed_pair(lab_factory(), base_config, campaign_options()) as (pair, proxy),
        watcher(pair) as watch,
    ):
        for _ in range(SECONDARY_KILLS):
            log.add(secondary_killed_mid_apply(pair, proxy, watch))
        log.add(kill_primary_checked(pair, watch, "secondary-killed-mid-apply-final-failover"))
    _assert_all_ok(log)
