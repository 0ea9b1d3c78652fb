"""Import a libvirt domain (``virsh dumpxml``) as a VM definition.

:func:`import_domain` maps what has an equivalent (name, memory, vCPUs, the pinned
machine type, kernel or BIOS boot, one raw disk, one NIC, the video model, a few
harmless devices) and says, for everything else, what happened to it as an
:class:`ImportNote`:

- ``dropped``: left out, and the VM works without it (a VNC display, a USB tablet, the
  memory balloon, a CD-ROM);
- ``changed``: carried over in another form (an e1000 NIC becomes virtio-net-pci, a
  SATA disk becomes virtio-blk, ``machine='pc'`` is pinned);
- ``cannot``: no equivalent, and the VM would not be the same without it (a qcow2 disk
  or a backing chain, a second disk or NIC, PCI passthrough, UEFI).

The result loads with :func:`kemari_suite.vm.vmdef.load_vmdef` once the disk paths
exist. The XML is parsed with :mod:`xml.etree.ElementTree`; documents with a DOCTYPE or
entity declarations are refused before parsing (libvirt never writes them).
"""

from __future__ import annotations

import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kemari_suite.config import dump_toml
from kemari_suite.errors import ConfigError, SetupError
from kemari_suite.vm.vmdef import (
    MAX_DISKS,
    MAX_NICS,
    VIDEO_RAM_MIB,
    MachineCatalog,
    MachineProbe,
    qemu_machines,
)

Severity = Literal["dropped", "changed", "cannot"]

MiB = 1 << 20
#: Placeholder replication addresses (RFC 5737 documentation range) when none are given.
PLACEHOLDER_A = "192.0.2.1"
PLACEHOLDER_B = "192.0.2.2"

#: libvirt's memory units, in bytes (``<memory unit=...>``; KiB when absent).
_UNITS: Mapping[str, int] = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}

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
#: Top-level elements dropped with a note (tuning that does not change the guest).
_DROPPED_TOP: Mapping[str, str] = {
    "cputune": "CPU pinning and quotas are host tuning; set them on the QEMU process",
    "numatune": "NUMA placement is host tuning",
    "memtune": "memory limits are host tuning",
    "blkiotune": "I/O limits are host tuning",
    "iothreads": "I/O threads are not configured",
    "sysinfo": "SMBIOS strings are QEMU's defaults",
    "memoryBacking": "the RAM is always a shared file in /dev/shm (no hugepages)",
}
#: Silently ignored: no meaning for the guest, or handled elsewhere.
_IGNORED_TOP = frozenset(
    {
        "name",
        "uuid",
        "genid",
        "title",
        "description",
        "metadata",
        "memory",
        "currentMemory",
        "maxMemory",
        "vcpu",
        "vcpus",
        "os",
        "devices",
        "cpu",
        "features",
        "clock",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "on_lockfailure",
        "pm",
        "seclabel",
        "resource",
        "idmap",
        "perf",
        "keywrap",
    }
)


@dataclass(frozen=True)
class ImportNote:
    """What happened to one part of the domain."""

    severity: Severity
    #: Where in the domain XML (e.g. "disk[1] vdb", "interface[0].model", "video[0]").
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.field}: {self.message}"


@dataclass(frozen=True)
class ImportResult:
    """The definition tree, its TOML text and the notes."""

    data: dict[str, Any]
    text: str
    notes: tuple[ImportNote, ...]

    @property
    def ok(self) -> bool:
        """True when everything essential carried over (no ``cannot`` note)."""
        return not any(n.severity == "cannot" for n in self.notes)


class _Notes:
    def __init__(self) -> None:
        self.items: list[ImportNote] = []

    def add(self, severity: Severity, where: str, message: str) -> None:
        self.items.append(ImportNote(severity, where, message))


