"""Mapping a libvirt domain's ``<devices>``: the video model, one disk, one NIC, and the
few other devices that replicate safely (virtio-rng, watchdogs, panic notifiers).

What a device becomes, or why it is left out, is noted
(:mod:`kemari_suite.vm.libvirtnotes`); the engine limits (one disk, one NIC) come from
:mod:`kemari_suite.vm.vmtree`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from kemari_suite.vm.libvirtnotes import MiB, Notes, safe_name
from kemari_suite.vm.vmtree import MAX_DISKS, MAX_NICS, VIDEO_RAM_MIB

#: libvirt video model -> (display, how it changed or None).
_VIDEO: Mapping[str, tuple[str, str | None]] = {
    "none": ("none", None),
    "vga": ("std", None),
    "qxl": ("qxl", None),
    "virtio": ("virtio", None),
    "cirrus": ("std", "cirrus is not offered; the standard VGA replaces it"),
    "bochs": ("std", "bochs-display is not offered; the standard VGA replaces it"),
    "ramfb": ("std", "ramfb is not offered; the standard VGA replaces it"),
    "vmvga": ("std", "vmware-svga is not offered; the standard VGA replaces it"),
}

#: Elements under <devices> that are left out without harm, and why.
_DROPPED_DEVICES: Mapping[str, str] = {
    "graphics": "no remote display: the VM runs with -display none (use the serial console)",
    "sound": "no sound device",
    "audio": "no sound device",
    "redirdev": "USB redirection is an output the taps cannot hold back",
    "smartcard": "no smartcard device",
    "hub": "no USB hub",
    "parallel": "a parallel port is an output the taps cannot hold back",
    "iommu": "no vIOMMU",
    "lease": "libvirt lock manager leases are not used; the suite has its own tiebreaker",
    "memballoon": (
        "ballooning discards guest RAM behind the dirty-page tracker; the VM gets all its memory"
    ),
}
#: Elements under <devices> with no equivalent that the guest may depend on.
_CANNOT_DEVICES: Mapping[str, str] = {
    "hostdev": "device passthrough: host hardware state cannot be replicated",
    "filesystem": "a shared folder is an output the taps cannot hold back",
    "tpm": "a TPM's state is outside QEMU's device state",
    "vsock": "vsock is a channel to the host the taps cannot hold back",
    "shmem": "shared memory with the host cannot be replicated",
    "memory": "memory hotplug devices are not supported",
    "crypto": "crypto devices are not supported",
}


def map_video(devices: ET.Element, notes: Notes) -> str:
    videos = devices.findall("video")
    if not videos:
        return "none"
    model = videos[0].find("model")
    vtype = model.get("type", "vga") if model is not None else "vga"
    display, change = _VIDEO.get(vtype, ("std", f"{vtype} is not offered; the standard VGA"))
    vram = VIDEO_RAM_MIB.get(display, 0)
    cost = (
        f"its {vram} MiB of video RAM are outside the shared RAM file and sent with every "
        'checkpoint; consider display = "none" with a serial console'
    )
    if change is not None:
        notes.add("changed", "video[0]", f"{change} (display = {display!r}); {cost}")
    elif vram:
        notes.add("changed", "video[0]", f"{vtype} -> display = {display!r}: {cost}")
    for i, _extra in enumerate(videos[1:], start=1):
        notes.add("dropped", f"video[{i}]", "only one video device")
    return display


def _file_size_mib(path: str) -> int | None:
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            return None
    except OSError:
        return None
    return size // MiB if size and size % MiB == 0 else None


def _flatten_hint(path: str, fmt: str) -> str:
    dst = re.sub(r"\.(qcow2|qcow|vmdk|vdi|vhdx?|qed|img)$", "", path) + ".raw"
    return (
        f"needs flattening: qemu-img convert -O raw {path} {dst} (then point disk[0].path at {dst})"
        if fmt != "backing"
        else f"needs flattening: qemu-img convert -O raw {path} {dst} (merges the chain; then "
        f"point disk[0].path at {dst})"
    )


def map_disks(devices: ET.Element, notes: Notes) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for i, disk in enumerate(devices.findall("disk")):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        where = f"disk[{i}] {dev}".strip()
        kind = disk.get("device", "disk")
        if kind in ("cdrom", "floppy"):
            notes.add("dropped", where, f"{kind}: removable media are not carried over")
            continue
        if kind == "lun":
            notes.add("cannot", where, "SCSI LUN passthrough cannot be replicated")
            continue
        if disk.find("readonly") is not None:
            notes.add("dropped", where, "read-only disk: only one writable disk is protected")
            continue
        dtype = disk.get("type", "file")
        src = disk.find("source")
        path = ""
        if dtype == "file" and src is not None:
            path = src.get("file", "")
        elif dtype == "block" and src is not None:
            path = src.get("dev", "")
        elif dtype == "network":
            proto = src.get("protocol", "?") if src is not None else "?"
            notes.add(
                "cannot",
                where,
                f"network disk ({proto}): export it as a block device or raw file on each host",
            )
            continue
        elif dtype == "volume":
            pool = src.get("pool", "?") if src is not None else "?"
            vol = src.get("volume", "?") if src is not None else "?"
            notes.add(
                "cannot",
                where,
                f"storage pool volume {pool}/{vol}: give its path (virsh vol-path --pool "
                f"{pool} {vol})",
            )
            continue
        else:
            notes.add("cannot", where, f"disk type {dtype!r} has no path to carry over")
            continue
        if not path:
            notes.add("dropped", where, "no source (an empty drive)")
            continue
        if len(kept) >= MAX_DISKS:
            notes.add(
                "cannot",
                where,
                f"{path}: only {MAX_DISKS} disk per VM is protected in this version; "
                f"kept disk[0] {kept[0]['name']} ({kept[0]['path']})",
            )
            continue
        entry: dict[str, Any] = {"name": safe_name(dev, "disk0"), "path": path}
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if fmt != "raw":
            notes.add("cannot", f"{where}.driver", f"{fmt} ({_flatten_hint(path, fmt)})")
        backing = disk.find("backingStore")
        if backing is not None and (len(backing) or backing.get("type")):
            notes.add(
                "cannot",
                f"{where}.backingStore",
                f"a backing chain ({_flatten_hint(path, 'backing')})",
            )
        bus = target.get("bus", "virtio") if target is not None else "virtio"
        if bus != "virtio":
            notes.add(
                "changed",
                f"{where}.bus",
                f"{bus} -> virtio-blk: the guest needs the virtio_blk driver and sees /dev/vda "
                "instead of its old name; adjust root= and /etc/fstab (UUIDs are unaffected)",
            )
        size = _file_size_mib(path)
        if size is not None:
            entry["size_mib"] = size
        kept.append(entry)
    return kept


def map_interfaces(devices: ET.Element, notes: Notes, vm_name: str) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for i, iface in enumerate(devices.findall("interface")):
        where = f"interface[{i}]"
        itype = iface.get("type", "")
        mac_el = iface.find("mac")
        mac = (mac_el.get("address", "") if mac_el is not None else "").lower()
        src = iface.find("source")
        target = iface.find("target")
        if itype == "hostdev":
            notes.add("cannot", where, "SR-IOV passthrough NIC cannot be replicated")
            continue
        if itype in ("vhostuser", "vdpa"):
            notes.add("cannot", where, f"{itype}: the frame proxy needs the packets in userspace")
            continue
        if len(kept) >= MAX_NICS:
            notes.add(
                "cannot",
                where,
                f"{mac or 'NIC'}: only {MAX_NICS} NIC per VM is protected in this version; "
                f"kept interface[0] ({kept[0]['mac']})",
            )
            continue
        nic: dict[str, Any] = {}
        nic["mac"] = mac or _mac_for(vm_name)
        if not mac:
            notes.add("changed", f"{where}.mac", f"none given: {nic['mac']}")
        nic["model"] = "virtio-net-pci"
        tap_dev = target.get("dev", "") if target is not None else ""
        if itype == "bridge":
            nic["bridge"] = src.get("bridge", "") if src is not None else ""
            tap = ("kt-" + vm_name)[:15]
            notes.add(
                "changed",
                where,
                f"bridge {nic['bridge']}: the frame proxy attaches to TAP {tap}, which must be "
                f"a port of {nic['bridge']} on each host before protect",
            )
        elif itype == "network":
            net = src.get("network", "") if src is not None else ""
            bridge = src.get("bridge", "") if src is not None else ""
            if not bridge and net == "default":
                bridge = "virbr0"
            if bridge:
                nic["bridge"] = bridge
                notes.add(
                    "changed",
                    where,
                    f"libvirt network {net!r} -> its bridge {bridge} (the VM's TAP must be a "
                    "port of it on each host)",
                )
            else:
                nic["bridge"] = safe_name(net, "br0")[:15]
                notes.add(
                    "cannot",
                    where,
                    f"libvirt network {net!r}: its bridge is unknown; set nic[0].bridge "
                    "(virsh net-info NETWORK shows it)",
                )
        elif itype == "ethernet":
            if tap_dev:
                nic["tap"] = tap_dev[:15]
            else:
                nic["tap"] = "ktap0"
                notes.add("changed", where, 'no target dev: tap = "ktap0"')
        elif itype == "direct":
            dev = src.get("dev", "?") if src is not None else "?"
            nic["bridge"] = "br0"
            notes.add(
                "cannot",
                where,
                f"macvtap on {dev}: the frame proxy needs a TAP; bridge {dev} (e.g. br0) and "
                "set nic[0].bridge",
            )
        elif itype == "user":
            nic["tap"] = "ktap0"
            notes.add(
                "cannot",
                where,
                "user-mode networking: the frame proxy needs a host TAP; set nic[0].tap",
            )
        else:
            nic["tap"] = "ktap0"
            notes.add("cannot", where, f"interface type {itype!r}: set nic[0].tap or bridge")
        model_el = iface.find("model")
        model = model_el.get("type", "") if model_el is not None else ""
        if model and model != "virtio":
            notes.add(
                "changed",
                f"{where}.model",
                f"{model} -> virtio-net-pci (the frame proxy speaks virtio; the guest needs "
                "the virtio_net driver)",
            )
        driver = iface.find("driver")
        if driver is not None and driver.get("name") == "vhost":
            notes.add(
                "dropped",
                f"{where}.driver",
                "vhost is dropped: the frame proxy needs the packets in userspace",
            )
        if iface.find("bandwidth") is not None:
            notes.add("dropped", f"{where}.bandwidth", "no QoS on the frame proxy")
        if iface.find("filterref") is not None:
            notes.add("dropped", f"{where}.filterref", "libvirt nwfilter rules are not applied")
        kept.append(nic)
    return kept


def _mac_for(vm_name: str) -> str:
    h = hashlib.sha256(vm_name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def map_other_devices(devices: ET.Element, notes: Notes) -> list[dict[str, Any]]:
    extra: list[dict[str, Any]] = []
    consoles = [el.tag for el in devices if el.tag in ("serial", "console")]
    if consoles:
        notes.add(
            "changed",
            "serial/console",
            "the serial console goes to console.log in the VM's run directory (a pty or "
            "socket console would be an output the taps cannot hold back)",
        )
    counts: dict[str, int] = {}
    for el in devices:
        tag = el.tag
        i = counts.get(tag, 0)
        counts[tag] = i + 1
        where = f"{tag}[{i}]"
        if tag in ("disk", "interface", "video", "serial", "console", "emulator", "controller"):
            continue
        if tag in _CANNOT_DEVICES:
            notes.add("cannot", where, _CANNOT_DEVICES[tag])
        elif tag in _DROPPED_DEVICES:
            if tag == "memballoon" and el.get("model") == "none":
                continue
            kind = el.get("type") or el.get("model") or ""
            notes.add("dropped", f"{where} {kind}".strip(), _DROPPED_DEVICES[tag])
        elif tag == "channel":
            target = el.find("target")
            tname = target.get("name", "") if target is not None else ""
            notes.add(
                "dropped",
                f"{where} {tname}".strip(),
                "virtio-serial channels are outputs the taps cannot hold back (no guest agent)",
            )
        elif tag == "input":
            if el.get("bus", "ps2") != "ps2":
                notes.add("dropped", where, f"{el.get('type')} on {el.get('bus')}: PS/2 only")
        elif tag == "rng":
            model = el.get("model", "virtio")
            if model != "virtio":
                notes.add("dropped", where, f"rng model {model}")
                continue
            backend = el.find("backend")
            if backend is not None and backend.get("model", "random") != "random":
                notes.add(
                    "changed",
                    f"{where}.backend",
                    f"{backend.get('model')} backend -> QEMU's builtin entropy source",
                )
            extra.append({"driver": "virtio-rng-pci"})
        elif tag == "watchdog":
            model = el.get("model", "")
            if model in ("i6300esb", "ib700"):
                extra.append({"driver": model})
                action = el.get("action", "reset")
                if action != "reset":
                    notes.add("changed", f"{where}.action", f"{action} -> reset (QEMU's default)")
            else:
                notes.add("dropped", where, f"watchdog model {model}: i6300esb and ib700 only")
        elif tag == "panic":
            model = el.get("model", "isa")
            if model == "isa":
                extra.append({"driver": "pvpanic"})
            elif model == "pvpanic":
                extra.append({"driver": "pvpanic-pci"})
            else:
                notes.add("dropped", where, f"panic model {model}")
        else:
            notes.add("dropped", where, "no equivalent in a VM definition")
    return extra


__all__ = ["map_disks", "map_interfaces", "map_other_devices", "map_video"]
