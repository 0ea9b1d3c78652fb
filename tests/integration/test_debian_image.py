"""The Debian + nginx guest disk: built and cached, booted under TCG, records stored
over the lab LAN, a clean stop, and an offline check of the disk afterwards.

The image is built once per machine in the shared cache ($KEMARI_CACHE); every boot
uses a sparse copy in the test's tmp_path, so the cached image is never written. The VM
name and lab id derive from the pytest-xdist worker (lab_factory); QEMU is stopped by the
VM class, the lab torn down by its fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kemari_suite import lab
from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.vm.debian import (
    FAILED_MARKER,
    READY_MARKER,
    RECORDS_DIR,
    STOPPED_MARKER,
    DebianImage,
    build_debian_image,
    debian_cmdline,
    offline_check,
    read_file,
)
from kemari_suite.vm.image import GuestImage
from kemari_suite.vm.qemu import VM, VMSpec, console_tail, wait_for_console
from tests.conftest import needs_root

pytestmark = [
    pytest.mark.integration,
    needs_root,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="no debootstrap"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on the host"),
]

#: Two busy cores under TCG: the kernel, then nginx in a 256 MiB guest.
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def debian_image(base_config: KemariConfig) -> DebianImage:
    return build_debian_image(base_config.paths.cache_dir)


def test_second_build_is_cached(debian_image: DebianImage, base_config: KemariConfig) -> None:
    t0 = time.monotonic()
    again = build_debian_image(base_config.paths.cache_dir)
    assert again.cached
    assert time.monotonic() - t0 < 2
    assert (again.path, again.key) == (debian_image.path, debian_image.key)
    assert again.manifest["packages"] == ["nginx"]
    assert "nginx" in again.manifest["installed"]


def test_offline_check_of_fresh_image_reports_missing_record(debian_image: DebianImage) -> None:
    check = offline_check(debian_image.path, {"absent": b"x"})
    assert check.fsck_clean, check.fsck_output
    assert not check.journal_replayed
    assert check.missing == ("absent",)
    assert not check.ok
    assert check.records == {}
    init = read_file(debian_image.path, "/sbin/kemari-init")
    assert init is not None and init.startswith(b"#!/bin/bash")
    assert read_file(debian_image.path, "/no/such/file") is None


def _curl(ns: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = lab.netns_exec_argv(ns, ["curl", "-s", "--max-time", "20", *args])
    return subprocess.run(argv, capture_output=True, check=False, timeout=60)


def test_boot_store_records_stop_clean(
    guest_image: GuestImage,
    debian_image: DebianImage,
    run_paths: PathsConfig,
    lab_factory: Callable[..., lab.LabLayout],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(debian_image.path), str(disk)], check=True)
    lay = lab_factory()
    spec = VMSpec(
        name=f"deb-{lay.lab_id}",
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        append=debian_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}"),
        memory_mib=256,
        vcpus=2,
        accel="tcg",
        netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
        netns=lay.ns_primary,
        blockdev=f"driver=file,filename={disk}",
    )
    records = {f"{n}": os.urandom(1000 + 4096 * n) for n in range(1, 4)}
    with VM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir).start() as vm:
        console = vm.paths.console
        try:
            ready_s = wait_for_console(console, READY_MARKER, READY_TIMEOUT, alive=vm.alive)
        except Exception:
            pytest.fail(f"no {READY_MARKER}:\n{console_tail(console, 40)}")
        print(f"\nboot to {READY_MARKER} under TCG: {ready_s:.1f} s")
        record_property("ready_seconds", round(ready_s, 1))
        text = console.read_text(errors="replace")
        assert FAILED_MARKER not in text, text
        assert "KEMARI-ROOT /dev/vda" in text, text
        assert f"eth0 {lay.guest_ip}/{lay.lan_prefix}" in text, text  # survived switch_root

        base = f"http://{lay.guest_ip}"
        health = _curl(lay.ns_client, "-f", f"{base}/health")
        assert health.stdout == b"ok\n", health
        for name, data in records.items():
            src = tmp_path / f"record-{name}"
            src.write_bytes(data)
            put = _curl(lay.ns_client, "-f", "-o", "/dev/null", "-w", "%{http_code}", "-T",
                        str(src), f"{base}/records/{name}")  # fmt: skip
            assert put.returncode == 0 and put.stdout == b"201", put
        # A second PUT of the same name replaces it (204).
        replaced = records["1"] = b"replaced\n"
        (tmp_path / "record-1").write_bytes(replaced)
        put = _curl(lay.ns_client, "-f", "-o", "/dev/null", "-w", "%{http_code}", "-T",
                    str(tmp_path / "record-1"), f"{base}/records/1")  # fmt: skip
        assert put.stdout == b"204", put
        for name, data in records.items():
            got = _curl(lay.ns_client, "-f", f"{base}/records/{name}")
            assert got.returncode == 0 and got.stdout == data, (name, got.returncode)
        assert _curl(lay.ns_client, "-f", f"{base}/records/none").returncode == 22  # 404

        # Ctrl-Alt-Del: kemari-init stops nginx, syncs, remounts / read-only, powers off.
        vm.execute(
            "send-key",
            {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]},
        )
        try:
            wait_for_console(console, STOPPED_MARKER, STOP_TIMEOUT, alive=vm.alive)
        except Exception:
            pytest.fail(f"no {STOPPED_MARKER}:\n{console_tail(console, 40)}")
        assert f"{STOPPED_MARKER} ro=yes" in console.read_text(errors="replace")
        deadline = time.monotonic() + 30
        while vm.status() != "shutdown" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert vm.status() == "shutdown"  # -no-shutdown: QEMU stays up after a poweroff

    check = offline_check(disk, records)
    assert check.fsck_clean, check.fsck_output
    assert not check.journal_replayed
    assert check.ok, (check.missing, check.mismatched)
    assert set(check.records) == set(records)
    assert read_file(disk, f"{RECORDS_DIR}/2") == records["2"]


def test_killed_guest_with_sync_mount_keeps_acknowledged_records(
    guest_image: GuestImage,
    debian_image: DebianImage,
    run_paths: PathsConfig,
    lab_factory: Callable[..., lab.LabLayout],
    tmp_path: Path,
) -> None:
    """rootflags=sync: a 201 means on the disk, so a SIGKILLed QEMU loses no record;
    the offline check replays the journal on a copy and finds them all."""
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(debian_image.path), str(disk)], check=True)
    lay = lab_factory()
    spec = VMSpec(
        name=f"dk-{lay.lab_id}",
        kernel=guest_image.kernel,
        initrd=guest_image.initrd,
        append=debian_cmdline(ip=f"{lay.guest_ip}/{lay.lan_prefix}", rootflags="sync"),
        memory_mib=256,
        vcpus=2,
        accel="tcg",
        netdev=f"tap,ifname={lay.tap_primary},script=no,downscript=no",
        netns=lay.ns_primary,
        blockdev=f"driver=file,filename={disk}",
    )
    records = {f"k{n}": os.urandom(512 * n + 7) for n in range(1, 6)}
    with VM(spec, run_root=run_paths.run_dir, shm_dir=run_paths.shm_dir).start() as vm:
        console = vm.paths.console
        try:
            wait_for_console(console, READY_MARKER, READY_TIMEOUT, alive=vm.alive)
        except Exception:
            pytest.fail(f"no {READY_MARKER}:\n{console_tail(console, 40)}")
        for name, data in records.items():
            src = tmp_path / f"record-{name}"
            src.write_bytes(data)
            put = _curl(lay.ns_client, "-f", "-o", "/dev/null", "-w", "%{http_code}", "-T",
                        str(src), f"http://{lay.guest_ip}/records/{name}")  # fmt: skip
            assert put.stdout == b"201", put
        vm.kill()  # SIGKILL right after the last 201: no sync, no unmount

    check = offline_check(disk, records)
    assert check.journal_replayed  # the guest died with / mounted
    assert check.fsck_clean, check.fsck_output
    assert check.ok, (check.missing, check.mismatched)
    raw = offline_check(disk, records, replay_journal=False)
    assert not raw.journal_replayed
