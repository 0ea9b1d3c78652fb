"""The VM definition tree (what :func:`~kemari_suite.vm.vmdef.load_vmdef` returns) and
what one host derives from it.

:class:`VMDefinition` is the validated tree; :meth:`VMDefinition.for_host` gives a
host's :class:`HostView`: its :class:`~kemari_suite.config.KemariConfig` and its
:class:`~kemari_suite.vm.spec.VMSpec`, from which :meth:`HostView.argv` builds the QEMU
command line. :func:`masked_argv` masks the host-local parts so two hosts' lines compare.
Nothing here reads the TOML file: that is :mod:`kemari_suite.vm.vmparse`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kemari_suite.config import (
    AlertConfig,
    DiskBackendKind,
    DiskConfig,
    DiskFencing,
    ImageConfig,
    KemariConfig,
    PathsConfig,
    ReplicationConfig,
    TapConfig,
    VMConfig,
)
from kemari_suite.errors import ConfigError
from kemari_suite.vm.lastbuild import image_id_of
from kemari_suite.vm.spec import VMPaths, VMSpec, choose_accel, io_paths, qemu_argv

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
    #: "scsi-pr": SCSI-3 reservations fence the old writer (backend = "shared").
    fencing: DiskFencing = ""
    #: The operator accepts this disk without the block tap: QEMU writes it directly,
    #: ahead of the checkpoint, and nothing replicates it (``unprotected_output``).
    unprotected_output: bool = False


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
    #: The operator accepts this NIC without the frame proxy: QEMU opens the TAP itself
    #: and the guest's frames leave before their checkpoint (``unprotected_output``).
    unprotected_output: bool = False

    def host_tap(self, vm_name: str) -> str:
        """The TAP the frame proxy opens: ``tap``, or ``kt-<vm>`` for a bridge-only NIC."""
        return self.tap or f"kt-{vm_name}"[:15]


@dataclass(frozen=True)
class DeviceDef:
    """One extra ``-device`` from the allow-list."""

    driver: str
    props: tuple[tuple[str, str], ...] = ()
    #: The operator accepts the device's output path without output commit
    #: (``unprotected_output``).
    unprotected_output: bool = False

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

    def unprotected_outputs(self, host: str | None = None) -> tuple[str, ...]:
        """The outputs this definition accepts without output commit, as
        ``VMSpec.unprotected_outputs`` names them: ``"nic"``, ``"disk"``, or the
        ``-device`` string of a ``[[device]]``."""
        hdef = self.host(host) if host is not None else None
        disks = hdef.disks if hdef is not None else self.disks
        nics = hdef.nics if hdef is not None else self.nics
        out: list[str] = []
        if any(n.unprotected_output for n in nics):
            out.append("nic")
        if any(d.unprotected_output for d in disks):
            out.append("disk")
        out += [d.qemu_arg() for d in self.devices if d.unprotected_output]
        return tuple(out)

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
        # An accepted unprotected NIC is QEMU's own TAP, an accepted disk QEMU's own file:
        # the agents then neither proxy nor serve them.
        direct_nic = nic is not None and nic.unprotected_output
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
                # The frame proxy wires the NIC (tap.host_tap); no direct -netdev, unless
                # the operator accepted the NIC unprotected.
                netdev=_direct_netdev(nic, self.name) if nic and direct_nic else "",
                netns=me.netns,
                ip=nic.ip if nic else "",
                unprotected_output=direct_nic,
            ),
            replication=dataclasses.replace(
                self.replication, listen=me.replication_address, peer=peer.replication_address
            ),
            tap=dataclasses.replace(
                self.tap, host_tap=nic.host_tap(self.name) if nic and not direct_nic else ""
            ),
            disk=_disk_config(disk),
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
            netdev=_direct_netdev(nic, self.name) if nic else None,
            mac=nic.mac if nic else VMSpec.mac,
            blockdev=_blockdev(disk.path) if disk else None,
            netns=me.netns or None,
            display=self.display,
            devices=tuple(d.qemu_arg() for d in self.devices),
            image_id=image_id_of(self.boot.kernel, self.boot.initrd),
            image_source="vm-definition",
            image_reason=(
                f"the VM definition's [boot]: kernel {self.boot.kernel}, initrd {self.boot.initrd}"
                if self.boot.kernel is not None
                else "the VM definition boots from its disk (firmware)"
            ),
        )
        spec = with_unprotected(spec, self.unprotected_outputs(host))
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
        io = io_paths(self.paths)
        netdev = self.spec.netdev
        if netdev is not None and self.config.tap.host_tap:
            netdev = f"stream,server=off,addr.type=unix,addr.path={io.net}"
        blockdev = self.spec.blockdev
        if blockdev is not None and self.config.disk.path:
            blockdev = f"driver=nbd,server.type=unix,server.path={io.nbd},export=disk0"
        return self.spec.replace(netdev=netdev, blockdev=blockdev)

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


def _disk_config(disk: DiskDef | None) -> DiskConfig:
    """The agents' ``[disk]``: the disk behind the block tap, or, for a disk the operator
    accepted unprotected (QEMU opens it itself), only its lease."""
    if disk is None:
        return DiskConfig()
    if disk.unprotected_output:
        return DiskConfig(lease_device=disk.lease_device, lease_offset=disk.lease_offset)
    return DiskConfig(
        backend=disk.backend,
        path=disk.path,
        size_mib=disk.size_mib if disk.size_mib is not None else _measured_mib(disk),
        lease_device=disk.lease_device,
        lease_offset=disk.lease_offset,
        fencing=disk.fencing,
    )


def _direct_netdev(nic: NicDef, vm_name: str) -> str:
    return f"tap,ifname={nic.host_tap(vm_name)},script=no,downscript=no"


def with_unprotected(spec: VMSpec, names: tuple[str, ...]) -> VMSpec:
    """``spec`` carrying the accepted unprotected outputs ``names`` (its
    ``unprotected_outputs``), so that the taps' check honours them."""
    return spec.replace(unprotected_outputs=names) if names else spec


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


def size_bytes(path: str) -> int:
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
        return size_bytes(disk.path) // MiB
    except OSError:
        return DiskConfig.size_mib


def _src(source: Path | None) -> str | None:
    return str(source) if source is not None else None


__all__ = [
    "ALLOWED_DEVICES",
    "DEFAULT_DISK_NAME",
    "DEFAULT_PORT",
    "DISPLAYS",
    "MAX_DISKS",
    "MAX_NICS",
    "NIC_MODELS",
    "VIDEO_RAM_MIB",
    "AccelName",
    "BootDef",
    "DeviceDef",
    "DiskDef",
    "Display",
    "Firmware",
    "HostDef",
    "HostView",
    "NicDef",
    "VMDefinition",
    "guest_cmdline",
    "masked_argv",
    "size_bytes",
    "with_unprotected",
]
