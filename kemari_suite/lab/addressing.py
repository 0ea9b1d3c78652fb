"""Names and addresses of a lab: three network namespaces standing in for two hosts and a LAN.

Everything here is computed from a lab id and a link profile alone, and owns no state:
no files, no namespaces, no commands. :mod:`kemari_suite.lab.lab` builds and removes
what a :class:`LabLayout` describes, and :mod:`kemari_suite.lab.links` reads and changes
its links; both take every name and address from here.

::

     kemari-<id>-pri                                      kemari-<id>-sec
    +---------------------------+   replication link   +---------------------------+
    |  krep-<id>-p  ------------+---- veth, tbf -------+------------  krep-<id>-s  |
    |  (repl_primary_ip)        |   (profile rate)     |       (repl_secondary_ip) |
    |                           |                      |                           |
    |  br0 (lan_primary_ip)     |                      |   br0 (lan_secondary_ip)  |
    |   +- ktap-<id>-p  (TAP)   |                      |   (TAP)  ktap-<id>-s -+   |
    |   +- klan-<id>-p          |                      |          klan-<id>-s -+   |
    +-----------|---------------+                      +----------------|----------+
                |              kemari-<id>-cli                          |
                |            +---------------------------+              |
                +- veth -----+- klan-<id>-cp             |              |
                             |   lan (bridge,            |              |
                             |        lan_client_ip)     |              |
                             |  klan-<id>-cs ------------+----- veth ---+
                             +---------------------------+

The guest's frames leave through the TAP of the host running it (the agent's frame proxy
opens that TAP inside the host's namespace with ``IFF_TAP | IFF_NO_PI``), cross ``br0``
and the LAN veth, and reach the ``lan`` bridge in the client namespace, where clients
and the witness live. After a failover the same guest MAC appears behind the other
host's TAP and ``announce-self`` moves it in the bridges' forwarding tables.

Address plan (``subnet_index`` is a number 1..65535 derived from the lab id)::

    LAN          10.<i // 256>.<i % 256>.0/24    client .1, primary .2, secondary .3,
                                                 guest .10
    replication  172.16.0.0/14 + 4*i, a /30      primary .1, secondary .2 (of the /30)

Lab ids of up to three lowercase letters or digits map one to one onto indices
1..50652 (the id read as a base-37 number with digits 1..36), so such labs never share
a subnet; any other id (four characters, upper case) is hashed into 50653..65535, where
two ids can meet. :func:`~kemari_suite.lab.lab.up` refuses an id whose index another
live lab already uses. Every lab lives in its own namespaces, with no link to the root
namespace, so these ranges cannot disturb the machine's own networks; they are chosen
to be distinct per lab for the day a lab is bridged out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kemari_suite.errors import LabError
from kemari_suite.lab.profiles import LinkProfile, get_profile

Role = Literal["primary", "secondary", "client"]
HostRole = Literal["primary", "secondary"]
HOST_ROLES: tuple[HostRole, HostRole] = ("primary", "secondary")

NS_PREFIX = "kemari-"
_NS_SUFFIX: dict[Role, str] = {"primary": "pri", "secondary": "sec", "client": "cli"}
HOST_BRIDGE = "br0"
CLIENT_BRIDGE = "lan"
LAN_PREFIX = 24
REPL_PREFIX = 30
LAN_MTU = 1500
#: Longest interface name the kernel accepts (IFNAMSIZ - 1).
IFNAME_MAX = 15

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: Indices 1..50652 belong to ids of up to three [0-9a-z] characters, one to one.
_DIRECT_LIMIT = 37**3
_INDEX_LIMIT = 1 << 16


def validate_lab_id(lab_id: str) -> str:
    """Return ``lab_id`` if it is 1-4 ASCII letters or digits.

    Raises:
        LabError: it is not (it becomes part of namespace and interface names).
    """
    if not (1 <= len(lab_id) <= 4 and lab_id.isascii() and lab_id.isalnum()):
        raise LabError(lab_id, "a lab id must be 1-4 letters or digits")
    return lab_id


def subnet_index(lab_id: str) -> int:
    """The number (1..65535) that places a lab's subnets; see the module docstring.

    Raises:
        LabError: ``lab_id`` is not a valid lab id.
    """
    validate_lab_id(lab_id)
    if len(lab_id) <= 3 and all(c in _ID_ALPHABET for c in lab_id):
        n = 0
        for c in lab_id:
            n = n * 37 + _ID_ALPHABET.index(c) + 1
        return n
    digest = hashlib.sha256(f"kemari-lab:{lab_id}".encode()).digest()
    return _DIRECT_LIMIT + int.from_bytes(digest[:4], "big") % (_INDEX_LIMIT - _DIRECT_LIMIT)


def worker_lab_id(worker: str | None, slot: int) -> str:
    """A lab id for test worker ``worker`` (a pytest-xdist id such as "gw3", or None).

    Tests on parallel workers must never share a lab or its subnets. Workers 0..35
    get ``t<worker><slot>`` in base 36 (e.g. "t3a"): three characters from [0-9a-z],
    so distinct (worker, slot) pairs never share subnets. Workers from 36 on get a
    four-character id ``w<worker:2><slot>``, whose subnets are hashed:
    :func:`~kemari_suite.lab.lab.up` refuses a collision rather than sharing.

    Raises:
        LabError: ``slot`` is not in 0..35 or the worker number is above 1295.
    """
    digits = "".join(c for c in (worker or "") if c.isdigit())
    number = int(digits) if digits else 0
    if not 0 <= slot < 36 or number >= 36 * 36:
        raise LabError(f"{worker}/{slot}", "worker numbers go to 1295 and slots to 35")
    if number < 36:
        return f"t{_ID_ALPHABET[number]}{_ID_ALPHABET[slot]}"
    return f"w{_ID_ALPHABET[number // 36]}{_ID_ALPHABET[number % 36]}{_ID_ALPHABET[slot]}"


@dataclass(frozen=True)
class LabLayout:
    """Every name and address of one lab, computed from its id and profile alone."""

    lab_id: str
    profile: LinkProfile
    subnet_index: int
    ns_primary: str
    ns_secondary: str
    ns_client: str
    #: Replication veth ends (in the primary / secondary namespace).
    repl_primary_if: str
    repl_secondary_if: str
    repl_primary_ip: str
    repl_secondary_ip: str
    repl_prefix: int
    #: LAN veth ends on the host side (members of ``br0`` in each host namespace) ...
    lan_primary_if: str
    lan_secondary_if: str
    #: ... and their peers in the client namespace (members of the ``lan`` bridge).
    lan_client_primary_if: str
    lan_client_secondary_if: str
    host_bridge: str
    client_bridge: str
    lan_client_ip: str
    lan_primary_ip: str
    lan_secondary_ip: str
    guest_ip: str
    lan_prefix: int
    #: TAP devices inside the primary / secondary namespace, members of ``br0``.
    tap_primary: str
    tap_secondary: str

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """The three namespaces: primary, secondary, client."""
        return (self.ns_primary, self.ns_secondary, self.ns_client)

    @property
    def repl_subnet(self) -> str:
        """The replication link's network in CIDR notation."""
        return f"{_network(self.repl_primary_ip, self.repl_prefix)}/{self.repl_prefix}"

    @property
    def lan_subnet(self) -> str:
        """The LAN's network in CIDR notation."""
        return f"{_network(self.lan_client_ip, self.lan_prefix)}/{self.lan_prefix}"

    def ns_for(self, role: Role) -> str:
        """The namespace of ``role``."""
        return {
            "primary": self.ns_primary,
            "secondary": self.ns_secondary,
            "client": self.ns_client,
        }[role]

    def repl_if_for(self, role: HostRole) -> str:
        """The replication veth end in ``role``'s namespace."""
        return self.repl_primary_if if role == "primary" else self.repl_secondary_if

    def repl_ip_for(self, role: HostRole) -> str:
        """``role``'s address on the replication link."""
        return self.repl_primary_ip if role == "primary" else self.repl_secondary_ip

    def lan_if_for(self, role: HostRole) -> str:
        """The host-side LAN veth end in ``role``'s namespace."""
        return self.lan_primary_if if role == "primary" else self.lan_secondary_if

    def lan_ip_for(self, role: Role) -> str:
        """``role``'s own address on the LAN."""
        return {
            "primary": self.lan_primary_ip,
            "secondary": self.lan_secondary_ip,
            "client": self.lan_client_ip,
        }[role]

    def tap_for(self, role: HostRole) -> str:
        """The TAP device in ``role``'s namespace."""
        return self.tap_primary if role == "primary" else self.tap_secondary


