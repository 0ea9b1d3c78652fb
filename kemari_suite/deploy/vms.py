"""Several protected VMs on one host pair: the inventory's ``kemari_vms`` list, planned.

Each entry of ``kemari_vms`` is one VM; the playbooks render, on each host of the pair,
one config ``/etc/kemari/vms/<name>.toml`` and one enabled unit instance per VM:
``kemari-protect@<name>.service`` on the host that runs it first (its ``primary``),
``kemari-standby@<name>.service`` on the other. Primaries may sit on either host.

Allocation (no clashes, nothing to write by hand): the VM at position ``i`` of the list
(from 0) gets

============================  ============================================================
replication port              ``kemari_repl_port + i`` (7410, 7411, ...); ``repl_port``
                              sets it
DRBD port                     ``kemari_drbd_port + i`` (7789, 7790, ...); ``drbd_port``
DRBD minor                    ``kemari_drbd.minor + i``; ``drbd.minor`` sets it
DRBD resource                 the VM's name
guest MAC                     ``52:54:00`` and three bytes of SHA-256 of the name, unless
                              ``vm.mac`` is set
control socket, QMP, RAM      from the name already: ``<run_dir>/kemari-<name>/``,
file, artifacts               ``<shm_dir>/kemari-<name>.ram``,
                              ``<run_dir>/artifacts/<name>-<role>-<stamp>``
============================  ============================================================

Ports follow the list's order: append new VMs at the end (or pin ``repl_port`` and
``drbd_port``), since moving a VM up the list moves its ports. Every VM must differ in
name, ports and minor; the plan refuses clashes, naming the entry.

No I/O here: :func:`plan` maps inventory values to the values the tasks write.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kemari_suite.errors import ConfigError

#: Where the playbooks put each VM's config (``%i`` is the unit instance: the VM name).
VMS_DIR = "/etc/kemari/vms"
#: The template units, by the role the host takes first for a VM.
TEMPLATE_UNITS = {"primary": "kemari-protect@.service", "secondary": "kemari-standby@.service"}
COMMANDS = {"primary": "protect", "secondary": "standby"}
#: A VM name is a unit instance name and a file name: no escaping needed.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Keys of an entry; the sections are merged over the pair's shared ones.
_KEYS = frozenset(
    {"name", "primary", "repl_port", "drbd_port", "vm", "replication", "disk", "config", "drbd"}
)


@dataclass(frozen=True)
class PlannedVM:
    """One VM as seen from one host of the pair."""

    name: str
    index: int
    #: The role this host takes first for the VM.
    role: str
    primary: str
    secondary: str
    command: str
    #: The unit instance, e.g. ``kemari-protect@web.service``, and its template.
    unit: str
    template: str
    #: The unit instance of the other role (disabled here if the VM moved).
    other_unit: str
    config_path: str
    repl_port: int
    drbd_port: int
    drbd_minor: int
    mac: str
    #: ``disk.backend`` of the VM (the drbd role writes resources for "drbd" only).
    disk_backend: str
    #: The config sections, as :func:`kemari_suite.deploy.render.render_config` takes.
    tree: dict[str, dict[str, Any]]
    #: The DRBD resource settings (without nodes) and the pair as DRBD nodes.
    drbd: dict[str, Any]
    drbd_nodes: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mac_for(name: str) -> str:
    """A locally administered MAC derived from a VM name (QEMU's 52:54:00 prefix)."""
    tail = hashlib.sha256(name.encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _table(value: Any, key: str, source: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table, got {value!r}", path=source, key=key)
    return dict(value)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, tables recursively (Ansible's recursive combine)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _port(value: Any, key: str, source: str | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"expected a port number, got {value!r}", path=source, key=key)
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"expected a port number, got {value!r}", path=source, key=key) from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{port} is not a TCP port", path=source, key=key)
    return port


def plan(
    vms: Sequence[Mapping[str, Any]],
    *,
    host: str,
    pair: Sequence[Mapping[str, Any]],
    default_primary: str,
    shared: Mapping[str, Any],
    repl_port: int,
    drbd_port: int,
    keys: Mapping[str, str],
    source: str | None = None,
) -> list[PlannedVM]:
    """Every VM of ``vms`` (the inventory's ``kemari_vms``) as ``host`` runs it.

    ``pair`` holds both hosts as ``{host, address, node_name, drbd_disk}``;
    ``default_primary`` runs the VMs that name no ``primary``; ``shared`` holds the
    pair's sections (``vm``, ``replication``, ``disk``, ``config`` and ``drbd``), which
    each entry's own sections override; ``keys`` the key file paths the config names
    (``key_file``, and ``witness_key_file`` with a witness).

    Raises:
        ConfigError: (key ``kemari_vms[i].<field>``) a missing or bad name, an unknown
            field, a primary outside the pair, or a name, port or minor two VMs share.
    """
    if not isinstance(vms, Sequence) or isinstance(vms, str):
        raise ConfigError(f"expected a list of VMs, got {vms!r}", path=source, key="kemari_vms")
    hosts = {str(h["host"]): h for h in pair}
    if host not in hosts or len(hosts) != 2:
        raise ConfigError(
            f"the pair is {sorted(hosts)}, which must be two hosts including {host}",
            path=source,
            key="kemari_vms",
        )
    out: list[PlannedVM] = []
    taken: dict[tuple[str, Any], str] = {}  # (what, value) -> the key that has it

    def claim(what: str, value: Any, key: str) -> None:
        other = taken.setdefault((what, value), key)
        if other != key:
            raise ConfigError(f"{what} {value} is also {other}", path=source, key=key)

    for i, entry in enumerate(vms):
        at = f"kemari_vms[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected a table, got {entry!r}", path=source, key=at)
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})",
                path=source,
                key=at,
            )
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"a VM name is letters, digits, '.', '_' and '-' (got {name!r})",
                path=source,
                key=f"{at}.name",
            )
        claim("name", name, f"{at}.name")
        primary = str(entry.get("primary") or default_primary)
        if primary not in hosts:
            raise ConfigError(
                f"{primary!r} is not a host of this pair ({', '.join(sorted(hosts))})",
                path=source,
                key=f"{at}.primary",
            )
        secondary = next(h for h in hosts if h != primary)
        role = "primary" if host == primary else "secondary"
        other_role = "secondary" if role == "primary" else "primary"
        peer = secondary if role == "primary" else primary
        rport = _port(entry.get("repl_port", repl_port + i), f"{at}.repl_port", source)
        dport = _port(entry.get("drbd_port", drbd_port + i), f"{at}.drbd_port", source)
        claim("port", rport, f"{at}.repl_port")
        claim("port", dport, f"{at}.drbd_port")

        vm = _merge(
            _table(shared.get("vm"), "kemari_vm", source),
            _table(entry.get("vm"), f"{at}.vm", source),
        )
        vm["name"] = name
        vm.setdefault("mac", mac_for(name))
        claim("MAC", str(vm["mac"]).lower(), f"{at}.vm.mac")
        replication = _merge(
            _table(shared.get("replication"), "kemari_replication", source),
            _table(entry.get("replication"), f"{at}.replication", source),
        )
        replication.update(
            {k: v for k, v in keys.items() if v},
            peer=f"{hosts[peer]['address']}:{rport}",
            listen=f"{hosts[host]['address']}:{rport}",
            # The host's name at the witness, whatever role its agent runs.
            node_id=host,
        )
        tree = _merge(
            _table(shared.get("config"), "kemari_config", source),
            _table(entry.get("config"), f"{at}.config", source),
        )
        tree = _merge(
            tree,
            {
                "vm": vm,
                "disk": _merge(
                    _table(shared.get("disk"), "kemari_disk", source),
                    _table(entry.get("disk"), f"{at}.disk", source),
                ),
                "replication": replication,
            },
        )
        shared_drbd = _table(shared.get("drbd"), "kemari_drbd", source)
        drbd = _merge(shared_drbd, _table(entry.get("drbd"), f"{at}.drbd", source))
        drbd["resource"] = name
        minor = drbd.get("minor")
        if "minor" not in _table(entry.get("drbd"), f"{at}.drbd", source):
            minor = int(shared_drbd.get("minor", 0)) + i
        if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
            raise ConfigError(
                f"expected a minor number, got {minor!r}", path=source, key=f"{at}.drbd.minor"
            )
        drbd["minor"] = minor
        claim("DRBD minor", minor, f"{at}.drbd.minor")
        nodes = [
            {
                "name": str(hosts[h].get("node_name") or h),
                "address": str(hosts[h]["address"]),
                "node_id": n,
                "port": dport,
                "disk": str(hosts[h].get("drbd_disk") or ""),
            }
            for n, h in enumerate((primary, secondary))
        ]
        out.append(
            PlannedVM(
                name=name,
                index=i,
                role=role,
                primary=primary,
                secondary=secondary,
                command=COMMANDS[role],
                unit=TEMPLATE_UNITS[role].replace("@", f"@{name}"),
                template=TEMPLATE_UNITS[role],
                other_unit=TEMPLATE_UNITS[other_role].replace("@", f"@{name}"),
                config_path=f"{VMS_DIR}/{name}.toml",
                repl_port=rport,
                drbd_port=dport,
                drbd_minor=minor,
                mac=str(vm["mac"]),
                disk_backend=str(tree["disk"].get("backend", "builtin")),
                tree=tree,
                drbd=drbd,
                drbd_nodes=nodes,
            )
        )
    return out


__all__ = ["COMMANDS", "TEMPLATE_UNITS", "VMS_DIR", "PlannedVM", "mac_for", "plan"]
