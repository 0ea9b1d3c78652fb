"""The scenarios' verdicts, on paper: what makes a run ``ok``."""

from __future__ import annotations

import dataclasses

from kemari_suite.klab.drbdfailover import PowerLossRun
from kemari_suite.klab.kvmrecords import KvmPowerLossRun

GOOD = PowerLossRun(
    module_version="8.4.11",
    boot_s=(7.0, 8.0),
    initial_sync_s=18.0,
    sync_kib=65496,
    peer_noticed_s=15.0,
    promote_s=0.5,
    fence_peer_calls=1,
    data_sha256="ab",
    data_intact=True,
    records_acked=200,
    records_found=200,
    offline_fsck_clean=True,
    offline_data_intact=True,
    crash_resync_kib=65496,
    resync_kib=4136,
    total_s=85.0,
)


def test_a_power_loss_run_is_ok_only_when_every_check_holds() -> None:
    assert GOOD.ok and GOOD.as_dict()["ok"] is True
    for change in (
        {"data_intact": False},
        {"records_found": 199},
        {"fence_peer_calls": 0},
        {"offline_fsck_clean": False},
        {"offline_data_intact": False},
        {"resync_kib": 65496},  # a full resync after a clean cut: the bitmap was lost
        {"resync_kib": -1},
    ):
        assert not dataclasses.replace(GOOD, **change).ok, change  # type: ignore[arg-type]


def test_records_found_beyond_the_acknowledged_ones_are_not_a_loss() -> None:
    run = KvmPowerLossRun("kvm", 8.0, 120, 122, 14.0, 0.7, 1, 80.0)
    assert run.records_lost == 0 and run.ok
    lost = dataclasses.replace(run, records_found=119)
    assert lost.records_lost == 1 and not lost.ok
    assert not dataclasses.replace(run, records_acked=0, records_found=0).ok
    assert lost.as_dict()["records_lost"] == 1