def _network(ip: str, prefix: int) -> str:
    value = _ip_to_int(ip) & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF
    return _int_to_ip(value)


def _ip_to_int(ip: str) -> int:
    a, b, c, d = (int(x) for x in ip.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def _int_to_ip(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def layout(lab_id: str, profile: str = "1g") -> LabLayout:
    """Compute the names and addresses of lab ``lab_id`` (no side effects).

    Raises:
        LabError: the lab id is invalid or the profile unknown.
    """
    index = subnet_index(lab_id)
    prof = get_profile(profile, lab_id=lab_id)
    lan_base = (10 << 24) | (index << 8)
    repl_base = _ip_to_int("172.16.0.0") + 4 * index
    i = lab_id
    return LabLayout(
        lab_id=lab_id,
        profile=prof,
        subnet_index=index,
        ns_primary=f"{NS_PREFIX}{i}-pri",
        ns_secondary=f"{NS_PREFIX}{i}-sec",
        ns_client=f"{NS_PREFIX}{i}-cli",
        repl_primary_if=f"krep-{i}-p",
        repl_secondary_if=f"krep-{i}-s",
        repl_primary_ip=_int_to_ip(repl_base + 1),
        repl_secondary_ip=_int_to_ip(repl_base + 2),
        repl_prefix=REPL_PREFIX,
        lan_primary_if=f"klan-{i}-p",
        lan_secondary_if=f"klan-{i}-s",
        lan_client_primary_if=f"klan-{i}-cp",
        lan_client_secondary_if=f"klan-{i}-cs",
        host_bridge=HOST_BRIDGE,
        client_bridge=CLIENT_BRIDGE,
        lan_client_ip=_int_to_ip(lan_base + 1),
        lan_primary_ip=_int_to_ip(lan_base + 2),
        lan_secondary_ip=_int_to_ip(lan_base + 3),
        guest_ip=_int_to_ip(lan_base + 10),
        lan_prefix=LAN_PREFIX,
        tap_primary=f"ktap-{i}-p",
        tap_secondary=f"ktap-{i}-s",
    )


# --------------------------------------------------------------------------- VMs of a pair

#: The lab's original VM name: slot 0, today's single-VM ports and addresses.
DEFAULT_VM = "guest"
#: Names ending in a number 0..99 (``vm0``, ``db7``) take slot number + 1, one to one.
_VM_DIRECT = 100
#: Every other name is hashed into slots 101..244; two names there can meet.
VM_SLOTS = 245
#: The first guest address of the LAN /24 (slot 0): slots go up to .254.
GUEST_HOST = 10
#: Replication listeners: slot 0 keeps the lab's 7410; slot s listens on 7500 + s.
LAB_REPL_PORT = 7410
REPL_PORT_BASE = 7500
#: Each agent's ``/metrics``: 9400 + slot, on its host's LAN address.
METRICS_PORT_BASE = 9400


def vm_slot(name: str) -> int:
    """The slot (0..244) that places VM ``name`` on a lab pair: its guest address, MAC,
    TAPs and ports. ``guest`` is slot 0; a name ending in a number n < 100 is slot n + 1
    (so ``vm0``..``vm99`` never meet); any other name is hashed into 101..244.

    Raises:
        LabError: ``name`` is empty or not a plain name (it becomes part of file names).
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name) or not name.isascii():
        raise LabError(name, "a VM name must be letters, digits, '-' or '_'")
    if name == DEFAULT_VM:
        return 0
    digits = len(name) - len(name.rstrip("0123456789"))
    if 0 < digits < len(name) and int(name[-digits:]) < _VM_DIRECT:
        return int(name[-digits:]) + 1
    digest = hashlib.sha256(f"kemari-vm:{name}".encode()).digest()
    return _VM_DIRECT + 1 + int.from_bytes(digest[:4], "big") % (VM_SLOTS - _VM_DIRECT - 1)


def vm_slots(names: Sequence[str]) -> dict[str, int]:
    """The slot of every VM of one lab pair, by name.

    Raises:
        LabError: a name is invalid or given twice, or two names take the same slot
            (the message names both and the slot: rename one).
    """
    slots: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name in names:
        if name in slots:
            raise LabError(name, f"VM {name!r} is given twice")
        slot = vm_slot(name)
        if slot in owner:
            raise LabError(
                name,
                f"VMs {owner[slot]!r} and {name!r} both take slot {slot} (guest address, "
                "ports, TAPs): rename one (names ending in distinct numbers below 100, "
                "such as vm1 and vm2, never clash)",
            )
        owner[slot] = name
        slots[name] = slot
    return slots


@dataclass(frozen=True)
class VmAddresses:
    """Everything of one VM on a lab pair that must differ from every other VM's."""

    name: str
    slot: int
    guest_ip: str
    mac: str
    #: The VM's TAP in the primary / secondary namespace (members of ``br0``).
    tap_primary: str
    tap_secondary: str
    repl_port: int
    metrics_port: int

    def tap_for(self, role: HostRole) -> str:
        """The VM's TAP in host ``role``'s namespace."""
        return self.tap_primary if role == "primary" else self.tap_secondary


def vm_addresses(lab: LabLayout, name: str) -> VmAddresses:
    """The addresses, MAC, TAPs and ports of VM ``name`` on ``lab`` (slot 0, ``guest``:
    the lab's own guest address, TAPs and replication port).

    Raises:
        LabError: ``name`` is not a valid VM name.
    """
    slot = vm_slot(name)
    lan_base = _ip_to_int(lab.lan_client_ip) - 1
    if slot == 0:
        taps = (lab.tap_primary, lab.tap_secondary)
        mac, repl = "52:54:00:12:34:56", LAB_REPL_PORT
    else:
        taps = (f"{lab.tap_primary}{slot}", f"{lab.tap_secondary}{slot}")
        mac, repl = f"52:54:00:4b:00:{slot:02x}", REPL_PORT_BASE + slot
    return VmAddresses(
        name=name,
        slot=slot,
        guest_ip=_int_to_ip(lan_base + GUEST_HOST + slot),
        mac=mac,
        tap_primary=taps[0],
        tap_secondary=taps[1],
        repl_port=repl,
        metrics_port=METRICS_PORT_BASE + slot,
    )
