"""Device state by ``xen-save-devices-state`` after the first migrations: what a sync
point captures restores into a second QEMU, whose guest runs on from where it stopped.

A guest prints ``COUNTER n`` once a second. It is stopped and captured until the
captures are saves (the first ones are whole migrations); the first saved device
sections, behind the migrations' configuration, are restored into a twin QEMU on a copy
of the RAM, and the twin's guest must go on printing: the next values, not a restart.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.errors import ReplicationError
from kemari_suite.vm.devstate import (
    SAVE_COMMAND,
    STREAM_HEADER,
    WARM_MIGRATIONS,
    DeviceStateCapturer,
    enable_ignore_shared,
    ram_blocks,
    restore,
    stream_prefix,
    unsaved_blocks,
    with_prefix,
)
from kemari_suite.vm.guestram import create_ram_file
from kemari_suite.vm.image import GuestImage, kernel_cmdline
from kemari_suite.vm.qemu import AsyncVM, VMSpec, wait_for_console
from tests.conftest import WORKER, needs_root

COUNTER = re.compile(r"COUNTER (\d+)")


def _values(console: Path) -> list[int]:
    text = console.read_text(errors="replace") if console.exists() else ""
    return [int(v) for v in COUNTER.findall(text)]


async def _wait_values(console: Path, n: int, timeout: float) -> list[int]:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(vals := _values(console)) < n:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{console}: {vals} after {timeout} s")
        await asyncio.sleep(0.25)
    return vals


@pytest.mark.integration
@needs_root
def test_saved_sections_restore_and_the_guest_runs_on(
    guest_image: GuestImage, run_paths: PathsConfig
) -> None:
    asyncio.run(_capture_twice_restore(guest_image, run_paths))


async def _capture_twice_restore(image: GuestImage, paths: PathsConfig) -> None:
    spec = VMSpec(
        name=f"dsec-{WORKER}",
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(run="counter 100"),
        accel="tcg",
    )
    vm = AsyncVM(spec, run_root=paths.run_dir, shm_dir=paths.shm_dir)
    twin: AsyncVM | None = None
    try:
        await vm.start()
        await asyncio.to_thread(wait_for_console, vm.paths.console, "KEMARI-BOOTED", 120)
        await _wait_values(vm.paths.console, 2, 120)
        await enable_ignore_shared(vm)
        cap = DeviceStateCapturer(vm, vm.paths.run_dir / "devstate.sock")
        try:
            # The first captures are whole migrations (they warm TCG's TLB), then saves.
            sizes = []
            for _ in range(WARM_MIGRATIONS):
                await vm.execute("stop")
                sizes.append(len(first := await cap.capture()))
                await vm.execute("cont")
            assert cap.method == SAVE_COMMAND, "this QEMU has the save command"
            assert cap.migrations == WARM_MIGRATIONS
            await _wait_values(vm.paths.console, len(_values(vm.paths.console)) + 2, 60)
            await vm.execute("stop")
            state = await cap.capture()
            assert cap.migrations == WARM_MIGRATIONS
        finally:
            cap.close()
        assert not cap.save_path.exists()
        # The second capture is the first's configuration, then device sections only:
        # much smaller than a migration, which carries the ROMs and a description.
        assert state.startswith(stream_prefix(first))
        assert len(state) < min(sizes) // 4, (len(state), sizes)
        last = _values(vm.paths.console)[-1]

        tspec = spec.replace(name=f"dsec-{WORKER}-twin", incoming=True)
        twin = AsyncVM(tspec, run_root=paths.run_dir, shm_dir=paths.shm_dir, keep_ram=True)

        def copy_ram(dst: Path) -> None:
            create_ram_file(dst, vm.paths.ram.stat().st_size)
            with open(vm.paths.ram, "rb") as src, open(dst, "r+b") as out:
                shutil.copyfileobj(src, out, 1 << 20)

        await twin.start(prepare_ram=copy_ram)
        await restore(twin, state, twin.paths.run_dir / "in.sock")
        await twin.execute("cont")
        resumed = await _wait_values(twin.paths.console, 2, 60)
        # The same guest, counting on: no boot, values past the last one printed.
        assert "KEMARI-BOOTED" not in twin.paths.console.read_text(errors="replace")
        assert resumed[0] > last and resumed == sorted(resumed), (last, resumed)
    finally:
        await vm.shutdown()
        if twin is not None:
            await twin.shutdown()
            twin.paths.ram.unlink(missing_ok=True)


def test_stream_prefix_takes_the_configuration_up_to_the_ram_section() -> None:
    config = b"\x07\x00\x00\x00\x0dpc-i440fx-7.2"
    ram = b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04rest"
    stream = STREAM_HEADER + config + ram
    assert stream_prefix(stream) == STREAM_HEADER + config
    saved = STREAM_HEADER + b"\x04sections\x1a"
    assert with_prefix(STREAM_HEADER + config, saved) == STREAM_HEADER + config + saved[8:]
    # No configuration sent: the header alone.
    assert stream_prefix(STREAM_HEADER + ram) == STREAM_HEADER


@pytest.mark.parametrize(
    "bad",
    [b"", b"QEVM\x00\x00\x00\x02\x07", STREAM_HEADER + b"\x07\x00\x00\x00\x03abc"],
)
def test_stream_prefix_refuses_what_is_not_such_a_stream(bad: bytes) -> None:
    with pytest.raises(ReplicationError):
        stream_prefix(bad)


def test_saved_sections_must_be_a_stream() -> None:
    with pytest.raises(ReplicationError, match="device-state stream"):
        with_prefix(STREAM_HEADER, b"garbage")


# What ``info ramblock`` printed for the engine's guest (QEMU 7.2), and with standard VGA.
RAMBLOCK = """\
              Block Name    PSize              Offset               Used              Total
                    ram0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000
                  pc.rom    4 KiB  0x0000000008040000 0x0000000000020000 0x0000000000020000
   /rom@etc/table-loader    4 KiB  0x0000000008280000 0x0000000000001000 0x0000000000010000
      /rom@etc/acpi/rsdp    4 KiB  0x00000000082c0000 0x0000000000001000 0x0000000000001000
"""
VGA = """\
                vga.vram    4 KiB  0x0000000008300000 0x0000000001000000 0x0000000001000000
    0000:00:02.0/vga.rom    4 KiB  0x0000000009300000 0x0000000000010000 0x0000000000010000
"""


def test_firmware_and_shared_ram_need_no_migration() -> None:
    blocks = ram_blocks(RAMBLOCK)
    assert blocks[0] == "ram0" and len(blocks) == 6
    assert unsaved_blocks(blocks, {"ram0"}) == []
    # Not shared (share=off): the guest's RAM itself would be lost.
    assert unsaved_blocks(blocks, set()) == ["ram0"]


def test_video_memory_needs_a_migration_every_time() -> None:
    assert unsaved_blocks(ram_blocks(RAMBLOCK + VGA), {"ram0"}) == ["vga.vram"]
