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

The mappers are in :mod:`kemari_suite.vm.libvirtdomain` (the top level) and
:mod:`kemari_suite.vm.libvirtdevices` (``<devices>``); the notes in
:mod:`kemari_suite.vm.libvirtnotes`.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import dump_toml
from kemari_suite.errors import ConfigError
from kemari_suite.vm.libvirtdevices import (
    map_disks,
    map_interfaces,
    map_other_devices,
    map_video,
)
from kemari_suite.vm.libvirtdomain import (
    map_boot,
    map_clock,
    map_cpu,
    map_machine,
    map_memory,
    map_vcpus,
    note_top_level,
    parse_memory,
)
from kemari_suite.vm.libvirtnotes import ImportNote, Notes, Severity, safe_name
from kemari_suite.vm.machines import MachineProbe, qemu_machines

#: Placeholder replication addresses (RFC 5737 documentation range) when none are given.
PLACEHOLDER_A = "192.0.2.1"
PLACEHOLDER_B = "192.0.2.2"


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
    notes = Notes()
    data: dict[str, Any] = {}

    raw_name = (root.findtext("name") or "").strip()
    if not raw_name:
        raise ConfigError("the domain has no <name>", path=source, key="name")
    name = safe_name(raw_name, "vm")
    if name != raw_name:
        notes.add("changed", "name", f"{raw_name!r} becomes {name!r} (letters, digits, - and _)")
    data["name"] = name
    data["machine"] = map_machine(root, notes, machines)
    data["vcpus"] = map_vcpus(root, notes, source)
    data["memory_mib"] = map_memory(root, notes, source)
    dom_type = root.get("type", "kvm")
    data["accel"] = "kvm" if dom_type == "kvm" else "tcg"

    note_top_level(root, notes)
    map_cpu(root, notes)
    map_clock(root, notes)

    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    data["display"] = map_video(devices, notes)
    data["boot"] = map_boot(root, notes)
    disks = map_disks(devices, notes)
    nics = map_interfaces(devices, notes, name)
    extra = map_other_devices(devices, notes)
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
