"""Kernel-lab fixtures: the L1 image (built once per session) and pairs torn down always."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.klab.image import HostImage, build_host_image
from kemari_suite.klab.l2 import NESTED_PACKAGES, NESTED_SIZE_MIB
from kemari_suite.klab.pair import L1Group, L1Pair, PairSpec
from kemari_suite.vm.buildkit import locked

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_NUMBER = int("".join(c for c in WORKER if c.isdigit()) or 0)


def slot(n: int) -> int:
    """A link slot for this worker: workers never share UDP ports (4 slots each)."""
    return 100 + 4 * (_NUMBER % 25) + n


def lab_id(n: int) -> str:
    return f"t{_NUMBER}{n}"


needs_lab = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the kernel lab needs root (debootstrap)"),
    pytest.mark.skipif(
        not (shutil.which("debootstrap") and shutil.which("qemu-system-x86_64")),
        reason="needs debootstrap and qemu-system-x86",
    ),
]


@pytest.fixture(scope="session")
def klab_nested_image(base_config: KemariConfig) -> HostImage:
    """The L1 image with QEMU inside (for L2 guests), from the shared cache; built on
    first use (about 80 s). Every L1 test boots this one, so CI builds one image."""
    return build_host_image(
        base_config.paths.cache_dir, packages=NESTED_PACKAGES, size_mib=NESTED_SIZE_MIB
    )


@pytest.fixture
def klab_dirs(
    tmp_path: Path, run_paths: PathsConfig, base_config: KemariConfig
) -> Iterator[tuple[Path, PathsConfig]]:
    """(lab folder, paths) for one test; the lab folder (overlays, disks) is removed.

    Holds the kernel lab's test lock meanwhile: one L1 test at a time on this machine,
    whatever the number of xdist workers, so never more than two L1s (each a busy TCG
    vCPU) run at once.
    """
    lab = tmp_path / "lab"
    lab.mkdir()
    with locked(base_config.paths.cache_dir / "klab" / ".tests.lock"):
        yield lab, run_paths
    shutil.rmtree(lab, ignore_errors=True)


#: The checkout the L1s mount (the suite's tree, shared read-only).
CHECKOUT = Path(__file__).resolve().parents[2]


def engine_pair(
    image: HostImage, dirs: tuple[Path, PathsConfig], n: int, *, data_disk_mib: int = 64
) -> L1Pair:
    """Two L1s for Kemari's engine, as ``kemari klab protect-demo`` makes them: the
    checkout shared in, eth1 for the witness, 1 GiB each, a data disk of
    ``data_disk_mib`` (DRBD's backing device; 0: none); lab ``n`` of this worker."""
    lab, paths = dirs
    spec = PairSpec(
        lab_id(n),
        slot=slot(n),
        memory_mib=1024,
        share=str(CHECKOUT),
        lan=True,
        data_disk_mib=data_disk_mib,
    )
    return L1Pair(spec, image, lab_dir=lab, run_root=paths.run_dir, shm_dir=paths.shm_dir)


def print_consoles(group: L1Group) -> None:
    """The tail of every L1's console (for a failed test's report)."""
    for h in group.hosts:
        print(f"--- {h.spec.host} console\n{h.console_tail(40) or h.saved_console()[-4000:]}")
