"""The VM profile: the host-independent description of the VM a host would run.

The primary sends its profile before the initial synchronization; the secondary
compares it with its own (:mod:`kemari_suite.replica.compat`) and refuses, naming each
differing field, before a single page is copied. Fields: machine type, vCPUs, memory,
accelerator, NIC, kernel command line, kernel and initrd content (hashes), display,
extra devices, disk size and backend, and the QEMU version (a note, not a refusal).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.vm.qemu import QEMU_BINARY, VMSpec


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


def vm_profile(cfg: KemariConfig, spec: VMSpec, *, disk_size: int) -> dict[str, Any]:
    """The host-independent description of the VM this host would run.

    ``disk_size`` is the guest disk's size as the disk layer sees it
    (:func:`kemari_suite.disk.guest_disk_size`: 0 without a disk, -1 when missing).
    """
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
        "disk_size": disk_size,
        "disk_backend": cfg.disk.backend if cfg.disk.path else "",
        "qemu": qemu_version(),
    }


__all__ = ["file_digest", "qemu_version", "vm_profile"]
