"""DRBD for real, in two L1 hosts of the kernel lab: protocol C, a power loss of the
primary (SIGKILL of its QEMU), promotion of the survivor, the old primary back as
Secondary with a bitmap resync, and an offline check of both disks.

About a minute here (image cached; the first build adds about a minute); see
docs/kernel-lab.md for what it measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.drbdfailover import run_power_loss
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.pair import L1Pair, PairSpec

from .conftest import lab_id, needs_lab, print_consoles, slot

# The CI scenario is the KVM guest on DRBD (test_drbd_kvm_power_loss.py); this one
# runs in make e2e.
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(900)]


def test_drbd_survives_the_primarys_power_loss(
    klab_nested_image: HostImage, klab_dirs: tuple[Path, PathsConfig]
) -> None:
    lab, paths = klab_dirs
    pair = L1Pair(
        PairSpec(lab_id(0), slot=slot(0), data_disk_mib=64),
        klab_nested_image,
        lab_dir=lab,
        run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )
    try:
        pair.start()
        run = run_power_loss(pair)
    except BaseException:
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    assert run.module_version.startswith("8.4")
    assert run.sync_kib > 60_000  # the whole 64 MiB device was synced first
    assert run.data_intact and run.records_found == run.records_acked == 200
    assert run.fence_peer_calls >= 1
    assert run.offline_fsck_clean and run.offline_data_intact
    assert run.crash_resync_kib > 0  # the old primary came back and was resynced
    assert 0 < run.resync_kib < 16_000  # after a clean cut: only what the bitmap marked
    assert run.ok
