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
:class:`~kemari_suite.vm.qemu.VMSpec`. :func:`identity` is the host-independent part of
the command line; the two hosts compare :func:`identity_digest` before protecting and
:func:`diff_identity` names the fields that differ.

The format is documented in docs/vm-definition.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import re
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from kemari_suite.config import (
    AlertConfig,
    DiskBackendKind,
    DiskConfig,
    ImageConfig,
    KemariConfig,
    PathsConfig,
    ReplicationConfig,
    TapConfig,
    VMConfig,
    build,
    read_toml,
)
from kemari_suite.errors import ConfigError, SetupError
from kemari_suite.vm.qemu import QEMU_BINARY, VMPaths, VMSpec, choose_accel, qemu_argv

MiB = 1 << 20

Display = Literal["none", "std", "virtio", "qxl"]
AccelName = Literal["auto", "tcg", "kvm"]
Firmware = Literal["bios"]

DISPLAYS: tuple[str, ...] = ("none", "std", "virtio", "qxl")
#: Video RAM of each ``-vga`` model with QEMU 7.2's defaults, in MiB (``info ramblock``:
#: vga.vram 16 MiB for std, 8 MiB for virtio; vga.vram + qxl.vram 64 + 64 MiB for qxl).
#: It is a RAM block of its own, not in the shared RAM file, so every device-state
#: capture carries all of it (plus the card's 64 KiB option ROM).
VIDEO_RAM_MIB: Mapping[str, int] = {"none": 0, "std": 16, "virtio": 8, "qxl": 128}

#: The only NIC model: the network frame proxy speaks virtio-net.
NIC_MODELS: tuple[str, ...] = ("virtio-net-pci",)
#: The replication port when a host does not say.
DEFAULT_PORT = 7410
DEFAULT_DISK_NAME = "disk0"
#: Engine limits of this version.
MAX_DISKS = 1
MAX_NICS = 1

#: Extra devices known to be harmless to replicate: no output path, no host resource,
#: no option ROM, all state in the device-state capture.
ALLOWED_DEVICES: Mapping[str, str] = {
    "virtio-rng-pci": "entropy from QEMU's builtin backend",
    "pvpanic": "ISA panic notifier",
    "pvpanic-pci": "PCI panic notifier",
    "i6300esb": "PCI watchdog (resets the guest on expiry)",
    "ib700": "ISA watchdog (resets the guest on expiry)",
}
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

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_DRBD_RES_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_PROP_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_MACHINE_FAMILIES = ("pc-i440fx-", "pc-q35-")
_MAX_CMDLINE = 2047


# ---- the QEMU machine catalogue --------------------------------------------------------


@dataclass(frozen=True)
class MachineCatalog:
    """The machine types a QEMU binary offers (``-machine help``)."""

    names: frozenset[str]
    #: alias -> the pinned machine it stands for ("pc" -> "pc-i440fx-7.2").
    aliases: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def parse(cls, text: str) -> MachineCatalog:
        """Parse the output of ``qemu-system-x86_64 -machine help``."""
        names: set[str] = set()
        aliases: dict[str, str] = {}
        default: str | None = None
        for line in text.splitlines():
            parts = line.split(None, 1)
            if not parts or line.startswith("Supported machines"):
                continue
            name, desc = parts[0], (parts[1] if len(parts) > 1 else "")
            m = re.search(r"\(alias of ([\w.+-]+)\)", desc)
            if m:
                aliases[name] = m.group(1)
            else:
                names.add(name)
            if "(default)" in desc:
                default = m.group(1) if m else name
        return cls(names=frozenset(names), aliases=aliases, default=default)

    def pin(self, machine: str) -> str | None:
        """The pinned machine for ``machine`` (itself, or what an alias stands for)."""
        if machine in self.names:
            return machine
        return self.aliases.get(machine)


MachineProbe = Callable[[], MachineCatalog]