def import_domain_file(
    path: str | os.PathLike[str],
    *,
    host_a: str = "",
    host_b: str = "",
    machines: MachineProbe | None = qemu_machines,
) -> ImportResult:
    """:func:`import_domain` on a file.

    Raises:
        ConfigError: the file cannot be read, or as :func:`import_domain`.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", path=str(p)) from err
    return import_domain(text, source=str(p), host_a=host_a, host_b=host_b, machines=machines)


def parse_memory(value: str, unit: str | None, *, source: str | None, key: str) -> int:
    """A libvirt memory amount in bytes.

    Raises:
        ConfigError: not a number, or an unknown unit.
    """
    u = (unit or "KiB").lower()
    if u not in _UNITS:
        raise ConfigError(f"unknown memory unit {unit!r}", path=source, key=key)
    try:
        n = int(value.strip())
    except ValueError as err:
        raise ConfigError(f"{value!r} is not a whole number", path=source, key=key) from err
    return n * _UNITS[u]


def _parse_xml(text: str, source: str | None) -> ET.Element:
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise ConfigError(
            "refusing a document with a DOCTYPE or entity declarations (libvirt writes none)",
            path=source,
        )
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ConfigError(f"not valid XML: {err}", path=source) from err
    if root.tag != "domain":
        raise ConfigError(f"expected a <domain>, got <{root.tag}>", path=source)
    return root


def _safe_name(text: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "-", text.strip())[:64]
    return name or fallback


def import_domain(
    xml_text: str,
    *,
    source: str | None = None,
    host_a: str = "",
    host_b: str = "",
    machines: MachineProbe | None = qemu_machines,
) -> ImportResult:
    """Map a libvirt domain to a VM definition tree and its TOML text.

    ``host_a``/``host_b`` are the hosts' replication addresses (placeholders from the
    documentation range when empty, with a note). ``machines`` lists this QEMU's machine
    types, to pin an alias such as ``pc``.

    Raises:
        ConfigError: not XML, a DOCTYPE or entities, not a domain, no name, or a
            memory or vCPU value that is not a number.
    """
    root = _parse_xml(xml_text, source)
    notes = _Notes()
    data: dict[str, Any] = {}

    raw_name = (root.findtext("name") or "").strip()
    if not raw_name:
        raise ConfigError("the domain has no <name>", path=source, key="name")
    name = _safe_name(raw_name, "vm")
    if name != raw_name:
        notes.add("changed", "name", f"{raw_name!r} becomes {name!r} (letters, digits, - and _)")
    data["name"] = name
    data["machine"] = _machine(root, notes, machines)
    data["vcpus"] = _vcpus(root, notes, source)
    data["memory_mib"] = _memory(root, notes, source)
    dom_type = root.get("type", "kvm")
    data["accel"] = "kvm" if dom_type == "kvm" else "tcg"

    for child in root:
        if child.tag in _DROPPED_TOP:
            notes.add("dropped", child.tag, _DROPPED_TOP[child.tag])
        elif child.tag == "launchSecurity":
            notes.add("cannot", child.tag, "memory encryption (SEV/TDX) cannot be replicated")
        elif child.tag not in _IGNORED_TOP:
            notes.add("dropped", child.tag, "no equivalent in a VM definition")
    _cpu(root, notes)
    _clock(root, notes)

    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    data["display"] = _video(devices, notes)
    data["boot"] = _boot(root, notes)
    disks = _disks(devices, notes)
    nics = _interfaces(devices, notes, name)
    extra = _other_devices(devices, notes)
    if disks:
        data["disk"] = disks
    if nics:
        data["nic"] = nics
    if extra:
        data["device"] = extra

    hosts: dict[str, Any] = {}
    for hname, given, placeholder in (("a", host_a, PLACEHOLDER_A), ("b", host_b, PLACEHOLDER_B)):
        if not given:
            notes.add(
                "changed",
                f"hosts.{hname}.address",
                f"placeholder {placeholder}: set this host's replication address (--host-{hname})",
            )
        hosts[hname] = {"address": given or placeholder}
    data["hosts"] = hosts

    header = [f"VM definition imported from {source or 'a libvirt domain'} ({raw_name})."]
    header.append("Check it with: kemari vm check FILE")
    if notes.items:
        header.append("")
        header.append("Import notes:")
        header += [f"  {n}" for n in notes.items]
    text = to_toml(data, header="\n".join(header))
    return ImportResult(data=data, text=text, notes=tuple(notes.items))


# ---- parts -------------------------------------------------------------------------------


def _machine(root: ET.Element, notes: _Notes, machines: MachineProbe | None) -> str:
    os_type = root.find("os/type")
    arch = os_type.get("arch", "x86_64") if os_type is not None else "x86_64"
    if arch not in ("x86_64", "i686"):
        notes.add("cannot", "os/type.arch", f"{arch}: only x86_64 guests are supported")
    machine = os_type.get("machine", "") if os_type is not None else ""
    catalog: MachineCatalog | None = None
    why = "no machine list given"
    if machines is not None:
        try:
            catalog = machines()
        except SetupError as err:
            why = str(err)
    if catalog is None:
        if not machine or not machine.startswith(("pc-i440fx-", "pc-q35-")):
            notes.add(
                "cannot",
                "os/type.machine",
                f"{machine or '(none)'} cannot be pinned ({why}): set machine to a pinned "
                "pc-i440fx-* or pc-q35-* type of the hosts' QEMU",
            )
        return machine or "pc-i440fx-7.2"
    if not machine:
        pinned = catalog.default or "pc-i440fx-7.2"
        notes.add("changed", "os/type.machine", f"none given: pinned to this QEMU's {pinned}")
        return pinned
    if machine in catalog.aliases:
        pinned = catalog.aliases[machine]
        notes.add(
            "changed",
            "os/type.machine",
            f"{machine} is an alias: pinned to {pinned} (this QEMU's); both hosts must offer it",
        )
        return pinned
    if not machine.startswith(("pc-i440fx-", "pc-q35-")):
        notes.add(
            "cannot",
            "os/type.machine",
            f"{machine}: only pc-i440fx-* and pc-q35-* machine types are supported",
        )
    elif machine not in catalog.names:
        notes.add(
            "cannot",
            "os/type.machine",
            f"{machine} is not offered by this QEMU: the guest would see a different machine",
        )
    return machine


def _vcpus(root: ET.Element, notes: _Notes, source: str | None) -> int:
    el = root.find("vcpu")
    if el is None or not (el.text or "").strip():
        return 1
    try:
        n = int((el.text or "").strip())
    except ValueError as err:
        raise ConfigError(f"{el.text!r} is not a number", path=source, key="vcpu") from err
    current = el.get("current")
    if current is not None and current.strip() != str(n):
        notes.add("changed", "vcpu.current", f"all {n} vCPUs are online from boot (was {current})")
    if n > 64:
        notes.add("cannot", "vcpu", f"{n} vCPUs: at most 64 are supported")
    return n


def _memory(root: ET.Element, notes: _Notes, source: str | None) -> int:
    el = root.find("memory")
    if el is None or not (el.text or "").strip():
        raise ConfigError("the domain has no <memory>", path=source, key="memory")
    size = parse_memory(el.text or "", el.get("unit"), source=source, key="memory")
    mib = -(-size // MiB)
    if size % MiB:
        notes.add("changed", "memory", f"{size} bytes rounded up to {mib} MiB")
    cur = root.find("currentMemory")
    if cur is not None and (cur.text or "").strip():
        cur_size = parse_memory(cur.text or "", cur.get("unit"), source=source, key="currentMemory")
        if cur_size != size:
            notes.add(
                "changed",
                "currentMemory",
                f"{cur_size // MiB} MiB balloon target ignored: the guest gets all {mib} MiB",
            )
    if mib < 16:
        notes.add("cannot", "memory", f"{mib} MiB: at least 16 MiB")
    return mib


def _cpu(root: ET.Element, notes: _Notes) -> None:
    cpu = root.find("cpu")
    if cpu is None:
        return
    mode = cpu.get("mode", "custom")
    model = cpu.findtext("model") or ""
    if mode != "custom" or model:
        notes.add(
            "dropped",
            "cpu",
            f"CPU model {mode}{' ' + model if model else ''}: both hosts run QEMU's default "
            "CPU model, so the guest sees the same CPU after a failover",
        )
    if cpu.find("topology") is not None or cpu.find("numa") is not None:
        notes.add("dropped", "cpu.topology", "vCPUs are plain sockets; no NUMA topology")


def _clock(root: ET.Element, notes: _Notes) -> None:
    clock = root.find("clock")
    if clock is not None and clock.get("offset", "utc") != "utc":
        notes.add(
            "changed",
            "clock.offset",
            f"{clock.get('offset')}: QEMU's RTC runs in UTC (set the guest's clock to UTC)",
        )


def _boot(root: ET.Element, notes: _Notes) -> dict[str, Any]:
    os_el = root.find("os")
    if os_el is None:
        return {"firmware": "bios"}
    kernel = (os_el.findtext("kernel") or "").strip()
    if kernel:
        boot: dict[str, Any] = {"kernel": kernel}
        initrd = (os_el.findtext("initrd") or "").strip()
        if initrd:
            boot["initrd"] = initrd
        cmdline = (os_el.findtext("cmdline") or "").strip()
        if cmdline:
            boot["cmdline"] = cmdline
        return boot
    loader = os_el.find("loader")
    if os_el.get("firmware") == "efi" or (
        loader is not None and (loader.get("type") == "pflash" or "OVMF" in (loader.text or ""))
    ):
        notes.add(
            "cannot",
            "os/loader",
            "UEFI firmware: OVMF keeps its variables in a writable flash the taps cannot hold "
            'back; only firmware = "bios" (SeaBIOS) is supported',
        )
    elif loader is not None:
        notes.add("dropped", "os/loader", f"{(loader.text or '').strip()}: QEMU's SeaBIOS is used")
    for b in os_el.findall("boot"):
        dev = b.get("dev", "hd")
        if dev != "hd":
            notes.add("dropped", "os/boot", f"boot from {dev}: the VM boots from its disk")
    return {"firmware": "bios"}


def _video(devices: ET.Element, notes: _Notes) -> str:
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


def _disks(devices: ET.Element, notes: _Notes) -> list[dict[str, Any]]:
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
        entry: dict[str, Any] = {"name": _safe_name(dev, "disk0"), "path": path}
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


def _interfaces(devices: ET.Element, notes: _Notes, vm_name: str) -> list[dict[str, Any]]:
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
                nic["bridge"] = _safe_name(net, "br0")[:15]
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
    import hashlib

    h = hashlib.sha256(vm_name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def _other_devices(devices: ET.Element, notes: _Notes) -> list[dict[str, Any]]:
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


# ---- TOML ----------------------------------------------------------------------------

_ORDER = ("boot", "disk", "nic", "device", "replication", "tap", "alerts", "paths", "hosts")


def to_toml(data: Mapping[str, Any], *, header: str = "") -> str:
    """A TOML document for a definition tree (scalars, tables, arrays of tables), with
    ``header`` as leading comments.

    Raises:
        ConfigError: a value has no TOML form.
    """
    ordered = {k: v for k, v in data.items() if k not in _ORDER}
    ordered.update({k: data[k] for k in _ORDER if k in data})
    return dump_toml(ordered, header=header)


__all__ = [
    "ImportNote",
    "ImportResult",
    "Severity",
    "import_domain",
    "import_domain_file",
    "parse_memory",
    "to_toml",
]
