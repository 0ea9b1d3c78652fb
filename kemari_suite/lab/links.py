"""The live links of a lab: what the kernel says is there, and cutting and restoring links.

This module owns no state of its own: every call asks iproute2 in the lab's namespaces.
:func:`status` compares what it finds with the :class:`~kemari_suite.lab.addressing.LabLayout`
and with what :mod:`kemari_suite.lab.lab` recorded when it brought the lab up (the state
file and the registry entry); :func:`set_link_up`, :func:`partition` and :func:`heal`
take one end of a link down or up, as a pulled or replugged cable would, inside a lab
that :func:`~kemari_suite.lab.lab.up` built. Creating and deleting the namespaces, and
the files around them, stay in :mod:`kemari_suite.lab.lab`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError
from kemari_suite.lab import registry
from kemari_suite.lab.addressing import HOST_ROLES, HostRole, LabLayout, Role, layout
from kemari_suite.lab.lab import (
    _READY_TIMEOUT_S,
    NETNS_DIR,
    _existing_namespaces,
    _lab_dirs,
    _read_state,
    _run,
    _run_json,
    _state_path,
    _wait_until_up,
)
from kemari_suite.lab.profiles import profile_for_rate

LinkKind = Literal["repl", "lan"]


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class LinkState:
    """One interface found in a lab namespace."""

    ns: str
    name: str
    #: "veth", "bridge", "tun", or None (loopback).
    kind: str | None
    admin_up: bool
    carrier: bool
    mtu: int
    master: str | None
    addresses: tuple[str, ...]
    #: Root qdisc kind ("tbf", "noqueue", ...) and, for tbf, its shaping.
    qdisc: str | None
    rate_bit: int | None
    burst_bytes: int | None


@dataclass(frozen=True)
class LabStatus:
    """What is actually there for one lab id."""

    lab_id: str
    #: At least one of the lab's namespaces exists (``up`` would refuse).
    exists: bool
    #: All three namespaces and every expected interface, address and qdisc are present.
    complete: bool
    namespaces: tuple[str, ...]
    missing_namespaces: tuple[str, ...]
    links: tuple[LinkState, ...]
    #: From the state file, else recognised from the replication link's tbf rate.
    profile: str | None
    layout: LabLayout | None
    state_file: Path | None
    #: Human-readable differences from the expected lab (empty when complete).
    problems: tuple[str, ...]
    #: The lab's entry in the machine-wide registry, when it has one.
    registry_file: Path | None = None
    #: The run and shm directories the registry recorded for its files.
    run_dir: Path | None = None
    shm_dir: Path | None = None
    #: Every place looked at: the namespaces' mount points, the registry entry, the
    #: state files tried (what to say when nothing was found).
    looked_in: tuple[Path, ...] = ()

    def link(self, ns: str, name: str) -> LinkState | None:
        """The interface ``name`` in namespace ``ns``, if found."""
        for link in self.links:
            if link.ns == ns and link.name == name:
                return link
        return None


def status(lab_id: str, *, paths: PathsConfig | None = None) -> LabStatus:
    """Inspect lab ``lab_id`` without changing anything.

    Raises:
        LabError: the id is invalid, or iproute2 failed on a namespace that exists.
    """
    bare = layout(lab_id)
    existing = _existing_namespaces()
    present = tuple(ns for ns in bare.namespaces if ns in existing)
    missing = tuple(ns for ns in bare.namespaces if ns not in existing)
    links: list[LinkState] = []
    for ns in present:
        links.extend(_links_in(lab_id, ns))

    rec = registry.lookup(lab_id)
    tried = [_state_path(run_dir, lab_id) for run_dir, _ in _lab_dirs(lab_id, paths)]
    found = next(((f, d) for f in tried if (d := _read_state(f)) is not None), None)
    profile: str | None = None
    if found is not None and isinstance(found[1].get("profile"), str):
        profile = found[1]["profile"]
    elif rec is not None:
        profile = rec.profile
    else:
        repl = next((x for x in links if x.name == bare.repl_primary_if), None)
        guess = profile_for_rate(repl.rate_bit) if repl is not None else None
        profile = guess.name if guess is not None else None
    lay = None
    if profile is not None:
        try:
            lay = layout(lab_id, profile)
        except LabError:
            lay = None

    problems = [f"namespace {ns} is missing" for ns in missing]
    if present and lay is None:
        problems.append("cannot tell the link profile (no state file, unknown tbf rate)")
    if lay is not None and present:
        problems.extend(_check(lay, links))
    if rec is not None and not present:
        problems.append(f"the registry entry {registry.registry_file(lab_id)} is stale")
    return LabStatus(
        lab_id=lab_id,
        exists=bool(present),
        complete=bool(present) and not missing and not problems,
        namespaces=present,
        missing_namespaces=missing,
        links=tuple(links),
        profile=profile,
        layout=lay,
        state_file=found[0] if found is not None else None,
        problems=tuple(problems),
        registry_file=registry.registry_file(lab_id) if rec is not None else None,
        run_dir=rec.run_dir if rec is not None else None,
        shm_dir=rec.shm_dir if rec is not None else None,
        looked_in=(
            *(NETNS_DIR / ns for ns in bare.namespaces),
            registry.registry_file(lab_id),
            *tried,
        ),
    )


def _links_in(lab_id: str, ns: str) -> list[LinkState]:
    addrs = _run_json(lab_id, ["ip", "-n", ns, "-j", "-d", "addr", "show"])
    qdiscs = _run_json(lab_id, ["tc", "-n", ns, "-j", "qdisc", "show"])
    root_qdisc: dict[str, dict[str, Any]] = {
        str(q.get("dev")): q for q in qdiscs if q.get("root") and "dev" in q
    }
    links: list[LinkState] = []
    for entry in addrs:
        name = str(entry.get("ifname", ""))
        flags = entry.get("flags", [])
        q = root_qdisc.get(name)
        options = q.get("options", {}) if q else {}
        rate = options.get("rate") if q and q.get("kind") == "tbf" else None
        burst = options.get("burst") if q and q.get("kind") == "tbf" else None
        links.append(
            LinkState(
                ns=ns,
                name=name,
                kind=(entry.get("linkinfo") or {}).get("info_kind"),
                admin_up="UP" in flags,
                carrier="LOWER_UP" in flags,
                mtu=int(entry.get("mtu", 0)),
                master=entry.get("master"),
                addresses=tuple(
                    f"{a['local']}/{a['prefixlen']}"
                    for a in entry.get("addr_info", [])
                    if a.get("family") == "inet"
                ),
                qdisc=str(q["kind"]) if q else entry.get("qdisc"),
                # tc reports tbf rates in bytes per second.
                rate_bit=int(rate) * 8 if isinstance(rate, int) else None,
                burst_bytes=int(burst) if isinstance(burst, int) else None,
            )
        )
    return links


def _check(lay: LabLayout, links: list[LinkState]) -> list[str]:
    problems: list[str] = []
    found = {(x.ns, x.name): x for x in links}

    def need(ns: str, name: str, *, master: str | None = None, addr: str | None = None) -> None:
        link = found.get((ns, name))
        if link is None:
            problems.append(f"{name} is missing in {ns}")
            return
        if not link.admin_up:
            problems.append(f"{name} in {ns} is down")
        if master is not None and link.master != master:
            problems.append(f"{name} in {ns} is not in bridge {master}")
        if addr is not None and addr not in link.addresses:
            problems.append(f"{name} in {ns} lacks address {addr}")

    for role in HOST_ROLES:
        ns = lay.ns_for(role)
        repl_if = lay.repl_if_for(role)
        need(ns, repl_if, addr=f"{lay.repl_ip_for(role)}/{lay.repl_prefix}")
        need(ns, lay.host_bridge, addr=f"{lay.lan_ip_for(role)}/{lay.lan_prefix}")
        need(ns, lay.lan_if_for(role), master=lay.host_bridge)
        need(ns, lay.tap_for(role), master=lay.host_bridge)
        repl = found.get((ns, repl_if))
        if repl is not None:
            if repl.mtu != lay.profile.mtu:
                problems.append(f"{repl_if} in {ns} has MTU {repl.mtu}, not {lay.profile.mtu}")
            if repl.rate_bit != lay.profile.rate_bit:
                want = lay.profile.rate_bit or "no tbf"
                problems.append(f"{repl_if} in {ns} is shaped to {repl.rate_bit}, not {want}")
    cli = lay.ns_client
    need(cli, lay.client_bridge, addr=f"{lay.lan_client_ip}/{lay.lan_prefix}")
    need(cli, lay.lan_client_primary_if, master=lay.client_bridge)
    need(cli, lay.lan_client_secondary_if, master=lay.client_bridge)
    return problems


# --------------------------------------------------------------------------- partitions


def set_link_up(
    lab_id: str, role: Role, up: bool, *, link: LinkKind = "repl", wait: bool = True
) -> None:
    """Set one host's end of the replication link (or its LAN veth) administratively up or down.

    Taking one end down drops the carrier on the other end too, like a pulled cable,
    and takes effect at once. The tbf qdisc and the addresses stay; bringing the end up
    restores the route. With ``wait``, bringing an end up returns only once both ends
    of that link are operationally UP again (when the other end is admin-up too).

    Raises:
        LabError: ``role`` has no such link (the client has no replication link), the
            lab is not up, ``ip`` failed, or the link did not come up in time.
    """
    lay = layout(lab_id)
    if role == "client":
        raise LabError(lab_id, f"the {role} namespace has no {link} link of its own")
    ns = lay.ns_for(role)
    if ns not in _existing_namespaces():
        raise LabError(lab_id, f"namespace {ns} does not exist (is the lab up?)")
    if link == "repl":
        dev = lay.repl_if_for(role)
        other_role: HostRole = "secondary" if role == "primary" else "primary"
        peer = (lay.ns_for(other_role), lay.repl_if_for(other_role))
    else:
        dev = lay.lan_if_for(role)
        client_end = lay.lan_client_primary_if if role == "primary" else lay.lan_client_secondary_if
        peer = (lay.ns_client, client_end)
    _run(lab_id, ["ip", "-n", ns, "link", "set", "dev", dev, "up" if up else "down"])
    if up and wait and _admin_up(lab_id, *peer):
        _wait_until_up(lay, [(ns, dev), peer])


def wait_tap_forwarding(lab_id: str, role: HostRole, timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Wait until ``role``'s TAP forwards frames in ``br0``.

    The TAP has no carrier until a process opens it; after the frame proxy opens it,
    the bridge starts forwarding on it only once the kernel's linkwatch has seen the
    carrier (up to a second). Call this before relying on frames crossing the TAP.

    Raises:
        LabError: the port is not forwarding after ``timeout_s``, or ``bridge`` failed.
    """
    lay = layout(lab_id)
    ns, tap = lay.ns_for(role), lay.tap_for(role)
    deadline = time.monotonic() + timeout_s
    while True:
        ports = _run_json(lab_id, ["bridge", "-n", ns, "-j", "link", "show", "dev", tap])
        state = str(ports[0].get("state")) if ports else "absent"
        if state == "forwarding":
            return
        if time.monotonic() >= deadline:
            raise LabError(
                lab_id, f"TAP {tap} in {ns} is {state}, not forwarding, after {timeout_s:g} s"
            )
        time.sleep(0.02)


def _admin_up(lab_id: str, ns: str, dev: str) -> bool:
    entries = _run_json(lab_id, ["ip", "-n", ns, "-j", "link", "show", "dev", dev])
    return bool(entries) and "UP" in entries[0].get("flags", [])


def partition(lab_id: str) -> None:
    """Cut the replication link (both ends down); the LAN stays up.

    Raises:
        LabError: as :func:`set_link_up`.
    """
    set_link_up(lab_id, "primary", False)
    set_link_up(lab_id, "secondary", False)


def heal(lab_id: str) -> None:
    """Restore the replication link (both ends up).

    Raises:
        LabError: as :func:`set_link_up`.
    """
    set_link_up(lab_id, "primary", True, wait=False)
    set_link_up(lab_id, "secondary", True)