@functools.cache
def qemu_machines(binary: str = QEMU_BINARY) -> MachineCatalog:
    """The machine types of this host's QEMU, asked once per process.

    Raises:
        SetupError: QEMU is not installed or does not answer.
    """
    try:
        res = subprocess.run(
            [binary, "-machine", "help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SetupError("qemu", f"cannot run {binary} -machine help: {err}") from err
    if res.returncode != 0:
        raise SetupError("qemu", f"{binary} -machine help exited {res.returncode}: {res.stderr}")
    return MachineCatalog.parse(res.stdout)


# ---- the definition tree ---------------------------------------------------------------


@dataclass(frozen=True)
class BootDef:
    """Direct kernel boot (``kernel`` set) or firmware boot (``firmware = "bios"``)."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Firmware | None = None

    @property
    def mode(self) -> Literal["kernel", "firmware"]:
        return "kernel" if self.kernel is not None else "firmware"


@dataclass(frozen=True)
class DiskDef:
    """The protected disk, as one host sees it (per-host overrides applied)."""

    name: str
    path: str
    backend: DiskBackendKind = "builtin"
    #: When given, the file or device must have exactly this size.
    size_mib: int | None = None
    #: DRBD resource name (backend = "drbd").
    resource: str = ""
    lease_device: str = ""
    lease_offset: int = 0


@dataclass(frozen=True)
class NicDef:
    """The protected NIC, as one host sees it (per-host overrides applied)."""

    mac: str
    model: str = "virtio-net-pci"
    #: Host TAP the frame proxy attaches to.
    tap: str = ""
    #: Bridge the TAP is a port of (informational; see :attr:`host_tap`).
    bridge: str = ""
    #: Guest address "A.B.C.D/NN" for the project's own initramfs (``kemari.ip=``).
    ip: str = ""

    def host_tap(self, vm_name: str) -> str:
        """The TAP the frame proxy opens: ``tap``, or ``kt-<vm>`` for a bridge-only NIC."""
        return self.tap or f"kt-{vm_name}"[:15]


@dataclass(frozen=True)
class DeviceDef:
    """One extra ``-device`` from the allow-list."""

    driver: str
    props: tuple[tuple[str, str], ...] = ()

    def qemu_arg(self) -> str:
        """The ``-device`` option string (commas in values doubled, as QEMU wants)."""
        parts = [self.driver] + [f"{k}={v.replace(',', ',,')}" for k, v in self.props]
        return ",".join(parts)


@dataclass(frozen=True)
class HostDef:
    """One host of the pair, with its resolved disks and NICs."""

    name: str
    address: str
    port: int = DEFAULT_PORT
    netns: str = ""
    paths: PathsConfig = field(default_factory=PathsConfig)
    disks: tuple[DiskDef, ...] = ()
    nics: tuple[NicDef, ...] = ()
    #: Keys of this host's section that override a disk or NIC value ("disk.root.path").
    overridden: frozenset[str] = frozenset()

    @property
    def replication_address(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class VMDefinition:
    """A loaded, validated VM definition; see the module docstring."""

    name: str
    machine: str
    vcpus: int
    memory_mib: int
    accel: AccelName
    display: Display
    boot: BootDef
    #: The disks and NICs as written at the top level (before per-host overrides).
    disks: tuple[DiskDef, ...]
    nics: tuple[NicDef, ...]
    devices: tuple[DeviceDef, ...]
    replication: ReplicationConfig
    tap: TapConfig
    alerts: AlertConfig
    hosts: tuple[HostDef, ...]
    source: Path | None = None
    #: Things load noticed but did not refuse (e.g. the machine type was not checked).
    notes: tuple[str, ...] = ()

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hosts)

    def host(self, name: str) -> HostDef:
        """The host called ``name``.

        Raises:
            ConfigError: no such host.
        """
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(
            f"unknown host {name!r} (defined: {', '.join(self.host_names)})",
            path=_src(self.source),
            key="hosts",
        )

    def peer_of(self, name: str) -> HostDef:
        """The other host of the pair.

        Raises:
            ConfigError: no such host.
        """
        self.host(name)
        return next(h for h in self.hosts if h.name != name)

    def for_host(
        self, host: str, *, resolve_accel: Callable[[str], tuple[str, str]] = choose_accel
    ) -> HostView:
        """What ``host`` runs: its configuration tree and its QEMU spec.

        ``resolve_accel`` turns "auto" into "tcg" or "kvm" (this machine's answer by
        default).

        Raises:
            ConfigError: no such host.
        """
        me = self.host(host)
        peer = self.peer_of(host)
        disk = me.disks[0] if me.disks else None
        nic = me.nics[0] if me.nics else None
        accel, why = resolve_accel(self.accel)
        cfg = KemariConfig(
            paths=me.paths,
            image=ImageConfig(
                kernel=str(self.boot.kernel or ""), initrd=str(self.boot.initrd or "")
            ),
            vm=VMConfig(
                name=self.name,
                memory_mib=self.memory_mib,
                vcpus=self.vcpus,
                machine=self.machine,
                accel=self.accel,
                append=self.boot.cmdline,
                mac=nic.mac if nic else VMConfig.mac,
                # The frame proxy wires the NIC (tap.host_tap); no direct -netdev.
                netdev="",
                netns=me.netns,
                ip=nic.ip if nic else "",
            ),
            replication=dataclasses.replace(
                self.replication, listen=me.replication_address, peer=peer.replication_address
            ),
            tap=dataclasses.replace(self.tap, host_tap=nic.host_tap(self.name) if nic else ""),
            disk=DiskConfig(
                backend=disk.backend,
                path=disk.path,
                size_mib=disk.size_mib if disk.size_mib is not None else _measured_mib(disk),
                lease_device=disk.lease_device,
                lease_offset=disk.lease_offset,
            )
            if disk
            else DiskConfig(),
            alerts=self.alerts,
        )
        spec = VMSpec(
            name=self.name,
            kernel=self.boot.kernel,
            initrd=self.boot.initrd,
            append=guest_cmdline(self.boot.cmdline, nic.ip if nic else ""),
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            machine=self.machine,
            accel=accel,
            netdev=f"tap,ifname={nic.host_tap(self.name)},script=no,downscript=no" if nic else None,
            mac=nic.mac if nic else VMSpec.mac,
            blockdev=_blockdev(disk.path) if disk else None,
            netns=me.netns or None,
            display=self.display,
            devices=tuple(d.qemu_arg() for d in self.devices),
        )
        paths = VMPaths.for_vm(self.name, me.paths.run_dir, me.paths.shm_dir)
        return HostView(
            host=me.name,
            peer=peer.name,
            config=cfg,
            spec=spec,
            paths=paths,
            disk=disk,
            nic=nic,
            accel_reason=why,
        )


@dataclass(frozen=True)
class HostView:
    """One host's share of a definition."""

    host: str
    peer: str
    #: The configuration tree the agents of this host run with.
    config: KemariConfig
    #: The QEMU spec with a direct TAP ``-netdev`` and file ``-blockdev``; the agents
    #: rewire both to the taps (see :meth:`tapped_spec`).
    spec: VMSpec
    paths: VMPaths
    disk: DiskDef | None
    nic: NicDef | None
    #: Why ``spec.accel`` was chosen.
    accel_reason: str = ""

    def tapped_spec(self) -> VMSpec:
        """The spec as the agents start it: the NIC on the frame proxy's socket, the disk
        on the block tap's NBD export (the same wiring as ``GuestIO.start``)."""
        from kemari_suite.vm.qemu import io_paths

        io = io_paths(self.paths)
        return self.spec.replace(
            netdev=f"stream,server=off,addr.type=unix,addr.path={io.net}"
            if self.spec.netdev is not None
            else None,
            blockdev=f"driver=nbd,server.type=unix,server.path={io.nbd},export=disk0"
            if self.spec.blockdev is not None
            else None,
        )

    def argv(self, *, tapped: bool = True, incoming: bool = False) -> list[str]:
        """This host's QEMU command line (``incoming``: the secondary's failover start)."""
        spec = self.tapped_spec() if tapped else self.spec
        return qemu_argv(spec.replace(incoming=incoming), self.paths)

    def local_values(self) -> dict[str, str]:
        """The host-local strings of the command line, longest first: what
        :func:`masked_argv` replaces to compare two hosts' lines."""
        values = {
            "{run_dir}": str(self.paths.run_dir),
            "{ram}": str(self.paths.ram),
        }
        if self.disk is not None:
            values["{disk}"] = self.disk.path
        if self.nic is not None:
            values["{tap}"] = self.nic.host_tap(self.config.vm.name)
        return dict(sorted(values.items(), key=lambda kv: -len(kv[1])))


def masked_argv(view: HostView, argv: list[str] | None = None) -> list[str]:
    """``argv`` (default: the view's tapped line) with the host-local parts masked: the
    ``ip netns exec NS`` wrapper dropped, and the RAM file, run directory, disk source and
    TAP name replaced by placeholders. Two hosts of one definition give equal lists."""
    line = list(argv if argv is not None else view.argv())
    if line[:3] == ["ip", "netns", "exec"]:
        line = line[4:]
    values = view.local_values()
    out = []
    for arg in line:
        for placeholder, value in values.items():
            if value:
                arg = _replace_token(arg, value, placeholder)
        out.append(arg)
    return out


def _replace_token(arg: str, value: str, placeholder: str) -> str:
    """Replace ``value`` where it is a whole option value or a path prefix."""
    pattern = r"(?<![\w/.-])" + re.escape(value) + r"(?=$|[,/])"
    return re.sub(pattern, lambda _m: placeholder, arg)


def guest_cmdline(cmdline: str, ip: str) -> str:
    """The guest kernel command line: ``cmdline``, plus ``kemari.ip=`` when ``ip`` is set."""
    parts = [cmdline.strip()] if cmdline.strip() else []
    if ip:
        parts.append(f"kemari.ip={ip}")
    return " ".join(parts)


def _blockdev(path: str) -> str:
    # The "file" driver refuses block devices; "host_device" is the one for them.
    driver = "host_device" if _is_block_device(path) else "file"
    return f"driver={driver},filename={path.replace(',', ',,')}"


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return path.startswith("/dev/")


def _size_bytes(path: str) -> int:
    """Size of a regular file or block device.

    Raises:
        OSError: cannot open or stat it.
    """
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return st.st_size


def _measured_mib(disk: DiskDef) -> int:
    try:
        return _size_bytes(disk.path) // MiB
    except OSError:
        return DiskConfig.size_mib


def _src(source: Path | None) -> str | None:
    return str(source) if source is not None else None


# ---- loading ---------------------------------------------------------------------------

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
_BOOT_KEYS = frozenset({"kernel", "initrd", "cmdline", "firmware"})
_DISK_KEYS = frozenset(
    {"name", "path", "backend", "size_mib", "resource", "lease_device", "lease_offset"}
)
_NIC_KEYS = frozenset({"mac", "model", "tap", "bridge", "ip", "vhost"})
_DEVICE_KEYS = frozenset({"driver", "props"})
_HOST_KEYS = frozenset({"address", "port", "netns", "paths", "disk", "nic"})
#: What may differ per host: host-local names only, never what the guest sees.
_HOST_DISK_KEYS = frozenset({"path", "lease_device"})
_HOST_NIC_KEYS = frozenset({"tap", "bridge"})
#: Keys of the sections that the definition derives per host.
_DERIVED = {
    "replication.listen": "derived per host from hosts.<name>.address and port",
    "replication.peer": "derived per host from the other host's address and port",
    "tap.host_tap": "derived per host from nic[0].tap (or hosts.<name>.nic.0.tap)",
}


class _Reader:
    """Typed access to the raw TOML tree; every failure names the file and the key."""

    def __init__(self, source: str | None) -> None:
        self.source = source

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(reason, path=self.source, key=key)

    def table(self, value: Any, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_tname(value)}")
        for k in value:
            if k not in allowed:
                raise self.error(
                    f"{key}.{k}" if key else k, f"unknown key (known: {', '.join(sorted(allowed))})"
                )
        return value

    def str_(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_tname(value)}")
        return value

    def int_(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_tname(value)}")
        if not lo <= value <= hi:
            raise self.error(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        text = self.str_(value, key)
        if text not in allowed:
            raise self.error(key, f"{text!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return text

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {_tname(value)}")
        return value


def _tname(value: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}
    names.update({dict: "a table", list: "an array"})
    return names.get(type(value), type(value).__name__) + (
        f" ({value!r})" if isinstance(value, str | int | float) else ""
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
    r = _Reader(_src(source))
    top = r.table(dict(data), "", _TOP_KEYS)
    notes: list[str] = []

    for key in ("name", "machine"):
        if key not in top:
            raise r.error(key, "missing (required)")
    name = r.str_(top["name"], "name")
    if not _NAME_RE.match(name):
        raise r.error("name", "must be 1-64 letters, digits, '-' or '_'")
    machine = _check_machine(r, r.str_(top["machine"], "machine"), machines, notes)
    vcpus = r.int_(top.get("vcpus", 1), "vcpus", 1, 64)
    memory_mib = r.int_(top.get("memory_mib", 128), "memory_mib", 16, 1 << 22)
    accel = cast(AccelName, r.choice(top.get("accel", "auto"), "accel", ("auto", "tcg", "kvm")))
    display = cast(Display, r.choice(top.get("display", "none"), "display", DISPLAYS))

    boot = _parse_boot(r, top.get("boot"))
    disks = _parse_disks(r, top.get("disk", []))
    nics = _parse_nics(r, top.get("nic", []))
    devices = _parse_devices(r, top.get("device", []))
    replication = _section(r, top, "replication", ReplicationConfig)
    tap = _section(r, top, "tap", TapConfig)
    alerts = _section(r, top, "alerts", AlertConfig)
    base_paths = top.get("paths", {})
    r.table(base_paths, "paths", frozenset(f.name for f in dataclasses.fields(PathsConfig)))
    hosts = _parse_hosts(r, top.get("hosts"), base_paths, disks, nics)
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
        _check_files(r, defn, host)
    return defn


def _check_machine(
    r: _Reader, machine: str, machines: MachineProbe | None, notes: list[str]
) -> str:
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


def _parse_boot(r: _Reader, raw: Any) -> BootDef:
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


def _parse_disks(r: _Reader, raw: Any) -> tuple[DiskDef, ...]:
    disks: list[DiskDef] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(r.array(raw, "disk")):
        k = f"disk[{i}]"
        t = r.table(item, k, _DISK_KEYS)
        name = r.str_(t.get("name", DEFAULT_DISK_NAME), f"{k}.name")
        if not _NAME_RE.match(name):
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
        _check_abs(r, f"{k}.path", path)
        size = t.get("size_mib")
        size_mib = r.int_(size, f"{k}.size_mib", 1, 1 << 40) if size is not None else None
        lease_device = r.str_(t.get("lease_device", ""), f"{k}.lease_device")
        if lease_device:
            _check_abs(r, f"{k}.lease_device", lease_device)
        lease_offset = r.int_(t.get("lease_offset", 0), f"{k}.lease_offset", 0, 1 << 62)
        disks.append(
            DiskDef(
                name=name,
                path=path,
                backend=backend,
                size_mib=size_mib,
                resource=resource,
                lease_device=lease_device,
                lease_offset=lease_offset,
            )
        )
    if len(disks) > MAX_DISKS:
        raise r.error(
            f"disk[{MAX_DISKS}]",
            f"at most {MAX_DISKS} disk per VM is protected in this version (found {len(disks)})",
        )
    return tuple(disks)


def _check_abs(r: _Reader, key: str, path: str) -> None:
    if not path.startswith("/") or "\n" in path:
        raise r.error(key, f"{path!r}: must be an absolute path")


def _check_ifname(r: _Reader, key: str, name: str) -> None:
    if not _IFNAME_RE.match(name):
        raise r.error(key, f"{name!r}: not a valid interface name (1-15 characters)")


def _parse_nics(r: _Reader, raw: Any) -> tuple[NicDef, ...]:
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
            _check_ifname(r, f"{k}.tap", tap)
        if bridge:
            _check_ifname(r, f"{k}.bridge", bridge)
        ip = r.str_(t.get("ip", ""), f"{k}.ip")
        if ip:
            try:
                if "/" not in ip:
                    raise ValueError("expected A.B.C.D/NN")
                ipaddress.IPv4Interface(ip)
            except ValueError as err:
                raise r.error(f"{k}.ip", f"{ip!r}: {err}") from err
        nics.append(NicDef(mac=mac, model=model, tap=tap, bridge=bridge, ip=ip))
    if len(nics) > MAX_NICS:
        raise r.error(
            f"nic[{MAX_NICS}]",
            f"at most {MAX_NICS} NIC per VM is protected in this version (found {len(nics)})",
        )
    return tuple(nics)


def device_refusal(driver: str) -> str | None:
    """Why ``driver`` cannot be an extra device, or None when it is allowed."""
    if driver in ALLOWED_DEVICES:
        return None
    if driver in _REFUSED_DEVICES:
        return _REFUSED_DEVICES[driver]
    if driver.startswith("vfio"):
        return "device passthrough: host hardware state cannot be replicated"
    if driver.startswith("vhost"):
        return "vhost devices move the device out of QEMU, beyond replication and the taps"
    return f"not on the list of devices known to replicate safely ({', '.join(ALLOWED_DEVICES)})"


def _parse_devices(r: _Reader, raw: Any) -> tuple[DeviceDef, ...]:
    devices: list[DeviceDef] = []
    for i, item in enumerate(r.array(raw, "device")):
        k = f"device[{i}]"
        t = r.table(item, k, _DEVICE_KEYS)
        if "driver" not in t:
            raise r.error(f"{k}.driver", "missing (required)")
        driver = r.str_(t["driver"], f"{k}.driver")
        why = device_refusal(driver)
        if why is not None:
            raise r.error(f"{k}.driver", f"{driver!r} is not supported: {why}")
        props: list[tuple[str, str]] = []
        raw_props = t.get("props", {})
        if not isinstance(raw_props, dict):
            raise r.error(f"{k}.props", f"expected a table, got {_tname(raw_props)}")
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
                raise r.error(pkey, f"expected a string, integer or boolean, got {_tname(pv)}")
            props.append((pk, value))
        devices.append(DeviceDef(driver=driver, props=tuple(props)))
    return tuple(devices)


def _section(r: _Reader, top: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    raw = top.get(name, {})
    if not isinstance(raw, dict):
        raise r.error(name, f"expected a table, got {_tname(raw)}")
    for key in raw:
        why = _DERIVED.get(f"{name}.{key}")
        if why is not None:
            raise r.error(f"{name}.{key}", f"not set in a VM definition: {why}")
    return build(cls, raw, path=r.source, prefix=name)


def _parse_hosts(
    r: _Reader,
    raw: Any,
    base_paths: Mapping[str, Any],
    disks: tuple[DiskDef, ...],
    nics: tuple[NicDef, ...],
) -> tuple[HostDef, ...]:
    if raw is None:
        raise r.error("hosts", "missing: [hosts.<name>] for each of the two hosts")
    if not isinstance(raw, dict):
        raise r.error("hosts", f"expected a table, got {_tname(raw)}")
    if len(raw) != 2:
        raise r.error(
            "hosts", f"exactly two hosts are needed, found {len(raw)} ({', '.join(raw) or '-'})"
        )
    hosts: list[HostDef] = []
    for hname, item in raw.items():
        k = f"hosts.{hname}"
        if not _NAME_RE.match(hname):
            raise r.error(k, "host names are letters, digits, '-' or '_'")
        t = r.table(item, k, _HOST_KEYS)
        if "address" not in t:
            raise r.error(f"{k}.address", "missing: this host's replication address")
        address = r.str_(t["address"], f"{k}.address")
        _check_address(r, f"{k}.address", address)
        port = r.int_(t.get("port", DEFAULT_PORT), f"{k}.port", 1, 65535)
        netns = r.str_(t.get("netns", ""), f"{k}.netns")
        if netns and not _NAME_RE.match(netns):
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


def _check_address(r: _Reader, key: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
        return
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(address):
        raise r.error(key, f"{address!r}: expected an IP address or a host name")


def _override_disks(
    r: _Reader, k: str, raw: Any, disks: tuple[DiskDef, ...], overridden: set[str]
) -> tuple[DiskDef, ...]:
    by_name = {d.name: i for i, d in enumerate(disks)}
    out = list(disks)
    if not isinstance(raw, dict):
        raise r.error(f"{k}.disk", f"expected a table, got {_tname(raw)}")
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
            _check_abs(r, f"{dk}.{key}", values[key])
            overridden.add(f"disk.{dname}.{key}")
        i = by_name[dname]
        out[i] = dataclasses.replace(out[i], **values)
    return tuple(out)


def _override_nics(
    r: _Reader, k: str, raw: Any, nics: tuple[NicDef, ...], overridden: set[str]
) -> tuple[NicDef, ...]:
    out = list(nics)
    if not isinstance(raw, dict):
        raise r.error(f"{k}.nic", f"expected a table, got {_tname(raw)}")
    for idx, changes in raw.items():
        if idx not in {str(i) for i in range(len(nics))}:
            raise r.error(f"{k}.nic.{idx}", f"no nic[{idx}] (the definition has {len(nics)} NIC)")
        nk = f"{k}.nic.{idx}"
        ct = r.table(changes, nk, _HOST_NIC_KEYS)
        values: dict[str, Any] = {}
        for key, value in ct.items():
            values[key] = r.str_(value, f"{nk}.{key}")
            if values[key]:
                _check_ifname(r, f"{nk}.{key}", values[key])
            overridden.add(f"nic.{idx}.{key}")
        i = int(idx)
        nic = dataclasses.replace(out[i], **values)
        if not nic.tap and not nic.bridge:
            raise r.error(f"{nk}.tap", "leaves the NIC with neither tap nor bridge")
        out[i] = nic
    return tuple(out)


def _check_files(r: _Reader, defn: VMDefinition, host: str | None) -> None:
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
                size = _size_bytes(disk.path)
            except OSError as err:
                raise r.error(key, f"{disk.path}: cannot read its size: {err.strerror}") from err
            if size != disk.size_mib * MiB:
                raise r.error(
                    key,
                    f"size mismatch: {disk.path} has {size} bytes ({size / MiB:g} MiB), "
                    f"disk[{i}].size_mib = {disk.size_mib}",
                )


# ---- identity --------------------------------------------------------------------------


def _file_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            size = f.tell()
    except OSError as err:
        return {"missing": err.strerror or str(err)}
    return {"size": size, "sha256": h.hexdigest()}


def identity(defn: VMDefinition, host: str | None = None) -> dict[str, Any]:
    """The host-independent part of the QEMU command line, as a JSON-able tree.

    Kernel and initrd are identified by their content (size and SHA-256, read here);
    disks by their declared size, or the size measured at ``host``'s path (the top-level
    path when None) when the definition gives none.
    """
    hdef = defn.host(host) if host is not None else None
    disks = hdef.disks if hdef is not None else defn.disks
    nics = hdef.nics if hdef is not None else defn.nics
    boot: dict[str, Any] = {"mode": defn.boot.mode}
    if defn.boot.mode == "kernel":
        boot["kernel"] = _file_identity(defn.boot.kernel)
        boot["initrd"] = _file_identity(defn.boot.initrd)
        boot["cmdline"] = defn.boot.cmdline
    else:
        boot["firmware"] = defn.boot.firmware
    disk_ids = []
    for d in disks:
        size = d.size_mib
        if size is None:
            try:
                size = _size_bytes(d.path) // MiB
            except OSError:
                size = None
        disk_ids.append({"name": d.name, "backend": d.backend, "size_mib": size})
    return {
        "format": 1,
        "name": defn.name,
        "machine": defn.machine,
        "vcpus": defn.vcpus,
        "memory_mib": defn.memory_mib,
        "accel": defn.accel,
        "display": defn.display,
        "boot": boot,
        "disks": disk_ids,
        "nics": [{"mac": n.mac, "model": n.model, "ip": n.ip} for n in nics],
        "devices": [d.qemu_arg() for d in defn.devices],
    }


def identity_digest(defn: VMDefinition | Mapping[str, Any], host: str | None = None) -> str:
    """SHA-256 (hex) of :func:`identity` in canonical JSON: equal on both hosts of a
    correctly defined pair."""
    ident = identity(defn, host) if isinstance(defn, VMDefinition) else dict(defn)
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(tree: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(tree, list):
        out[f"{prefix}.count"] = len(tree)
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = tree


_ABSENT = object()


def diff_identity(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("primary", "secondary"),
) -> list[str]:
    """The fields where two identities differ, one human line each, e.g.
    ``"memory_mib: primary 256, secondary 128"``. Empty when they are equal."""
    fa: dict[str, Any] = {}
    fb: dict[str, Any] = {}
    _flatten(a, "", fa)
    _flatten(b, "", fb)
    lines = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, _ABSENT), fb.get(key, _ABSENT)
        if va != vb:
            lines.append(f"{key}: {labels[0]} {_show(va)}, {labels[1]} {_show(vb)}")
    return lines


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return json.dumps(value) if (not value or " " in value) else value
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---- warnings --------------------------------------------------------------------------


def check_warnings(defn: VMDefinition) -> list[str]:
    """What an operator should know before protecting this VM (never fatal)."""
    out = list(defn.notes)
    vram = VIDEO_RAM_MIB.get(defn.display, 0)
    if vram:
        out.append(
            f'display = "{defn.display}": about {vram} MiB of video RAM lives outside the '
            f"shared RAM file and is sent with every checkpoint ({vram} MiB per checkpoint); "
            'prefer display = "none" with a serial console'
        )
    if defn.accel == "auto":
        out.append(
            'accel = "auto": each host picks KVM or TCG on its own; pin "tcg" or "kvm" so '
            "that both run the same accelerator"
        )
    if not defn.replication.key:
        out.append("replication.key is empty: the agents refuse to start without a key")
    if (
        defn.boot.mode == "kernel"
        and defn.display == "none"
        and "console=ttyS0" not in defn.boot.cmdline
    ):
        out.append(
            'boot.cmdline has no console=ttyS0: with display = "none" the serial console '
            "(console.log in the run directory) is the only console"
        )
    for h in defn.hosts:
        for i, nic in enumerate(h.nics):
            if not nic.tap:
                tap = nic.host_tap(defn.name)
                out.append(
                    f"hosts.{h.name}: nic[{i}] gives only bridge {nic.bridge}: TAP {tap} must "
                    f"exist there as a port of it (ip tuntap add {tap} mode tap; ip link set "
                    f"{tap} master {nic.bridge} up)"
                )
    for i, d in enumerate(defn.disks):
        if d.size_mib is None:
            out.append(
                f"disk[{i}].size_mib is not set: the hosts compare the sizes they measure; "
                "set it to have both checked against the definition"
            )
    return out


__all__ = [
    "ALLOWED_DEVICES",
    "DISPLAYS",
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
