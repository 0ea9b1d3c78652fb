"""QEMU control: a guest boots in a lab host namespace and its workload answers over the
LAN; teardown and stale-state cleanup leave nothing behind; a QEMU that cannot start
says why."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.errors import QEMUStartError, VMError
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.vm import guestmem
from kemari_suite.vm.image import GuestImage, kernel_cmdline
from kemari_suite.vm.qemu import VM, AsyncVM, VMSpec, choose_accel, clean_stale, wait_for_console
from tests.conftest import needs_root

pytestmark = [pytest.mark.integration, needs_root]


def _spec(image: GuestImage, name: str, **kw: object) -> VMSpec:
    accel, _ = choose_accel("auto")
    base = dict(name=name, kernel=image.kernel, initrd=image.initrd, accel=accel)
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def test_guest_runs_workload_reachable_from_client(
    guest_image: GuestImage, run_paths: PathsConfig, lab_factory
) -> None:
    lay = lab_factory()
    spec = _spec(
        guest_image,
        f"boot-{lay.lab_id}",
        append=kernel_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}", run="counter -q -p 7000 50"),
        netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
        netns=lay.ns_primary,
    )
    with VM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir).start() as vm:
        boot_s = wait_for_console(vm.paths.console, "KEMARI-BOOTED", 120, alive=vm.alive)
        assert boot_s < 120
        assert vm.status() == "running"
        values = []
        deadline = time.monotonic() + 60
        while len(values) < 2 and time.monotonic() < deadline:
            try:
                values.append(int(tcp_request(lay.ns_client, lay.guest_ip, 7000, timeout=2)))
                time.sleep(0.5)
            except Exception:
                time.sleep(0.3)
        assert len(values) == 2, "counter never answered over the LAN"
        assert values[1] > values[0] >= 0
        # The same counter, read straight from the guest's RAM file.
        ram = vm.paths.ram.read_bytes()
        in_ram = guestmem.find_counter(ram)
        assert in_ram is not None and in_ram >= values[1]
        ram_path, run_dir, pid = vm.paths.ram, vm.paths.run_dir, vm.pid
    assert pid is not None
    assert not ram_path.exists(), "RAM file left behind"
    assert not (run_dir / "qmp.sock").exists()
    assert (
        not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    )


def test_bad_machine_type_shows_qemu_stderr(
    guest_image: GuestImage, run_paths: PathsConfig
) -> None:
    spec = _spec(guest_image, "badmachine", machine="no-such-machine-9.9")
    vm = AsyncVM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir)
    with pytest.raises(QEMUStartError) as exc:
        asyncio.run(vm.start())
    assert "unsupported machine type" in str(exc.value)
    assert exc.value.returncode not in (None, 0)
    assert not vm.paths.ram.exists()


def test_qemu_dies_with_its_controller_and_stale_state_is_cleaned(
    guest_image: GuestImage, run_paths: PathsConfig
) -> None:
    """A controller killed by SIGKILL takes QEMU with it; the next start cleans up."""
    spec = _spec(guest_image, "crashy")
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from pathlib import Path
        from kemari_suite.vm.qemu import AsyncVM, VMSpec
        spec = VMSpec(name="crashy", kernel=Path({str(spec.kernel)!r}),
                      initrd=Path({str(spec.initrd)!r}), accel={spec.accel!r})
        async def main():
            vm = AsyncVM(spec, run_root=Path({str(run_paths.run_dir)!r}),
                         shm_dir=Path({str(run_paths.shm_dir)!r}))
            await vm.start()
            print(vm.pid, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    ctl = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert ctl.stdout is not None
        qemu_pid = int(ctl.stdout.readline())
        os.kill(ctl.pid, signal.SIGKILL)
        ctl.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
            # A zombie until reaped by init: check its state.
            stat = Path(f"/proc/{qemu_pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        assert time.monotonic() < deadline, "QEMU outlived its controller"
    finally:
        if ctl.poll() is None:
            ctl.kill()
    vm = AsyncVM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir)
    assert vm.paths.ram.exists(), "test premise: the crash left the RAM file"
    removed = clean_stale("crashy", run_paths.run_dir, run_paths.shm_dir)
    assert vm.paths.ram in removed
    assert not vm.paths.ram.exists()


def test_second_start_of_running_vm_is_refused(
    guest_image: GuestImage, run_paths: PathsConfig
) -> None:
    spec = _spec(guest_image, "twice")
    with VM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir).start() as vm:
        with pytest.raises(VMError, match="already running"):
            clean_stale("twice", run_paths.run_dir, run_paths.shm_dir)
        assert vm.alive()
