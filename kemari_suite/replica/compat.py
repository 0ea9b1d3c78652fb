"""Can the secondary run this VM? Checked at protect time, before protection is declared.

Two stages:

1. **Profile** (before the initial synchronization): the primary sends the
   host-independent part of its VM (machine type, vCPUs, memory, NIC, disk size, kernel
   and initrd content, QEMU version). The secondary compares it with the VM its own
   configuration describes and refuses, naming each differing field, before a single
   page is copied. A different QEMU version is a note, not a refusal: stage 2 decides.
2. **Trial restore** (after the first committed checkpoint): the secondary starts a
   throw-away QEMU from its own command line, with ``-incoming defer``, and loads the
   committed device state into it. This proves what a failover needs: this QEMU accepts
   the command line and the machine type, and the device state of the primary's QEMU
   loads. The trial maps the replica RAM through a hard link, never runs a vCPU, and is
   stopped at once; its NIC and disk are stand-ins (a hub port, a null block device of
   the same size), so it touches neither the TAP nor the disk copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError, ReplicationError
from kemari_suite.vm.devstate import restore
from kemari_suite.vm.qemu import QEMU_BINARY, AsyncVM, VMPaths, VMSpec

#: Profile fields that must be equal on both hosts, with the config key that sets each.
FIELDS: dict[str, str] = {
    "machine": "vm.machine",
    "vcpus": "vm.vcpus",
    "memory_mib": "vm.memory_mib",
    "accel": "vm.accel",
    "mac": "vm.mac",
    "nic": "vm.netdev / tap.host_tap",
    "append": "vm.append / vm.run / vm.ip (kernel command line)",
    "kernel": "image.kernel (content)",
    "initrd": "image.initrd (content)",
    "display": "display",
    "devices": "device",
    "disk_size": "disk.path (size)",
    "disk_backend": "disk.backend",
}


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: Path | None) -> str:
    """A short content hash of a file (cached by path, size and mtime); "" for none."""
    if path is None:
        return ""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.cache
def qemu_version() -> str:
    """This host's QEMU version ("7.2.19"), or "unknown"."""
    try:
        out = subprocess.run(
            [QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else "unknown"


def disk_size(cfg: KemariConfig) -> int:
    """Size in bytes of this host's guest disk, 0 without one, -1 when it is missing."""
    if not cfg.disk.path:
        return 0
    try:
        fd = os.open(cfg.disk.path, os.O_RDONLY)
    except OSError:
        return -1
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if cfg.disk.backend == "shared":
        from kemari_suite.disk.shared import SHARED_RESERVED_BYTES

        if cfg.disk.lease_device in ("", cfg.disk.path):
            size -= SHARED_RESERVED_BYTES
    return size


def vm_profile(cfg: KemariConfig, spec: VMSpec) -> dict[str, Any]:
    """The host-independent description of the VM this host would run."""
    return {
        "machine": spec.machine,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "accel": spec.accel,
        "mac": spec.mac if (spec.netdev or cfg.tap.host_tap) else "",
        "nic": bool(spec.netdev or cfg.tap.host_tap),
        "append": spec.append,
        "kernel": file_digest(getattr(spec, "kernel", None)),
        "initrd": file_digest(getattr(spec, "initrd", None)),
        "display": getattr(spec, "display", "none"),
        "devices": list(getattr(spec, "devices", ())),
        "disk_size": disk_size(cfg),
        "disk_backend": cfg.disk.backend if cfg.disk.path else "",
        "qemu": qemu_version(),
    }


@dataclass(frozen=True)
class Comparison:
    """What differs between the primary's VM and the one this host would start."""

    differences: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def compare(primary: dict[str, Any], here: dict[str, Any]) -> Comparison:
    """Compare a primary's profile with this host's; differences name the config key."""
    diffs: list[str] = []
    notes: list[str] = []
    for name, key in FIELDS.items():
        a, b = primary.get(name), here.get(name)
        if name == "disk_size" and b == -1:
            diffs.append(f"{key}: the disk is missing on this host")
            continue
        if a != b:
            diffs.append(f"{key}: primary has {a!r}, this host {b!r}")
    qa, qb = primary.get("qemu", "unknown"), here.get("qemu", "unknown")
    if qa != qb:
        notes.append(
            f"QEMU {qa} on the primary, {qb} here: compatible only if the trial restore "
            "of the first checkpoint succeeds"
        )
    return Comparison(diffs, notes)


def _trial_spec(cfg: KemariConfig, spec: VMSpec) -> VMSpec:
    """This host's command line with stand-ins for the NIC backend and the disk."""
    netdev: str | None = None
    if cfg.tap.host_tap:
        # The failover start puts the NIC on the frame proxy's stream socket (no
        # vnet_hdr): a hub port is an equivalent stand-in.
        netdev = "hubport,hubid=0"
    elif spec.netdev and spec.netdev.split(",", 1)[0] in ("tap", "bridge"):
        # The device state of a NIC on a TAP records vnet_hdr=on: the stand-in must be a
        # TAP too. A fresh, unattached one (QEMU creates it and it goes with QEMU).
        netdev = f"tap,ifname=kchk{os.getpid() % 100000:05d},script=no,downscript=no"
    elif spec.netdev:
        netdev = "hubport,hubid=0"
    size = disk_size(cfg)
    blockdev = f"driver=null-co,size={size}" if size > 0 else None
    return spec.replace(name=f"{spec.name}-check", incoming=True, netdev=netdev, blockdev=blockdev)


def trial_ram_path(cfg: KemariConfig, spec: VMSpec) -> Path:
    """Where the caller puts the copy of the replica RAM the trial runs on."""
    return VMPaths.for_vm(f"{spec.name}-check", cfg.paths.run_dir, cfg.paths.shm_dir).ram


def copy_replica(src: Path, dst: Path) -> None:
    """Copy the replica RAM file (tmpfs to tmpfs, in the kernel)."""
    with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
        size = os.fstat(fsrc.fileno()).st_size
        done = 0
        while done < size:
            n = os.sendfile(fdst.fileno(), fsrc.fileno(), done, size - done)
            if n == 0:
                break
            done += n


async def trial_restore(cfg: KemariConfig, spec: VMSpec, devstate: bytes) -> float:
    """Start a throw-away QEMU from ``spec`` on the RAM copy at :func:`trial_ram_path`
    and load ``devstate`` into it; the copy is removed afterwards. Returns the seconds.

    Raises:
        ReplicationError: QEMU would not start or rejected the device state; the
            message carries QEMU's own words.
    """
    tspec = _trial_spec(cfg, spec)
    vm = AsyncVM(tspec, run_root=cfg.paths.run_dir, shm_dir=cfg.paths.shm_dir, keep_ram=True)
    t0 = time.monotonic()
    try:
        try:
            await vm.start()
        except KemariError as err:
            raise ReplicationError(f"this host's QEMU would not start the VM: {err}") from err
        await restore(vm, devstate, vm.paths.run_dir / "check.sock")
        return time.monotonic() - t0
    finally:
        with contextlib.suppress(Exception):
            await vm.kill()
        with contextlib.suppress(FileNotFoundError):
            vm.paths.ram.unlink()


async def run_trial(cfg: KemariConfig, spec: VMSpec, devstate: bytes) -> dict[str, Any]:
    """:func:`trial_restore` as a verdict for the wire: ``{"ok", "ms" | "reason"}``."""
    try:
        secs = await asyncio.wait_for(trial_restore(cfg, spec, devstate), 120)
    except (ReplicationError, TimeoutError) as err:
        return {"ok": False, "stage": "restore", "reason": str(err) or "timed out"}
    return {"ok": True, "stage": "restore", "ms": round(secs * 1e3, 1), "qemu": qemu_version()}
