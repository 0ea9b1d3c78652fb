"""The ``[hosts.<name>]`` sections of a VM definition, and the file checks as one host
sees them.

What may differ per host is host-local only (the replication address, the network
namespace, the paths, a disk's path and lease device, a NIC's TAP or bridge), never
what the guest sees; each override is remembered in :attr:`HostDef.overridden` so that
an error names the key that set the value (``hosts.b.disk.root.path``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

from kemari_suite.config import PathsConfig, build
from kemari_suite.vm.vmparse import NAME_RE, Reader, check_abs, check_ifname, tname
from kemari_suite.vm.vmtree import (
    DEFAULT_PORT,
    DiskDef,
    HostDef,
    MiB,
    NicDef,
    VMDefinition,
    size_bytes,
)

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_HOST_KEYS = frozenset({"address", "port", "netns", "paths", "disk", "nic"})
#: What may differ per host: host-local names only, never what the guest sees.
_HOST_DISK_KEYS = frozenset({"path", "lease_device"})
_HOST_NIC_KEYS = frozenset({"tap", "bridge"})


def parse_hosts(
    r: Reader,
    raw: Any,
    base_paths: Mapping[str, Any],
    disks: tuple[DiskDef, ...],
    nics: tuple[NicDef, ...],
) -> tuple[HostDef, ...]:
    if raw is None:
        raise r.error("hosts", "missing: [hosts.<name>] for each of the two hosts")
    if not isinstance(raw, dict):
        raise r.error("hosts", f"expected a table, got {tname(raw)}")
    if len(raw) != 2:
        raise r.error(
            "hosts", f"exactly two hosts are needed, found {len(raw)} ({', '.join(raw) or '-'})"
        )
    hosts: list[HostDef] = []
    for hname, item in raw.items():
        k = f"hosts.{hname}"
        if not NAME_RE.match(hname):
            raise r.error(k, "host names are letters, digits, '-' or '_'")
        t = r.table(item, k, _HOST_KEYS)
        if "address" not in t:
            raise r.error(f"{k}.address", "missing: this host's replication address")
        address = r.str_(t["address"], f"{k}.address")
        _check_address(r, f"{k}.address", address)
        port = r.int_(t.get("port", DEFAULT_PORT), f"{k}.port", 1, 65535)
        netns = r.str_(t.get("netns", ""), f"{k}.netns")
        if netns and not NAME_RE.match(netns):
            raise r.error(f"{k}.netns", f"{netns!r}: not a valid namespace name")
        own_paths = r.table(
            t.get("paths", {}),
            f"{k}.paths",
            frozenset(f.name for f in dataclasses.fields(PathsConfig)),
        )
        paths = build(PathsConfig, {**base_paths, **own_paths}, path=r.source, prefix=f"{k}.paths")
        overridden: set[str] = set()
        host_disks = _override_disks(r, k, t.get("disk", {}), disks, overridden)
        host_nics = _override_nics(r, k, t.get("nic", {}), nics, overridden)
        hosts.append(
            HostDef(
                name=hname,
                address=address,
                port=port,
                netns=netns,
                paths=paths,
                disks=host_disks,
                nics=host_nics,
                overridden=frozenset(overridden),
            )
        )
    a, b = hosts
    if a.replication_address == b.replication_address:
        raise r.error(
            f"hosts.{b.name}.address",
            f"same replication address and port as hosts.{a.name} ({a.replication_address})",
        )
    return tuple(hosts)


def _check_address(r: Reader, key: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(address):
        raise r.error(key, f"{address!r}: expected an IP address or a host name")


def _override_disks(
    r: Reader, k: str, raw: Any, disks: tuple[DiskDef, ...], overridden: set[str]
) -> tuple[DiskDef, ...]:
    by_name = {d.name: i for i, d in enumerate(disks)}
    out = list(disks)
    if not isinstance(raw, dict):
        raise r.error(f"{k}.disk", f"expected a table, got {tname(raw)}")
    for dname, changes in raw.items():
        if dname not in by_name:
            raise r.error(
                f"{k}.disk.{dname}",
                f"no disk named {dname!r} (disks: {', '.join(by_name) or 'none'})",
            )
        dk = f"{k}.disk.{dname}"
        ct = r.table(changes, dk, _HOST_DISK_KEYS)
        values: dict[str, Any] = {}
        for key, value in ct.items():
            values[key] = r.str_(value, f"{dk}.{key}")
            check_abs(r, f"{dk}.{key}", values[key])
            overridden.add(f"disk.{dname}.{key}")
        i = by_name[dname]
        out[i] = dataclasses.replace(out[i], **values)
    return tuple(out)


def _override_nics(
    r: Reader, k: str, raw: Any, nics: tuple[NicDef, ...], overridden: set[str]
) -> tuple[NicDef, ...]:
    out = list(nics)
    if not isinstance(raw, dict):
        raise r.error(f"{k}.nic", f"expected a table, got {tname(raw)}")
    for idx, changes in raw.items():
        if idx not in {str(i) for i in range(len(nics))}:
            raise r.error(f"{k}.nic.{idx}", f"no nic[{idx}] (the definition has {len(nics)} NIC)")
        nk = f"{k}.nic.{idx}"
        ct = r.table(changes, nk, _HOST_NIC_KEYS)
        values: dict[str, Any] = {}
        for key, value in ct.items():
            values[key] = r.str_(value, f"{nk}.{key}")
            if values[key]:
                check_ifname(r, f"{nk}.{key}", values[key])
            overridden.add(f"nic.{idx}.{key}")
        i = int(idx)
        nic = dataclasses.replace(out[i], **values)
        if not nic.tap and not nic.bridge:
            raise r.error(f"{nk}.tap", "leaves the NIC with neither tap nor bridge")
        out[i] = nic
    return tuple(out)


def check_host_files(r: Reader, defn: VMDefinition, host: str | None) -> None:
    """Existence and size checks, as ``host`` sees the files (top level when None)."""
    for key, p in (("boot.kernel", defn.boot.kernel), ("boot.initrd", defn.boot.initrd)):
        if p is not None and not p.is_file():
            raise r.error(key, f"{p}: no such file")
    hdef = defn.host(host) if host is not None else None
    disks = hdef.disks if hdef is not None else defn.disks
    for i, disk in enumerate(disks):
        key = f"disk[{i}].path"
        if hdef is not None and f"disk.{disk.name}.path" in hdef.overridden:
            key = f"hosts.{hdef.name}.disk.{disk.name}.path"
        try:
            st = os.stat(disk.path)
        except FileNotFoundError as err:
            hint = ""
            if disk.backend == "drbd":
                hint = f" (is DRBD resource {disk.resource} up? `drbdadm up {disk.resource}`)"
            raise r.error(key, f"{disk.path} does not exist{hint}") from err
        except OSError as err:
            raise r.error(key, f"{disk.path}: {err.strerror}") from err
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise r.error(key, f"{disk.path} is neither a regular file nor a block device")
        if disk.size_mib is not None:
            try:
                size = size_bytes(disk.path)
            except OSError as err:
                raise r.error(key, f"{disk.path}: cannot read its size: {err.strerror}") from err
            if size != disk.size_mib * MiB:
                raise r.error(
                    key,
                    f"size mismatch: {disk.path} has {size} bytes ({size / MiB:g} MiB), "
                    f"disk[{i}].size_mib = {disk.size_mib}",
                )


__all__ = ["check_host_files", "parse_hosts"]
