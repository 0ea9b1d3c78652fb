"""Kemari protecting a guest whose disk is a real iSCSI LUN (issue 14): a storage L1 serves
the LUN (LIO), both host L1s log in; ``kemari protect`` in l1a opens it through the
engine's shared backend with ``disk.fencing = "scsi-pr"`` (register, reserve), ``kemari
standby`` in l1b keeps the committed I/O logs only. l1a's L1 loses power (SIGKILL of its
QEMU); l1b wins the witness, preempts-and-aborts l1a's key, replays the logs and resumes
the guest, which has every acknowledged record. Then l1a's L1 comes back and logs in
again: the target refuses its write (fenced), and the LUN read offline in the storage L1
holds every acknowledged record.

About 6-10 minutes on a loaded machine (three L1s); the image (the nested one plus
open-iscsi and sg3-utils) is built on first use in about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.disk.scsipr import format_key, host_key
from kemari_suite.klab.image import HostImage, build_host_image
from kemari_suite.klab.iscsi import IscsiLab, IscsiLabSpec
from kemari_suite.klab.iscsidemo import (
    HOST_MEMORY_MIB,
    ISCSI_NESTED_PACKAGES,
    ISCSI_NESTED_SIZE_MIB,
    STORAGE_MEMORY_MIB,
    run_iscsi_protect_demo,
)
from kemari_suite.klab.share import VIRTIOFSD_PATHS
from kemari_suite.vm.image import GuestImage

from .conftest import lab_id, needs_lab, print_consoles, slot

pytestmark = [
    *needs_lab,
    pytest.mark.slow,
    pytest.mark.timeout(2400),
    pytest.mark.skipif(
        not any(Path(p).exists() for p in VIRTIOFSD_PATHS), reason="needs virtiofsd"
    ),
]

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def klab_iscsi_nested_image(base_config: KemariConfig) -> HostImage:
    return build_host_image(
        base_config.paths.cache_dir, packages=ISCSI_NESTED_PACKAGES, size_mib=ISCSI_NESTED_SIZE_MIB
    )


def test_the_standby_resumes_the_guest_on_the_lun_and_the_old_primary_is_fenced(
    klab_iscsi_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    lab_dir, paths = klab_dirs
    spec = IscsiLabSpec(
        lab_id(1),
        slot=slot(1),
        memory_mib=HOST_MEMORY_MIB,
        storage_memory_mib=STORAGE_MEMORY_MIB,
        share=str(CHECKOUT),
        lan=True,
    )
    lab = IscsiLab(
        spec, klab_iscsi_nested_image, lab_dir=lab_dir, run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )  # fmt: skip
    try:
        lab.start()
        run = run_iscsi_protect_demo(
            lab,
            guest_image,
            tree=str(CHECKOUT),
            work=lab_dir / "engine",
            host_paths=paths,
            offline_check=True,
        )
    except BaseException:
        print_consoles(lab)
        raise
    finally:
        lab.stop()
    print(json.dumps(run.as_dict(), indent=1))
    old, new = format_key(host_key("l1a")), format_key(host_key("l1b"))
    assert run.disk_backend == "iscsi"
    assert run.protected and run.resumed and run.wrote_after_resume
    assert run.records_acked >= 30 and run.records_lost == 0
    # Offline, in the storage L1: every acknowledged record on the LUN.
    assert run.records_offline is not None and run.records_offline >= run.records_acked
    # The primary alone registered and held the LUN; after the failover the standby does.
    assert run.reservation is not None
    assert run.reservation["keys_before"] == [old] and run.reservation["holder_before"] == old
    assert run.reservation["keys_after"] == [new] and run.reservation["holder_after"] == new
    # The old primary, back from its power loss and logged in again, is refused.
    assert run.fence is not None
    assert run.fence["write_rc"] != 0 and run.fence["conflicts_logged"] >= 1
    assert run.fence["old_key_reserve_rc"] == 24
    assert run.fenced is True
    assert run.ok
