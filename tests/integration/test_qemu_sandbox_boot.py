"""QEMU 7.2 under ``-sandbox on`` (its seccomp filter, the default): a guest boots under
TCG, its device state is captured through the agents' unix socket and restored into a
second sandboxed QEMU that runs on; with ``-runas`` the filter still lets QEMU drop to
that user, and capture and restore work as that user (below a run root it may pass
through; one it may not is refused at start). Files QEMU creates under the agents' umask
(0o077) are owner-only."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.errors import QEMUStartError
from kemari_suite.protocol.files import OWNER_ONLY_UMASK
from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared, restore
from kemari_suite.vm.guestram import create_ram_file
from kemari_suite.vm.image import GuestImage
from kemari_suite.vm.qemu import AsyncVM, VMSpec, VMState, wait_for_console
from kemari_suite.vm.spec import SANDBOX, SANDBOX_RUNAS
from tests.conftest import WORKER, needs_root

pytestmark = [pytest.mark.integration, needs_root]


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _qemu_pid(vm: AsyncVM) -> int:
    # Under `ip netns exec` or not, the pidfile is QEMU's own.
    return int(vm.paths.pidfile.read_text().strip())


def _spec(image: GuestImage, name: str, **kw: object) -> VMSpec:
    base: dict[str, object] = dict(name=name, kernel=image.kernel, initrd=image.initrd, accel="tcg")
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_sandboxed_guest_boots_captures_and_restores(
    guest_image: GuestImage, run_paths: PathsConfig
) -> None:
    old_umask = os.umask(OWNER_ONLY_UMASK)  # the agents' umask, inherited by QEMU
    try:
        asyncio.run(_boot_capture_restore(guest_image, run_paths))
    finally:
        os.umask(old_umask)


async def _boot_capture_restore(image: GuestImage, paths: PathsConfig) -> None:
    spec = _spec(image, f"sbx-{WORKER}")
    vm = AsyncVM(spec, run_root=paths.run_dir, shm_dir=paths.shm_dir)
    twin: AsyncVM | None = None
    try:
        await vm.start()
        argv = (vm.paths.run_dir / "cmdline").read_text().split()
        assert argv[argv.index("-sandbox") + 1] == SANDBOX
        assert _proc_status(_qemu_pid(vm))["Seccomp"] == "2", "no seccomp filter"
        await asyncio.to_thread(
            wait_for_console, vm.paths.console, "KEMARI-BOOTED", 120, alive=vm.alive
        )
        assert await vm.status() == "running"
        # What QEMU created under the agents' umask: readable by its owner alone.
        for f in (vm.paths.ram, vm.paths.console, vm.paths.pidfile):
            assert _mode(f) == 0o600, f
        assert _mode(vm.paths.qmp) & 0o077 == 0

        # Device state through the agents' socket, as at every checkpoint.
        await enable_ignore_shared(vm)
        await vm.execute("stop")
        cap = DeviceStateCapturer(vm, vm.paths.run_dir / "devstate.sock")
        try:
            state = await cap.capture()
        finally:
            cap.close()
        assert len(state) > 1000
        assert vm.alive(), "the sandbox killed QEMU during the capture"

        # A second sandboxed QEMU on a copy of the RAM, as at a failover.
        tspec = spec.replace(name=f"sbx-{WORKER}-twin", incoming=True)
        twin = AsyncVM(tspec, run_root=paths.run_dir, shm_dir=paths.shm_dir, keep_ram=True)

        def copy_ram(dst: Path) -> None:
            create_ram_file(dst, vm.paths.ram.stat().st_size)
            with open(vm.paths.ram, "rb") as src, open(dst, "r+b") as out:
                shutil.copyfileobj(src, out, 1 << 20)

        await twin.start(prepare_ram=copy_ram)
        await restore(twin, state, twin.paths.run_dir / "in.sock")
        await twin.execute("cont")
        await asyncio.sleep(1.0)
        assert await twin.status() == "running"
        assert _proc_status(_qemu_pid(twin))["Seccomp"] == "2"
    finally:
        await vm.shutdown()
        if twin is not None:
            await twin.shutdown()
            twin.paths.ram.unlink(missing_ok=True)


@pytest.fixture
def passable_run_root() -> Iterator[Path]:
    """A run root the ``-runas`` user may pass through (mode 0711: search only); the
    per-VM folder below it is made 0700 and given to that user."""
    root = Path(tempfile.mkdtemp(prefix=f"ksbx-{WORKER}-"))
    try:
        root.chmod(0o711)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_runas_drops_to_that_user_under_the_sandbox(
    guest_image: GuestImage, run_paths: PathsConfig, passable_run_root: Path
) -> None:
    user = pwd.getpwnam("nobody")
    spec = _spec(guest_image, f"sbx-{WORKER}-runas", runas="nobody")

    async def run() -> None:
        vm = AsyncVM(spec, run_root=passable_run_root, shm_dir=run_paths.shm_dir)
        twin: AsyncVM | None = None
        try:
            await vm.start()
            argv = (vm.paths.run_dir / "cmdline").read_text().split()
            assert argv[argv.index("-sandbox") + 1] == SANDBOX_RUNAS
            st = _proc_status(_qemu_pid(vm))
            assert st["Seccomp"] == "2"
            assert st["Uid"].split() == [str(user.pw_uid)] * 4, st["Uid"]
            run_st = vm.paths.run_dir.stat()
            assert (run_st.st_uid, _mode(vm.paths.run_dir)) == (user.pw_uid, 0o700)
            await asyncio.to_thread(
                wait_for_console, vm.paths.console, "KEMARI-BOOTED", 120, alive=vm.alive
            )
            assert await vm.status() == "running"
            # The checkpoint path works as that user: capture, then a failover start.
            await enable_ignore_shared(vm)
            await vm.execute("stop")
            cap = DeviceStateCapturer(vm, vm.paths.run_dir / "devstate.sock")
            try:
                state = await cap.capture()
            finally:
                cap.close()
            assert len(state) > 1000 and vm.alive()
            twin = AsyncVM(
                spec.replace(name=f"sbx-{WORKER}-runas2", incoming=True),
                run_root=passable_run_root,
                shm_dir=run_paths.shm_dir,
            )

            def copy_ram(dst: Path) -> None:
                create_ram_file(dst, vm.paths.ram.stat().st_size)
                with open(vm.paths.ram, "rb") as src, open(dst, "r+b") as out:
                    shutil.copyfileobj(src, out, 1 << 20)

            await twin.start(prepare_ram=copy_ram)
            await restore(twin, state, twin.paths.run_dir / "in.sock")
            await twin.execute("cont")
            await asyncio.sleep(1.0)
            assert await twin.status() == "running"
        finally:
            await vm.shutdown()
            if twin is not None:
                await twin.shutdown()

    asyncio.run(run())


def test_runas_needs_a_passable_run_root(guest_image: GuestImage, run_paths: PathsConfig) -> None:
    # pytest's tmp folders are 0700 root: the user could never reach its sockets there.
    spec = _spec(guest_image, f"sbx-{WORKER}-closed", runas="nobody")

    async def run() -> None:
        vm = AsyncVM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir)
        with pytest.raises(QEMUStartError, match="cannot pass through"):
            await vm.start()
        assert vm.state is VMState.STOPPED and vm.proc is None

    asyncio.run(run())
