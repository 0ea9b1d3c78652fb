"""Mapping the top level of a libvirt domain: machine type, vCPUs, memory, CPU model,
clock and boot, and what happens to the other top-level elements.

Each ``map_*`` function reads one part of the ``<domain>`` element, returns its value
in the VM definition tree and notes what changed (:mod:`kemari_suite.vm.libvirtnotes`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from kemari_suite.errors import ConfigError, SetupError
from kemari_suite.vm.libvirtnotes import MiB, Notes
from kemari_suite.vm.machines import MachineCatalog, MachineProbe

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


def note_top_level(root: ET.Element, notes: Notes) -> None:
    """Note what happens to each top-level element that no mapper reads."""
    for child in root:
        if child.tag in _DROPPED_TOP:
            notes.add("dropped", child.tag, _DROPPED_TOP[child.tag])
        elif child.tag == "launchSecurity":
            notes.add("cannot", child.tag, "memory encryption (SEV/TDX) cannot be replicated")
        elif child.tag not in _IGNORED_TOP:
            notes.add("dropped", child.tag, "no equivalent in a VM definition")


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


def map_machine(root: ET.Element, notes: Notes, machines: MachineProbe | None) -> str:
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


def map_vcpus(root: ET.Element, notes: Notes, source: str | None) -> int:
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


def map_memory(root: ET.Element, notes: Notes, source: str | None) -> int:
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


def map_cpu(root: ET.Element, notes: Notes) -> None:
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


def map_clock(root: ET.Element, notes: Notes) -> None:
    clock = root.find("clock")
    if clock is not None and clock.get("offset", "utc") != "utc":
        notes.add(
            "changed",
            "clock.offset",
            f"{clock.get('offset')}: QEMU's RTC runs in UTC (set the guest's clock to UTC)",
        )


def map_boot(root: ET.Element, notes: Notes) -> dict[str, Any]:
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


__all__ = [
    "map_boot",
    "map_clock",
    "map_cpu",
    "map_machine",
    "map_memory",
    "map_vcpus",
    "note_top_level",
    "parse_memory",
]
