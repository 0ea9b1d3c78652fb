"""Reading the sections of a VM definition: typed access to the raw TOML tree, and the
checks of ``machine``, ``[boot]``, ``[[disk]]``, ``[[nic]]``, ``[[device]]`` and the
configuration sections it shares with :mod:`kemari_suite.config`.

Every failure is a :class:`~kemari_suite.errors.ConfigError` naming the file and the key
(``disk[0].path``, ``nic[0].model``, ``device[1].driver``). The per-host sections are
read by :mod:`kemari_suite.vm.vmhosts`; :func:`kemari_suite.vm.vmdef.parse_vmdef` puts
the pieces together.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from kemari_suite.config import DiskBackendKind, DiskFencing, build
from kemari_suite.errors import ConfigError, SetupError
from kemari_suite.vm.machines import MachineCatalog, MachineProbe
from kemari_suite.vm.vmtree import (
    ALLOWED_DEVICES,
    DEFAULT_DISK_NAME,
    MAX_DISKS,
    MAX_NICS,
    NIC_MODELS,
    BootDef,
    DeviceDef,
    DiskDef,
    Firmware,
    NicDef,
)

#: Devices refused with a reason of their own (not just "not on the list").
_REFUSED_DEVICES: Mapping[str, str] = {
    "virtio-balloon-pci": (
        "ballooning discards guest RAM behind the dirty-page tracker; size memory_mib instead"
    ),
    "virtio-balloon": (
        "ballooning discards guest RAM behind the dirty-page tracker; size memory_mib instead"
    ),
    "pci-assign": "device passthrough: host hardware state cannot be replicated",
    "virtio-serial-pci": "a channel to host programs is an output the taps cannot hold back",
    "virtio-net-pci": "the NIC is declared with [[nic]], not [[device]]",
    "virtio-blk-pci": "the disk is declared with [[disk]], not [[device]]",
}
#: Device properties that attach a host-side backend (an untapped output or a second
#: disk) and are therefore never accepted in ``[[device]]``.
_BACKEND_PROPS = frozenset(
    {"chardev", "netdev", "drive", "rng", "memdev", "fsdev", "romfile", "host", "sysfsdev"}
)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_DRBD_RES_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_PROP_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_MACHINE_FAMILIES = ("pc-i440fx-", "pc-q35-")
_MAX_CMDLINE = 2047

_BOOT_KEYS = frozenset({"kernel", "initrd", "cmdline", "firmware"})
_DISK_KEYS = frozenset(
    {
        "name",
        "path",
        "backend",
        "size_mib",
        "resource",
        "lease_device",
        "lease_offset",
        "fencing",
        "unprotected_output",
    }
)
_NIC_KEYS = frozenset({"mac", "model", "tap", "bridge", "ip", "vhost", "unprotected_output"})
_DEVICE_KEYS = frozenset({"driver", "props", "unprotected_output"})
#: Extra devices refused because they are an output path of their own: accepted with
#: ``unprotected_output = true`` (the others break replication itself and never are).
_OUTPUT_DEVICES = frozenset({"virtio-serial-pci", "usb-redir"})
#: Keys of the sections that the definition derives per host.
_DERIVED = {
    "replication.listen": "derived per host from hosts.<name>.address and port",
    "replication.peer": "derived per host from the other host's address and port",
    "tap.host_tap": "derived per host from nic[0].tap (or hosts.<name>.nic.0.tap)",
}


class Reader:
    """Typed access to the raw TOML tree; every failure names the file and the key."""

    def __init__(self, source: str | None) -> None:
        self.source = source

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(reason, path=self.source, key=key)

    def table(self, value: Any, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {tname(value)}")
        for k in value:
            if k not in allowed:
                raise self.error(
                    f"{key}.{k}" if key else k, f"unknown key (known: {', '.join(sorted(allowed))})"
                )
        return value

    def str_(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {tname(value)}")
        return value

    def int_(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {tname(value)}")
        if not lo <= value <= hi:
            raise self.error(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def bool_(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {tname(value)}")
        return value

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        text = self.str_(value, key)
        if text not in allowed:
            raise self.error(key, f"{text!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return text

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {tname(value)}")
        return value


def tname(value: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}
    names.update({dict: "a table", list: "an array"})
    return names.get(type(value), type(value).__name__) + (
        f" ({value!r})" if isinstance(value, str | int | float) else ""
    )


def check_machine(r: Reader, machine: str, machines: MachineProbe | None, notes: list[str]) -> str:
    catalog: MachineCatalog | None = None
    if machines is not None:
        try:
            catalog = machines()
        except SetupError as err:
            notes.append(f"machine type not checked against QEMU ({err})")
    else:
        notes.append("machine type not checked against QEMU")
    if catalog is not None and machine in catalog.aliases:
        raise r.error(
            "machine",
            f"{machine!r} is an alias (of {catalog.aliases[machine]!r} in this QEMU): "
            f"pin the machine type, e.g. machine = {catalog.aliases[machine]!r}, so that the "
            "secondary starts exactly the same machine",
        )
    if machine in ("pc", "q35"):
        raise r.error(
            "machine",
            f"{machine!r} is an alias: pin the machine type (e.g. pc-i440fx-7.2 or pc-q35-7.2)"
            " so that the secondary starts exactly the same machine",
        )
    if not machine.startswith(_MACHINE_FAMILIES):
        raise r.error(
            "machine", f"{machine!r}: only pinned pc-i440fx-* and pc-q35-* machine types work"
        )
    if catalog is not None and machine not in catalog.names:
        family = machine.rsplit("-", 1)[0]
        near = sorted(n for n in catalog.names if n.startswith(family + "-"))[-3:]
        raise r.error(
            "machine",
            f"{machine!r} is not a machine type of this QEMU"
            + (f" (it has e.g. {', '.join(near)})" if near else ""),
        )
    return machine


def parse_boot(r: Reader, raw: Any) -> BootDef:
    if raw is None:
        raise r.error("boot", 'missing: give kernel (direct kernel boot) or firmware = "bios"')
    t = r.table(raw, "boot", _BOOT_KEYS)
    kernel = r.str_(t["kernel"], "boot.kernel") if "kernel" in t else None
    initrd = r.str_(t["initrd"], "boot.initrd") if "initrd" in t else None
    cmdline = r.str_(t.get("cmdline", ""), "boot.cmdline")
    if "firmware" in t:
        if t["firmware"] in ("uefi", "efi", "ovmf"):
            raise r.error(
                "boot.firmware",
                "UEFI is not supported: OVMF keeps its variables in a writable flash, an "
                'output the taps cannot hold back; use firmware = "bios" or a kernel',
            )
        firmware = cast(Firmware, r.choice(t["firmware"], "boot.firmware", ("bios",)))
        if kernel is not None:
            raise r.error(
                "boot.firmware", "give either kernel (direct kernel boot) or firmware, not both"
            )
        for key in ("initrd", "cmdline"):
            if key in t:
                raise r.error(f"boot.{key}", "only with kernel (direct kernel boot)")
        return BootDef(firmware=firmware)
    if not kernel:
        raise r.error("boot.kernel", 'missing: give kernel or firmware = "bios"')
    for key, value in (("boot.kernel", kernel), ("boot.initrd", initrd)):
        if value is not None and not value.startswith("/"):
            raise r.error(key, f"{value!r}: must be an absolute path")
    if "\n" in cmdline or len(cmdline.encode()) > _MAX_CMDLINE:
        raise r.error("boot.cmdline", f"must be one line of at most {_MAX_CMDLINE} bytes")
    return BootDef(
        kernel=Path(kernel), initrd=Path(initrd) if initrd else None, cmdline=cmdline.strip()
    )


def parse_disks(r: Reader, raw: Any) -> tuple[DiskDef, ...]:
    disks: list[DiskDef] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(r.array(raw, "disk")):
        k = f"disk[{i}]"
        t = r.table(item, k, _DISK_KEYS)
        name = r.str_(t.get("name", DEFAULT_DISK_NAME), f"{k}.name")
        if not NAME_RE.match(name):
            raise r.error(f"{k}.name", "must be 1-64 letters, digits, '-' or '_'")
        if name in seen:
            raise r.error(f"{k}.name", f"{name!r} is also disk[{seen[name]}]'s name")
        seen[name] = i
        backend = cast(
            DiskBackendKind,
            r.choice(t.get("backend", "builtin"), f"{k}.backend", ("builtin", "drbd", "shared")),
        )
        resource = r.str_(t.get("resource", ""), f"{k}.resource")
        if backend == "drbd":
            if not _DRBD_RES_RE.match(resource):
                raise r.error(f"{k}.resource", 'backend = "drbd" needs the DRBD resource name')
            default_path = f"/dev/drbd/by-res/{resource}/0"
        else:
            if resource:
                raise r.error(f"{k}.resource", 'only with backend = "drbd"')
            default_path = ""
        path = r.str_(t.get("path", default_path), f"{k}.path")
        if not path:
            raise r.error(f"{k}.path", "missing: the raw image file or block device")
        check_abs(r, f"{k}.path", path)
        size = t.get("size_mib")
        size_mib = r.int_(size, f"{k}.size_mib", 1, 1 << 40) if size is not None else None
        lease_device = r.str_(t.get("lease_device", ""), f"{k}.lease_device")
        if lease_device:
            check_abs(r, f"{k}.lease_device", lease_device)
        lease_offset = r.int_(t.get("lease_offset", 0), f"{k}.lease_offset", 0, 1 << 62)
        fencing = cast(DiskFencing, r.choice(t.get("fencing", ""), f"{k}.fencing", ("", "scsi-pr")))
        if fencing and backend != "shared":
            raise r.error(
                f"{k}.fencing", f'"scsi-pr" fences a shared LUN: backend = "shared", not {backend}'
            )
        unprotected = r.bool_(t.get("unprotected_output", False), f"{k}.unprotected_output")
        if unprotected and backend != "builtin":
            raise r.error(
                f"{k}.unprotected_output",
                f'only a backend = "builtin" disk can be unprotected: a {backend} disk is '
                "shared with the standby, which would see writes its memory never made",
            )
        disks.append(
            DiskDef(
                name=name,
                path=path,
                backend=backend,
                size_mib=size_mib,
                resource=resource,
                lease_device=lease_device,
                lease_offset=lease_offset,
                fencing=fencing,
                unprotected_output=unprotected,
            )
        )
    if len(disks) > MAX_DISKS:
        raise r.error(
            f"disk[{MAX_DISKS}]",
            f"at most {MAX_DISKS} disk per VM is protected in this version (found {len(disks)})",
        )
    return tuple(disks)


def check_abs(r: Reader, key: str, path: str) -> None:
    if not path.startswith("/") or "\n" in path:
        raise r.error(key, f"{path!r}: must be an absolute path")


def check_ifname(r: Reader, key: str, name: str) -> None:
    if not _IFNAME_RE.match(name):
        raise r.error(key, f"{name!r}: not a valid interface name (1-15 characters)")


def parse_nics(r: Reader, raw: Any) -> tuple[NicDef, ...]:
    nics: list[NicDef] = []
    macs: dict[str, int] = {}
    for i, item in enumerate(r.array(raw, "nic")):
        k = f"nic[{i}]"
        t = r.table(item, k, _NIC_KEYS)
        if t.get("vhost", False) is not False:
            raise r.error(
                f"{k}.vhost",
                "vhost is not supported: the frame proxy needs the guest's packets in userspace",
            )
        if "mac" not in t:
            raise r.error(f"{k}.mac", "missing (required: both hosts must give the same MAC)")
        mac = r.str_(t["mac"], f"{k}.mac").lower()
        if not _MAC_RE.match(mac):
            raise r.error(f"{k}.mac", f"{mac!r}: expected six hex octets like 52:54:00:12:34:56")
        if int(mac[:2], 16) & 1:
            raise r.error(f"{k}.mac", f"{mac!r} is a multicast address")
        if mac in macs:
            raise r.error(f"{k}.mac", f"{mac} is also nic[{macs[mac]}]'s MAC")
        macs[mac] = i
        model = r.str_(t.get("model", "virtio-net-pci"), f"{k}.model")
        if model not in NIC_MODELS:
            raise r.error(
                f"{k}.model",
                f"{model!r} is not supported: only virtio-net-pci (the network frame proxy "
                "speaks virtio)",
            )
        tap = r.str_(t.get("tap", ""), f"{k}.tap")
        bridge = r.str_(t.get("bridge", ""), f"{k}.bridge")
        if not tap and not bridge:
            raise r.error(f"{k}.tap", "missing: give tap (a host TAP) or bridge")
        if tap:
            check_ifname(r, f"{k}.tap", tap)
        if bridge:
            check_ifname(r, f"{k}.bridge", bridge)
        ip = r.str_(t.get("ip", ""), f"{k}.ip")
        if ip:
            try:
                if "/" not in ip:
                    raise ValueError("expected A.B.C.D/NN")
                ipaddress.IPv4Interface(ip)
            except ValueError as err:
                raise r.error(f"{k}.ip", f"{ip!r}: {err}") from err
        unprotected = r.bool_(t.get("unprotected_output", False), f"{k}.unprotected_output")
        nics.append(
            NicDef(
                mac=mac, model=model, tap=tap, bridge=bridge, ip=ip, unprotected_output=unprotected
            )
        )
    if len(nics) > MAX_NICS:
        raise r.error(
            f"nic[{MAX_NICS}]",
            f"at most {MAX_NICS} NIC per VM is protected in this version (found {len(nics)})",
        )
    return tuple(nics)


def device_refusal(driver: str, *, unprotected: bool = False) -> str | None:
    """Why ``driver`` cannot be an extra device, or None when it is allowed.
    ``unprotected``: the operator accepts its output path (``unprotected_output``), which
    admits a device refused only for being an output or unknown, never one that breaks
    replication (passthrough, vhost, ballooning) or the NIC and disk of their own tables."""
    if driver in ALLOWED_DEVICES:
        return None
    if unprotected and (
        driver in _OUTPUT_DEVICES
        or (
            driver not in _REFUSED_DEVICES
            and not driver.startswith(("vfio", "vhost"))
            and not driver.startswith(("virtio-net", "virtio-blk", "virtio-balloon"))
        )
    ):
        return None
    if driver in _REFUSED_DEVICES:
        return _REFUSED_DEVICES[driver]
    if driver.startswith("vfio"):
        return "device passthrough: host hardware state cannot be replicated"
    if driver.startswith("vhost"):
        return "vhost devices move the device out of QEMU, beyond replication and the taps"
    return f"not on the list of devices known to replicate safely ({', '.join(ALLOWED_DEVICES)})"


def parse_devices(r: Reader, raw: Any) -> tuple[DeviceDef, ...]:
    devices: list[DeviceDef] = []
    for i, item in enumerate(r.array(raw, "device")):
        k = f"device[{i}]"
        t = r.table(item, k, _DEVICE_KEYS)
        if "driver" not in t:
            raise r.error(f"{k}.driver", "missing (required)")
        driver = r.str_(t["driver"], f"{k}.driver")
        unprotected = r.bool_(t.get("unprotected_output", False), f"{k}.unprotected_output")
        why = device_refusal(driver, unprotected=unprotected)
        if why is not None:
            raise r.error(f"{k}.driver", f"{driver!r} is not supported: {why}")
        props: list[tuple[str, str]] = []
        raw_props = t.get("props", {})
        if not isinstance(raw_props, dict):
            raise r.error(f"{k}.props", f"expected a table, got {tname(raw_props)}")
        for pk, pv in raw_props.items():
            pkey = f"{k}.props.{pk}"
            if not _PROP_RE.match(pk) or pk == "driver":
                raise r.error(pkey, "not a device property name")
            if pk in _BACKEND_PROPS:
                raise r.error(pkey, "attaches a host backend; not allowed on extra devices")
            if isinstance(pv, bool):
                value = "on" if pv else "off"
            elif isinstance(pv, int | str):
                value = str(pv)
            else:
                raise r.error(pkey, f"expected a string, integer or boolean, got {tname(pv)}")
            props.append((pk, value))
        devices.append(DeviceDef(driver=driver, props=tuple(props), unprotected_output=unprotected))
    return tuple(devices)


def parse_section(r: Reader, top: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    raw = top.get(name, {})
    if not isinstance(raw, dict):
        raise r.error(name, f"expected a table, got {tname(raw)}")
    for key in raw:
        why = _DERIVED.get(f"{name}.{key}")
        if why is not None:
            raise r.error(f"{name}.{key}", f"not set in a VM definition: {why}")
    return build(cls, raw, path=r.source, prefix=name)


__all__ = [
    "NAME_RE",
    "Reader",
    "check_abs",
    "check_ifname",
    "check_machine",
    "device_refusal",
    "parse_boot",
    "parse_devices",
    "parse_disks",
    "parse_nics",
    "parse_section",
    "tname",
]
