"""Kemari's own engine in the kernel lab: ``kemari standby`` in one L1, ``kemari protect``
in the other, the guest (L2) under nested KVM writing records acknowledged over TCP
through output commit; the primary L1 loses power (SIGKILL of its QEMU) and the standby
resumes the guest, which still has every acknowledged record and takes a new one.

With the DRBD disk (8.4 in the L1s), the standby also promotes DRBD at the takeover:
the connection to the dead primary dropped first when DRBD still counts it, the fence-
peer handler (the engine's ``kemari fence-peer``, asking the witness) saying "peer
fenced"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.protectdemo import ProtectRun, run_protect_demo
from kemari_suite.vm.image import GuestImage

from .conftest import CHECKOUT, engine_pair, needs_lab, print_consoles

# A long scenario (about 5-10 minutes on a loaded machine): `make e2e`, not `make test`.
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(
    image: HostImage,
    guest: GuestImage,
    dirs: tuple[Path, PathsConfig],
    n: int,
    disk_backend: str = "builtin",
) -> ProtectRun:
    lab, paths = dirs
    pair = engine_pair(image, dirs, n, data_disk_mib=64 if disk_backend == "drbd" else 0)
    try:
        pair.start()
        run = run_protect_demo(
            pair,
            guest,
            tree=str(CHECKOUT),
            work=lab / "engine",
            host_paths=paths,
            disk_backend=disk_backend,
        )
    except BaseException:
        for h in pair.hosts:
            if h.alive():
                for role in ("primary", "secondary"):
                    log = f"/run/kemari-klab-{role}.log"
                    out = h.run(f"tail -c 3000 {log} 2>/dev/null", check=False).stdout
                    print(f"--- {h.spec.host} {role}\n{out}")
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    return run


def test_the_standby_l1_resumes_the_protected_kvm_guest_after_a_power_loss(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    run = _run(klab_nested_image, guest_image, klab_dirs, 3)
    assert run.protected
    assert run.accel in ("kvm", "tcg")
    assert run.records_acked >= 30
    assert run.records_lost == 0
    assert run.resumed
    assert run.wrote_after_resume
    assert run.ok


def test_the_standby_l1_promotes_drbd_and_resumes_after_a_power_loss(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    run = _run(klab_nested_image, guest_image, klab_dirs, 2, disk_backend="drbd")
    assert run.disk_backend == "drbd"
    assert run.protected and run.resumed and run.wrote_after_resume
    assert run.records_acked >= 30
    assert run.records_lost == 0
    assert run.promoted is True
    # l1b's DRBD lost the killed primary: by itself ("network") or by the engine's
    # disconnect at the takeover; never still connected.
    assert run.drbd_peer_lost in ("network", "disconnect")
    # DRBD asked the engine's own handler, which found the lease ours: "peer fenced".
    assert run.fence_peer_calls is not None and run.fence_peer_calls >= 1
    assert run.fence_peer_exits is not None and 7 in run.fence_peer_exits
    assert run.ok
