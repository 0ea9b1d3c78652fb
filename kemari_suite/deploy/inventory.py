"""The Ansible inventory, read the way Ansible reads it, and the host pairs in it.

An inventory describes Kemari host pairs: the group ``kemari`` holds them, either as two
hosts directly or as child groups of two hosts each (each child group sets
``kemari_pair_group`` to its own name). Host variables say which host is which
(``kemari_role: primary`` / ``secondary``) and how to reach it (the usual
``ansible_host``, ``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file``).

The inventory is parsed by ``ansible-inventory --list`` itself, so INI, YAML,
``group_vars/`` and ``host_vars/`` mean exactly what they mean to the playbooks. Values
are not templated: a Jinja expression in a variable that ``kemari remote`` needs
(address, port, user, key, root) is taken literally.

The defaults below must match ``playbooks/roles/kemari/defaults/main.yml``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from kemari_suite.errors import ConfigError

HostRole = Literal["primary", "secondary"]

#: The group that holds every Kemari host (site.yml's ``hosts:``).
KEMARI_GROUP = "kemari"
DEFAULT_ROOT = "/"
DEFAULT_VENV = "/opt/kemari"
DEFAULT_HOST_PYTHON = "/usr/bin/python3"
CONFIG_PATH = "/etc/kemari/kemari.toml"
UNITS: dict[HostRole, str] = {
    "primary": "kemari-protect.service",
    "secondary": "kemari-standby.service",
}
_KNOWN_HOSTS_OPT = re.compile(r"^-oUserKnownHostsFile=(.+)$|^UserKnownHostsFile=(.+)$", re.I)
_INVENTORY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class HostSpec:
    """One host of a pair: how to reach it and where Kemari lives on it."""

    name: str
    role: HostRole
    address: str
    port: int = 22
    #: None: the local user name (as ssh would).
    user: str | None = None
    key_file: Path | None = None
    #: The known_hosts file for this host (None: the user's ~/.ssh/known_hosts).
    known_hosts: Path | None = None
    #: Install root (like DESTDIR): Kemari's files are below it.
    root: str = DEFAULT_ROOT
    venv: str = DEFAULT_VENV
    #: The kemari command on the host; default: ``<root><venv>/bin/kemari``.
    kemari_bin: str = ""
    python: str = DEFAULT_HOST_PYTHON
    systemctl: str = "systemctl"
    #: Run commands through ``sudo -n`` (the inventory's ``ansible_become``).
    become: bool = False

    @property
    def prefix(self) -> str:
        """``root`` without its trailing slash ("" for /)."""
        return self.root.rstrip("/")

    @property
    def config_path(self) -> str:
        """Where the playbooks put this host's kemari.toml."""
        return f"{self.prefix}{CONFIG_PATH}"

    @property
    def command(self) -> str:
        return self.kemari_bin or f"{self.prefix}{self.venv}/bin/kemari"

    @property
    def unit(self) -> str:
        """The systemd unit of this host's agent."""
        return UNITS[self.role]

    @property
    def endpoint(self) -> str:
        """``address:port`` for messages."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Pair:
    """A primary and its secondary, from the group ``group`` of an inventory."""

    group: str
    primary: HostSpec
    secondary: HostSpec

    @property
    def hosts(self) -> tuple[HostSpec, HostSpec]:
        return (self.primary, self.secondary)


@dataclass(frozen=True)
class Inventory:
    """What ``ansible-inventory --list`` says about an inventory."""

    path: Path
    #: Every host's variables, group variables merged in.
    hostvars: Mapping[str, Mapping[str, Any]]
    #: Group name -> every host in it or in any of its child groups.
    groups: Mapping[str, tuple[str, ...]]

    def pairs(self) -> list[Pair]:
        """The host pairs under the group ``kemari``, in inventory order.

        Raises:
            ConfigError: naming the inventory file and the host (or group) that is wrong.
        """
        return pairs_from(self)

    def pair(self, name: str | None = None) -> Pair:
        """The pair whose group is ``name``, or the only pair when ``name`` is None.

        Raises:
            ConfigError: no such pair, several pairs and no name, or a malformed pair.
        """
        found = self.pairs()
        if name is None:
            if len(found) != 1:
                raise ConfigError(
                    f"{len(found)} pairs ({', '.join(p.group for p in found)}); "
                    "choose one with --pair",
                    path=str(self.path),
                )
            return found[0]
        for p in found:
            if p.group == name:
                return p
        raise ConfigError(
            f"no pair {name!r} (pairs: {', '.join(p.group for p in found) or 'none'})",
            path=str(self.path),
        )


def ansible_tool(name: str) -> str:
    """An Ansible command: the one beside this Python first (the suite's venv)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def load(path: str | os.PathLike[str]) -> Inventory:
    """Parse an inventory (file or directory) with ``ansible-inventory --list``.

    Raises:
        ConfigError: the inventory does not exist or Ansible cannot parse it; the message
            names the file and quotes Ansible's reason (with the line, for YAML).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError("inventory not found", path=str(p))
    env = dict(os.environ, ANSIBLE_INVENTORY_UNPARSED_FAILED="True", ANSIBLE_NOCOLOR="1")
    env.pop("ANSIBLE_INVENTORY", None)
    argv = [ansible_tool("ansible-inventory"), "-i", str(p.resolve()), "--list"]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            timeout=_INVENTORY_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot run ansible-inventory: {err}", path=str(p)) from err
    if proc.returncode != 0:
        raise ConfigError(f"not a valid inventory: {parse_error(proc.stderr)}", path=str(p))
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise ConfigError(f"ansible-inventory printed no JSON: {err}", path=str(p)) from err
    return from_list_json(data, p)


def parse_error(stderr: str) -> str:
    """The useful part of ansible-inventory's complaint about an unparsable source."""
    reasons: list[str] = []
    origin = ""
    for raw in stderr.splitlines():
        line = raw.strip()
        m = re.search(r"Failed to parse inventory with '(yaml|ini|auto)' plugin: (.+)", line)
        if m and not any(m.group(2) in r for r in reasons):
            kind = "INI" if m.group(1) == "ini" else "YAML"
            reasons.append(f"as {kind}: {m.group(2)}")
        m = re.match(r"Origin: (\S+:\d+(?::\d+)?)$", line)
        if m and not origin:
            origin = m.group(1)
    if reasons:
        text = "; ".join(reasons[:2])
        return f"{text} (at {origin})" if origin else text
    errors = [line.split("]:", 1)[-1].strip() for line in stderr.splitlines() if "ERROR" in line]
    if errors:
        return "; ".join(errors)
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else "-"


def from_list_json(data: Mapping[str, Any], path: Path) -> Inventory:
    """Build an :class:`Inventory` from ``ansible-inventory --list`` output."""
    hostvars = dict(data.get("_meta", {}).get("hostvars", {}))
    direct: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for name, group in data.items():
        if name == "_meta" or not isinstance(group, Mapping):
            continue
        direct[name] = list(group.get("hosts", []))
        children[name] = list(group.get("children", []))

    def flatten(name: str, seen: frozenset[str]) -> list[str]:
        out = list(direct.get(name, []))
        for child in children.get(name, []):
            if child not in seen:
                out.extend(h for h in flatten(child, seen | {child}) if h not in out)
        return out

    groups = {name: tuple(dict.fromkeys(flatten(name, frozenset({name})))) for name in direct}
    for host in {h for hosts in groups.values() for h in hosts}:
        hostvars.setdefault(host, {})
    return Inventory(path=path, hostvars=hostvars, groups=groups)


def pairs_from(inv: Inventory) -> list[Pair]:
    """See :meth:`Inventory.pairs`."""
    where = str(inv.path)
    members = inv.groups.get(KEMARI_GROUP)
    if not members:
        raise ConfigError(
            f"no hosts in group {KEMARI_GROUP!r} (it holds the Kemari host pairs)", path=where
        )
    by_group: dict[str, list[str]] = {}
    for host in members:
        group = str(inv.hostvars[host].get("kemari_pair_group", KEMARI_GROUP))
        by_group.setdefault(group, []).append(host)
    pairs: list[Pair] = []
    for group, hosts in by_group.items():
        in_group = inv.groups.get(group, ())
        for host in hosts:
            if host not in in_group:
                raise ConfigError(
                    f"kemari_pair_group is {group!r}, but the host is not in that group",
                    path=where,
                    key=host,
                )
        if len(hosts) != 2:
            raise ConfigError(
                f"pair group {group!r} holds {len(hosts)} host(s) ({', '.join(hosts)}); "
                "a pair is exactly two",
                path=where,
            )
        specs = [host_spec(inv, h) for h in hosts]
        roles = sorted(s.role for s in specs)
        if roles != ["primary", "secondary"]:
            raise ConfigError(
                f"pair group {group!r}: both hosts are {specs[0].role}; "
                "one must be primary and one secondary",
                path=where,
                key=f"{specs[1].name}.kemari_role",
            )
        primary, secondary = sorted(specs, key=lambda s: s.role != "primary")
        pairs.append(Pair(group=group, primary=primary, secondary=secondary))
    return pairs


def _known_hosts_from_ssh_args(hv: Mapping[str, Any]) -> str | None:
    for var in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        text = hv.get(var)
        if not isinstance(text, str):
            continue
        try:
            words = shlex.split(text)
        except ValueError:
            continue
        for i, word in enumerate(words):
            value = None
            if word == "-o" and i + 1 < len(words):
                m = _KNOWN_HOSTS_OPT.match(words[i + 1])
                value = (m.group(1) or m.group(2)) if m else None
            else:
                m = _KNOWN_HOSTS_OPT.match(word)
                value = (m.group(1) or m.group(2)) if m else None
            if value:
                return value.split()[0]
    return None


def _int(hv: Mapping[str, Any], var: str, default: int, where: str, host: str) -> int:
    value = hv.get(var, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"expected a port number, got {value!r}", path=where, key=f"{host}.{var}"
        ) from None
    if not 1 <= number <= 65535:
        raise ConfigError(f"{number} is not a TCP port", path=where, key=f"{host}.{var}")
    return number


def _str(hv: Mapping[str, Any], var: str, default: str, where: str, host: str) -> str:
    value = hv.get(var, default)
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", path=where, key=f"{host}.{var}")
    return value


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def host_spec(inv: Inventory, host: str) -> HostSpec:
    """The :class:`HostSpec` of ``host`` from its variables.

    Raises:
        ConfigError: ``kemari_role`` is missing or wrong, or a connection variable has
            the wrong type; the key is ``<host>.<variable>``.
    """
    where = str(inv.path)
    hv = inv.hostvars.get(host, {})
    role = hv.get("kemari_role")
    if role not in ("primary", "secondary"):
        raise ConfigError(
            f"must be primary or secondary, got {role!r}" if role is not None else "missing",
            path=where,
            key=f"{host}.kemari_role",
        )
    root = _str(hv, "kemari_root", DEFAULT_ROOT, where, host)
    if not PurePosixPath(root).is_absolute():
        raise ConfigError(f"{root!r} is not absolute", path=where, key=f"{host}.kemari_root")
    user = hv.get("ansible_user", hv.get("ansible_ssh_user"))
    key = hv.get("ansible_ssh_private_key_file", hv.get("ansible_private_key_file"))
    known = hv.get("kemari_known_hosts") or _known_hosts_from_ssh_args(hv)
    become = hv.get("ansible_become", False)
    return HostSpec(
        name=host,
        role=role,
        address=_str(hv, "ansible_host", host, where, host),
        port=_int(hv, "ansible_port", 22, where, host),
        user=str(user) if user else None,
        key_file=_path(str(key)) if key else None,
        known_hosts=_path(str(known)) if known else None,
        root=root,
        venv=_str(hv, "kemari_venv", DEFAULT_VENV, where, host),
        kemari_bin=_str(hv, "kemari_bin", "", where, host),
        python=_str(hv, "kemari_host_python", DEFAULT_HOST_PYTHON, where, host),
        systemctl=_str(hv, "kemari_systemctl", "systemctl", where, host),
        become=become is True or str(become).lower() in ("true", "yes", "1"),
    )
