"""The identity of a VM definition, and what an operator should know before protecting it.

:func:`identity` is the host-independent part of the QEMU command line; the two hosts
compare :func:`identity_digest` before protecting and :func:`diff_identity` names the
fields that differ. :func:`check_warnings` lists what is allowed but costly or risky.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kemari_suite.vm.vmtree import VIDEO_RAM_MIB, MiB, VMDefinition, size_bytes


def _file_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            size = f.tell()
    except OSError as err:
        return {"missing": err.strerror or str(err)}
    return {"size": size, "sha256": h.hexdigest()}


def identity(defn: VMDefinition, host: str | None = None) -> dict[str, Any]:
    """The host-independent part of the QEMU command line, as a JSON-able tree.

    Kernel and initrd are identified by their content (size and SHA-256, read here);
    disks by their declared size, or the size measured at ``host``'s path (the top-level
    path when None) when the definition gives none.
    """
    hdef = defn.host(host) if host is not None else None
    disks = hdef.disks if hdef is not None else defn.disks
    nics = hdef.nics if hdef is not None else defn.nics
    boot: dict[str, Any] = {"mode": defn.boot.mode}
    if defn.boot.mode == "kernel":
        boot["kernel"] = _file_identity(defn.boot.kernel)
        boot["initrd"] = _file_identity(defn.boot.initrd)
        boot["cmdline"] = defn.boot.cmdline
    else:
        boot["firmware"] = defn.boot.firmware
    disk_ids = []
    for d in disks:
        size = d.size_mib
        if size is None:
            try:
                size = size_bytes(d.path) // MiB
            except OSError:
                size = None
        disk_ids.append({"name": d.name, "backend": d.backend, "size_mib": size})
    ident: dict[str, Any] = {
        "format": 1,
        "name": defn.name,
        "machine": defn.machine,
        "vcpus": defn.vcpus,
        "memory_mib": defn.memory_mib,
        "accel": defn.accel,
        "display": defn.display,
        "boot": boot,
        "disks": disk_ids,
        "nics": [{"mac": n.mac, "model": n.model, "ip": n.ip} for n in nics],
        "devices": [d.qemu_arg() for d in defn.devices],
    }
    unprotected = defn.unprotected_outputs(host)
    if unprotected:
        # Only when present, so that the digests of fully tapped VMs stay as they were.
        ident["unprotected_outputs"] = list(unprotected)
    return ident


def identity_digest(defn: VMDefinition | Mapping[str, Any], host: str | None = None) -> str:
    """SHA-256 (hex) of :func:`identity` in canonical JSON: equal on both hosts of a
    correctly defined pair."""
    ident = identity(defn, host) if isinstance(defn, VMDefinition) else dict(defn)
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(tree, list):
        out[f"{prefix}.count"] = len(tree)
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = tree


_ABSENT = object()


def diff_identity(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("primary", "secondary"),
) -> list[str]:
    """The fields where two identities differ, one human line each, e.g.
    ``"memory_mib: primary 256, secondary 128"``. Empty when they are equal."""
    fa: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    _flatten(a, "", fa)
    _flatten(b, "", fb)
    lines = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, _ABSENT), fb.get(key, _ABSENT)
        if va != vb:
            lines.append(f"{key}: {labels[0]} {_show(va)}, {labels[1]} {_show(vb)}")
    return lines


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return json.dumps(value) if (not value or " " in value) else value
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- warnings --------------------------------------------------------------------------


def check_warnings(defn: VMDefinition) -> list[str]:
    """What an operator should know before protecting this VM (never fatal)."""
    out = list(defn.notes)
    vram = VIDEO_RAM_MIB.get(defn.display, 0)
    if vram:
        out.append(
            f'display = "{defn.display}": about {vram} MiB of video RAM lives outside the '
            f"shared RAM file and is sent with every checkpoint ({vram} MiB per checkpoint); "
            'prefer display = "none" with a serial console'
        )
    if defn.accel == "auto":
        out.append(
            'accel = "auto": each host picks KVM or TCG on its own; pin "tcg" or "kvm" so '
            "that both run the same accelerator"
        )
    if not defn.replication.key and not defn.replication.key_file:
        out.append(
            "replication.key_file and replication.key are empty: the agents refuse to "
            "start without a key (`kemari key generate -o FILE` writes one)"
        )
    if (
        defn.boot.mode == "kernel"
        and defn.display == "none"
        and "console=ttyS0" not in defn.boot.cmdline
    ):
        out.append(
            'boot.cmdline has no console=ttyS0: with display = "none" the serial console '
            "(console.log in the run directory) is the only console"
        )
    for h in defn.hosts:
        for i, nic in enumerate(h.nics):
            if not nic.tap:
                tap = nic.host_tap(defn.name)
                out.append(
                    f"hosts.{h.name}: nic[{i}] gives only bridge {nic.bridge}: TAP {tap} must "
                    f"exist there as a port of it (ip tuntap add {tap} mode tap; ip link set "
                    f"{tap} master {nic.bridge} up)"
                )
    for i, nic in enumerate(defn.nics):
        if nic.unprotected_output:
            out.append(
                f"nic[{i}].unprotected_output = true: the guest's frames leave before their "
                "checkpoint commits (no frame proxy); a failover can rewind what clients saw"
            )
    for i, dev in enumerate(defn.devices):
        if dev.unprotected_output:
            out.append(
                f"device[{i}] {dev.driver}: unprotected_output = true: its output is not "
                "held for the checkpoint"
            )
    for i, d in enumerate(defn.disks):
        if d.unprotected_output:
            out.append(
                f"disk[{i}].unprotected_output = true: QEMU writes it directly (no block "
                "tap) and it is not replicated; after a failover the standby's copy is stale"
            )
        if d.size_mib is None:
            out.append(
                f"disk[{i}].size_mib is not set: the hosts compare the sizes they measure; "
                "set it to have both checked against the definition"
            )
    return out


__all__ = ["check_warnings", "diff_identity", "identity", "identity_digest"]
