"""VM definitions: one TOML file from which both hosts derive the same QEMU command line.

An operator describes a VM once (machine, memory, boot, its disk and NIC, extra
devices, the replication settings) and says per host only what differs there (the
replication address, the network namespace, the disk path, the TAP)::

    name = "web1"
    machine = "pc-i440fx-7.2"
    memory_mib = 256

    [boot]
    kernel = "/var/lib/kemari/vmlinuz"

    [[disk]]
    name = "root"
    path = "/var/lib/kemari/web1.img"

    [hosts.a]
    address = "10.0.0.1"
    [hosts.b]
    address = "10.0.0.2"
    disk.root.path = "/dev/sdb"

:func:`load_vmdef` checks everything it can before a VM is started (unknown keys,
types, files, sizes, the machine type against this QEMU, unsupported devices) and
raises :class:`~kemari_suite.errors.ConfigError` naming the key (``disk[0].path``,
``nic[0].model``, ``device[1].driver``, ``hosts.b.disk.root.path``).
:meth:`VMDefinition.for_host` gives a host's :class:`HostView`: its
:class:`~kemari_suite.config.KemariConfig` and its
:class:`~kemari_suite.vm.spec.VMSpec`. :func:`identity` is the host-independent part of
the command line; the two hosts compare :func:`identity_digest` before protecting and
:func:`diff_identity` names the fields that differ.

This module is the entry point and re-exports the pieces, one module per concern::

    vm/machines.py   the QEMU machine catalogue
    vm/vmtree.py     the definition tree, a host's view of it, its QEMU command line
    vm/vmparse.py    reading and checking the top-level sections
    vm/vmhosts.py    the per-host sections and the file checks
    vm/vmident.py    identity, identity digest and diff, warnings

The format is documented in docs/vm-definition.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from kemari_suite.config import AlertConfig, PathsConfig, ReplicationConfig, TapConfig, read_toml
from kemari_suite.vm.machines import MachineCatalog, MachineProbe, qemu_machines
from kemari_suite.vm.vmhosts import check_host_files, parse_hosts
from kemari_suite.vm.vmident import check_warnings, diff_identity, identity, identity_digest
from kemari_suite.vm.vmparse import (
    NAME_RE,
    Reader,
    check_machine,
    device_refusal,
    parse_boot,
    parse_devices,
    parse_disks,
    parse_nics,
    parse_section,
)
from kemari_suite.vm.vmtree import (
    ALLOWED_DEVICES,
    DISPLAYS,
    MAX_DISKS,
    MAX_NICS,
    VIDEO_RAM_MIB,
    AccelName,
    BootDef,
    DeviceDef,
    DiskDef,
    Display,
    HostDef,
    HostView,
    NicDef,
    VMDefinition,
    guest_cmdline,
    masked_argv,
)

_TOP_KEYS = frozenset(
    {
        "name",
        "machine",
        "vcpus",
        "memory_mib",
        "accel",
        "display",
        "boot",
        "disk",
        "nic",
        "device",
        "replication",
        "tap",
        "alerts",
        "paths",
        "hosts",
    }
)


def load_vmdef(
    path: str | os.PathLike[str],
    *,
    host: str | None = None,
    machines: MachineProbe | None = qemu_machines,
    check_files: bool = True,
) -> VMDefinition:
    """Load and validate a VM definition file.

    Files are checked as ``host`` sees them (its per-host overrides applied), or as
    written at the top level when ``host`` is None. ``machines`` lists this QEMU's
    machine types (None, or a probe that raises :class:`SetupError`: only the form of
    the machine name is checked, and a note says so). ``check_files=False`` skips the
    existence and size checks of disks, kernel and initrd.

    Raises:
        ConfigError: naming the file and the key of the first problem: unknown keys,
            wrong types, a missing disk file or device (``disk[0].path``), a size
            mismatch, an alias or unknown machine type, a missing kernel or initrd,
            both kernel and firmware, an unsupported device or NIC model, a duplicate
            MAC, more than one disk or NIC, an unknown host.
    """
    p = Path(path)
    data = read_toml(p)
    return parse_vmdef(data, source=p, host=host, machines=machines, check_files=check_files)


def parse_vmdef(
    data: Mapping[str, Any],
    *,
    source: Path | None = None,
    host: str | None = None,
    machines: MachineProbe | None = qemu_machines,
    check_files: bool = True,
) -> VMDefinition:
    """:func:`load_vmdef` for an already parsed TOML tree (``source`` names it in errors).

    Raises:
        ConfigError: as :func:`load_vmdef`.
    """
    r = Reader(str(source) if source is not None else None)
    top = r.table(dict(data), "", _TOP_KEYS)
    notes: list[str] = []

    for key in ("name", "machine"):
        if key not in top:
            raise r.error(key, "missing (required)")
    name = r.str_(top["name"], "name")
    if not NAME_RE.match(name):
        raise r.error("name", "must be 1-64 letters, digits, '-' or '_'")
    machine = check_machine(r, r.str_(top["machine"], "machine"), machines, notes)
    vcpus = r.int_(top.get("vcpus", 1), "vcpus", 1, 64)
    memory_mib = r.int_(top.get("memory_mib", 128), "memory_mib", 16, 1 << 22)
    accel = cast(AccelName, r.choice(top.get("accel", "auto"), "accel", ("auto", "tcg", "kvm")))
    display = cast(Display, r.choice(top.get("display", "none"), "display", DISPLAYS))

    boot = parse_boot(r, top.get("boot"))
    disks = parse_disks(r, top.get("disk", []))
    nics = parse_nics(r, top.get("nic", []))
    devices = parse_devices(r, top.get("device", []))
    replication = parse_section(r, top, "replication", ReplicationConfig)
    tap = parse_section(r, top, "tap", TapConfig)
    alerts = parse_section(r, top, "alerts", AlertConfig)
    base_paths = top.get("paths", {})
    r.table(base_paths, "paths", frozenset(f.name for f in dataclasses.fields(PathsConfig)))
    hosts = parse_hosts(r, top.get("hosts"), base_paths, disks, nics)
    if replication.tiebreaker == "lease":
        for h in hosts:
            if not h.disks or not h.disks[0].lease_device:
                where = f" on host {h.name}" if h.disks else ""
                raise r.error(
                    "disk[0].lease_device",
                    'replication.tiebreaker = "lease" needs the lease device (the shared '
                    f"disk itself, or another shared device){where}",
                )

    defn = VMDefinition(
        name=name,
        machine=machine,
        vcpus=vcpus,
        memory_mib=memory_mib,
        accel=accel,
        display=display,
        boot=boot,
        disks=disks,
        nics=nics,
        devices=devices,
        replication=replication,
        tap=tap,
        alerts=alerts,
        hosts=hosts,
        source=source,
        notes=tuple(notes),
    )
    if host is not None:
        defn.host(host)
    if check_files:
        check_host_files(r, defn, host)
    return defn


__all__ = [
    "ALLOWED_DEVICES",
    "DISPLAYS",
    "MAX_DISKS",
    "MAX_NICS",
    "VIDEO_RAM_MIB",
    "BootDef",
    "DeviceDef",
    "DiskDef",
    "HostDef",
    "HostView",
    "MachineCatalog",
    "MachineProbe",
    "NicDef",
    "VMDefinition",
    "check_warnings",
    "device_refusal",
    "diff_identity",
    "guest_cmdline",
    "identity",
    "identity_digest",
    "load_vmdef",
    "masked_argv",
    "parse_vmdef",
    "qemu_machines",
]
