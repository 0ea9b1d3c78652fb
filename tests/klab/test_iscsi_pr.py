"""Shared storage as a real LUN, fenced by SCSI-3 persistent reservations.

A storage L1 exports an iSCSI LUN (LIO); l1a and l1b log in with open-iscsi and register
their keys; l1a holds the reservation ("write exclusive, registrants only") and writes;
l1b preempts-and-aborts l1a's key. Then the target refuses l1a's write (RESERVATION
CONFLICT), accepts l1b's, and l1b reads back what l1a wrote before the preempt.

Then the same through the engine's own shared backend (``disk.fencing = "scsi-pr"``,
``config.load`` -> ``open_backend`` -> ``SharedDiskBackend``) run in the host L1s from
this tree (virtiofs): the stale writer's next write is refused and it knows it is fenced.

About 20-30 s each here once booted (three L1s of 512 MiB); the image (its own package
list, ``ISCSI_PACKAGES``) is built on first use in about 50 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.disk.scsipr import SG_RESERVATION_CONFLICT, format_key, host_key
from kemari_suite.klab.image import HostImage, build_host_image
from kemari_suite.klab.iscsi import ISCSI_PACKAGES, IscsiLab, IscsiLabSpec, run_pr_fencing
from kemari_suite.klab.iscsifence import run_backend_fencing
from kemari_suite.klab.share import VIRTIOFSD_PATHS

from .conftest import lab_id, needs_lab, print_consoles, slot

# Kernel-lab scenarios beyond the one of `make test` run in `make e2e` (issue 14, CI).
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(900)]

CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def klab_iscsi_image(base_config: KemariConfig) -> HostImage:
    """The L1 image with open-iscsi and sg3-utils (cached by its inputs like the others)."""
    return build_host_image(base_config.paths.cache_dir, packages=ISCSI_PACKAGES)


def make_lab(image: HostImage, dirs: tuple[Path, PathsConfig], share: str = "") -> IscsiLab:
    lab_dir, paths = dirs
    return IscsiLab(
        IscsiLabSpec(lab_id(2), slot=slot(2), share=share),
        image,
        lab_dir=lab_dir,
        run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )


def test_preempted_host_is_fenced_by_the_target(
    klab_iscsi_image: HostImage, klab_dirs: tuple[Path, PathsConfig]
) -> None:
    lab = make_lab(klab_iscsi_image, klab_dirs)
    try:
        lab.start()
        run = run_pr_fencing(lab)
    except BaseException:
        print_consoles(lab)
        raise
    finally:
        lab.stop()
    print(json.dumps(run.as_dict(), indent=1))
    key_a, key_b = run.keys
    # Before: both registered, l1a holds "write exclusive, registrants only".
    assert set(run.keys_before) == {key_a, key_b}
    assert run.holder_before == key_a and run.type_before == 5
    assert run.b_reserve_rc == SG_RESERVATION_CONFLICT  # a second holder is refused
    # After l1b's preempt-and-abort: l1a's key is gone, l1b holds the reservation.
    assert run.keys_after == (key_b,) and run.holder_after == key_b
    # The target refuses l1a's write; the kernel logs the reservation conflict.
    assert run.a_write_rc != 0 and run.a_conflicts_logged >= 1
    assert run.a_read_ok  # type 5 fences writes only
    # The engine's write path (buffered pwrite, then fdatasync) learns it at the flush.
    assert run.a_buffered_write.startswith("fdatasync: errno 5")
    # l1b writes, and reads back what l1a wrote before the preempt.
    assert run.b_write_ok
    assert run.b_read_sha256 == run.data_sha256
    assert run.ok


@pytest.mark.skipif(not any(Path(p).exists() for p in VIRTIOFSD_PATHS), reason="needs virtiofsd")
def test_shared_backend_with_scsi_pr_fences_the_stale_writer(
    klab_iscsi_image: HostImage, klab_dirs: tuple[Path, PathsConfig]
) -> None:
    lab = make_lab(klab_iscsi_image, klab_dirs, share=str(CHECKOUT))
    try:
        lab.start()
        run = run_backend_fencing(lab, str(CHECKOUT))
    except BaseException:
        print_consoles(lab)
        raise
    finally:
        lab.stop()
    print(json.dumps(run.as_dict(), indent=1))
    first, last = run.writer[0], run.writer[-1]
    assert first["role"] == "primary" and first["status"]["scsi_pr_key"] == format_key(
        host_key("l1a")
    )
    # l1b's promote at failover preempted l1a's key and read what l1a wrote.
    assert run.takeover["role"] == "primary"
    assert run.takeover["read_sha256"] == first["sha256"]
    assert run.keys_after == (run.takeover["status"]["scsi_pr_key"],)
    # l1a, still "primary" in its own eyes, writes again: refused, and it says why.
    assert last["phase"] == "stale write" and last["refused"] is True
    assert "we are fenced" in last["error"] and last["role"] == "secondary"
    assert run.ok
