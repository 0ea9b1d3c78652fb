"""The uffd-wp tracker in stock QEMU under TCG, checked against the compare tracker.

Each test boots the project's guest with the helper loaded (as a plugin, or preloaded)
and runs the engine's own stopped window (:func:`kemari_suite.bench.memsync.product_window`)
with a :class:`~kemari_suite.checkpoint.verifying.VerifyingTracker`: at every sync point
the compare tracker finds the pages whose bytes changed, and one the uffd-wp tracker did
not report fails the test. Workloads: a memory dirtier (random pages, 2 vCPUs), a
fork-heavy loop, and disk reads landing in guest RAM by DMA (virtio-blk). Plus: QEMU's
own userfaultfd users are refused, and a QEMU without the helper falls back by probing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.bench.memsync import complete, initial_sync, product_window
from kemari_suite.checkpoint.compare import CompareTracker
from kemari_suite.checkpoint.uffdwp import refuse_qemu_userfaultfd
from kemari_suite.checkpoint.verifying import VerifyingTracker
from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.errors import ReplicationError
from kemari_suite.vm import wphelper
from kemari_suite.vm.define import ensure_image
from kemari_suite.vm.devstate import enable_ignore_shared
from kemari_suite.vm.guestram import PAGE_SIZE
from kemari_suite.vm.image import kernel_cmdline
from kemari_suite.vm.qemu import AsyncVM, VMSpec, wait_for_console
from tests.conftest import needs_root

KERNEL_OK, KERNEL_WHY = wphelper.probe_kernel()
pytestmark = [
    pytest.mark.integration,
    needs_root,
    pytest.mark.skipif(not KERNEL_OK, reason=KERNEL_WHY),
]

SYNC_POINTS = 25
DISK_MIB = 32


@contextlib.asynccontextmanager
async def guest(
    base: KemariConfig,
    paths: PathsConfig,
    tag: str,
    run: str,
    *,
    vcpus: int = 1,
    mode: str = "plugin",
    disk: Path | None = None,
    ignore_shared: bool = True,
) -> AsyncIterator[AsyncVM]:
    image = ensure_image(base)
    helper = wphelper.build_helper(base.paths.cache_dir)
    spec = VMSpec(
        name=tag,
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(run=run),
        memory_mib=128,
        vcpus=vcpus,
        accel="tcg",
        blockdev=f"driver=file,filename={disk}" if disk else None,
        wp_helper=helper,
        wp_helper_mode=mode,
    )
    vm = AsyncVM(spec, run_root=paths.run_dir, shm_dir=paths.shm_dir)
    await vm.start()
    try:
        # A TCG boot beside the kernel lab's L1 guests on two cores took over 180 s once.
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 420)
        if ignore_shared:
            await enable_ignore_shared(vm)
        yield vm
    finally:
        await vm.shutdown()


async def verified_sync_points(vm: AsyncVM, cfg: KemariConfig, n: int) -> VerifyingTracker:
    """``n`` sync points of the engine's window, every scan checked; returns the checker."""
    with product_window(vm, cfg, tracker="uffd-wp") as window:
        fast = window.tracker
        assert fast.name == "uffd-wp"
        checked = VerifyingTracker(fast, CompareTracker(fast.n_pages, threads=2))
        window.tracker = checked
        # The checker keeps a shadow: the staging buffer must hold a full copy.
        window.staging = np.ones((fast.n_pages, PAGE_SIZE), dtype=np.uint8)
        await initial_sync(window)
        for _ in range(n):
            await asyncio.sleep(0.05)
            await complete(window, await window.run(resume=True))
        return checked


def short_paths(run_paths: PathsConfig, tmp: str) -> PathsConfig:
    # AF_UNIX paths (the helper's socket) must stay under 108 bytes.
    return dataclasses.replace(run_paths, run_dir=Path(tmp))


@pytest.fixture
def paths(run_paths: PathsConfig) -> PathsConfig:
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="kwp-", dir="/tmp")
    try:
        yield short_paths(run_paths, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check(checked: VerifyingTracker) -> None:
    assert checked.scans >= SYNC_POINTS
    assert checked.reported > 0  # the workload did write


def test_memory_dirtier_on_two_vcpus(base_config: KemariConfig, paths: PathsConfig) -> None:
    async def run() -> VerifyingTracker:
        workload = "memdirty -m 32 -r 20000 -P incompressible & memdirty -m 8 -r 5000"
        async with guest(base_config, paths, "wpsmp", workload, vcpus=2) as vm:
            return await verified_sync_points(vm, base_config, SYNC_POINTS)

    _check(asyncio.run(run()))


def test_fork_heavy_guest(base_config: KemariConfig, paths: PathsConfig) -> None:
    async def run() -> VerifyingTracker:
        workload = "kbench -t 30 -b fork"
        async with guest(base_config, paths, "wpfork", workload) as vm:
            return await verified_sync_points(vm, base_config, SYNC_POINTS)

    _check(asyncio.run(run()))


def test_disk_reads_landing_by_dma(
    base_config: KemariConfig, paths: PathsConfig, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * (DISK_MIB << 12))
    workload = (
        "while true; do echo 3 > /proc/sys/vm/drop_caches; "
        "dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null; done"
    )

    async def run() -> VerifyingTracker:
        async with guest(base_config, paths, "wpdma", workload, disk=disk) as vm:
            return await verified_sync_points(vm, base_config, SYNC_POINTS)

    _check(asyncio.run(run()))


def test_preloaded_helper_works_too(base_config: KemariConfig, paths: PathsConfig) -> None:
    async def run() -> VerifyingTracker:
        workload = "memdirty -m 16 -r 4000"
        async with guest(base_config, paths, "wppre", workload, mode="preload") as vm:
            return await verified_sync_points(vm, base_config, 10)

    assert asyncio.run(run()).scans >= 10


def test_qemu_userfaultfd_users_are_refused(base_config: KemariConfig, paths: PathsConfig) -> None:
    async def run() -> None:
        # QEMU itself refuses postcopy beside x-ignore-shared (which the engine always
        # sets); without it, the capability can be turned on, and the agent refuses.
        workload = "memdirty -m 8 -r 100"
        async with guest(base_config, paths, "wppost", workload, ignore_shared=False) as vm:
            await refuse_qemu_userfaultfd(vm, "auto", vm.spec.wp_helper)  # off: fine
            await vm.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
            )
            with pytest.raises(ReplicationError, match="postcopy-ram"):
                await refuse_qemu_userfaultfd(vm, "auto", vm.spec.wp_helper)
            # Not loaded, or another tracker named: nothing to refuse.
            await refuse_qemu_userfaultfd(vm, "compare", vm.spec.wp_helper)

    asyncio.run(run())


def test_auto_without_the_helper_falls_back_and_says_why(
    base_config: KemariConfig, paths: PathsConfig
) -> None:
    async def run() -> tuple[str, str]:
        async with guest(base_config, paths, "wpnone", "memdirty -m 8 -r 100") as vm:
            from kemari_suite.checkpoint.tracker import make_tracker

            tracker = make_tracker(
                "auto",
                n_pages=vm.spec.memory_mib * 256,
                qemu_pid=vm.pid,
                ram_path=vm.paths.ram,
                wp_socket=None,
                wp_unavailable="test: not loaded",
            )
            try:
                return tracker.name, tracker.reason
            finally:
                tracker.close()

    name, reason = asyncio.run(run())
    assert name in ("soft-dirty", "compare")
    assert "its helper is not loaded into QEMU (test: not loaded)" in reason
