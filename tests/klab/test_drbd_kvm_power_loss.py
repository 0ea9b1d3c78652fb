"""The kernel lab's CI scenario: a KVM guest (L2, nested SVM) writes acknowledged
O_DSYNC records on DRBD (protocol C); its L1 host loses power mid-stream (SIGKILL of
the L1's QEMU); the peer L1 promotes, and the offline check of its disk finds every
acknowledged record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.kvmrecords import run_kvm_power_loss
from kemari_suite.klab.pair import L1Pair, PairSpec
from kemari_suite.vm.image import GuestImage

from .conftest import lab_id, needs_lab, print_consoles, slot

pytestmark = [*needs_lab, pytest.mark.timeout(900)]


def test_no_acknowledged_record_is_lost_when_the_kvm_host_loses_power(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    lab, paths = klab_dirs
    pair = L1Pair(
        PairSpec(lab_id(2), slot=slot(2), data_disk_mib=64),
        klab_nested_image,
        lab_dir=lab,
        run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )
    try:
        pair.start()
        run = run_kvm_power_loss(pair, guest_image)
    except BaseException:
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    assert run.accel == "kvm"
    assert run.records_acked >= 100
    assert run.records_lost == 0
    assert run.fence_peer_calls >= 1
    assert run.ok
