"""Kemari's own engine in the kernel lab: ``kemari standby`` in one L1, ``kemari protect``
in the other, the guest (L2) under nested KVM writing records acknowledged over TCP
through output commit; the primary L1 loses power (SIGKILL of its QEMU) and the standby
resumes the guest, which still has every acknowledged record and takes a new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.pair import L1Pair, PairSpec
from kemari_suite.klab.protectdemo import run_protect_demo
from kemari_suite.vm.image import GuestImage

from .conftest import lab_id, needs_lab, slot

# A long scenario (about 5-10 minutes on a loaded machine): `make e2e`, not `make test`.
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(1800)]

CHECKOUT = Path(__file__).resolve().parents[2]


def test_the_standby_l1_resumes_the_protected_kvm_guest_after_a_power_loss(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    lab, paths = klab_dirs
    pair = L1Pair(
        PairSpec(lab_id(3), slot=slot(3), memory_mib=1024, share=str(CHECKOUT), lan=True),
        klab_nested_image,
        lab_dir=lab,
        run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )
    try:
        pair.start()
        run = run_protect_demo(
            pair,
            guest_image,
            tree=str(CHECKOUT),
            work=lab / "engine",
            host_paths=paths,
        )
    except BaseException:
        for h in pair.hosts:
            if h.alive():
                for role in ("primary", "secondary"):
                    log = f"/run/kemari-klab-{role}.log"
                    out = h.run(f"tail -c 3000 {log} 2>/dev/null", check=False).stdout
                    print(f"--- {h.spec.host} {role}\n{out}")
            print(f"--- {h.spec.host} console\n{h.console_tail(30) or h.saved_console()[-3000:]}")
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    assert run.protected
    assert run.accel in ("kvm", "tcg")
    assert run.records_acked >= 30
    assert run.records_lost == 0
    assert run.resumed
    assert run.wrote_after_resume
    assert run.ok
