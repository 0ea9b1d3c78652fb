"""What a VM is, and the QEMU command line derived from it (pure: nothing runs here).

:class:`VMSpec` is everything the command line depends on; :class:`VMPaths` the files a
VM owns; :func:`qemu_argv` turns the two into an argv. Both hosts of a pair derive the
line from the same spec, so a failover start runs the machine that was replicated.
:class:`~kemari_suite.vm.qemu.AsyncVM` starts QEMU from it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU_BINARY = "qemu-system-x86_64"

#: QEMU's seccomp filter (``-sandbox``) for a protected VM: obsolete system calls,
#: new processes (fork, execve), privilege changes (set*uid/gid) and scheduler or
#: affinity changes are refused; a QEMU that tries one is killed (SIGSYS). Nothing the
#: agents ask of QEMU needs them: the NIC is a TAP opened by name (``script=no``) or the
#: frame proxy's socket, the disk a file or the block tap's socket, and device state
#: goes to a unix socket (``migrate unix:``), never through ``exec:``.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: The same with ``-runas``: QEMU changes its user itself after its files are open,
#: which ``elevateprivileges=deny`` would kill it for (QEMU 7.2 installs the filter
#: before it drops privileges). The user change is the privilege drop.
SANDBOX_RUNAS = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


def choose_accel(requested: str = "auto") -> tuple[str, str]:
    """Pick the accelerator and say why.

    "auto" takes KVM only where the CPU advertises vmx or svm and /dev/kvm is usable, and
    not on a PVM nested host (kvm_pvm loaded), where stock guest kernels hang.
    """
    if requested in ("tcg", "kvm"):
        return requested, "set in config"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not usable"
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg", "/dev/kvm is a PVM nested host on which stock guest kernels hang"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    words = set(flags.split())
    if "vmx" not in words and "svm" not in words:
        return "tcg", "the CPU shows neither vmx nor svm"
    return "kvm", "hardware virtualization available"


@dataclass(frozen=True)
class VMSpec:
    """Everything the QEMU command line is derived from.

    Both hosts of a pair derive the command line from the same spec, so a failover start
    always matches the machine that was replicated; only ``ram_path`` and ``incoming``
    differ between them.

    ``kernel`` None means firmware boot (the disk's own bootloader, ``-boot c``); then
    ``initrd`` and ``append`` are not used.
    """

    name: str
    kernel: Path | None
    initrd: Path | None
    append: str = "console=ttyS0"
    memory_mib: int = 128
    vcpus: int = 1
    machine: str = "pc-i440fx-7.2"
    accel: str = "tcg"
    #: A ``-netdev`` option string without id (e.g. "tap,ifname=ktap0,script=no,downscript=no"
    #: or "stream,server=off,addr.type=unix,addr.path=/run/x.sock"), or None for no NIC.
    netdev: str | None = None
    mac: str = "52:54:00:12:34:56"
    #: A ``-blockdev`` driver option string without node-name (e.g.
    #: "driver=file,filename=/x.img" or "driver=nbd,server.type=unix,server.path=/x.sock"),
    #: or None for no disk. The raw format is put on top of it.
    blockdev: str | None = None
    #: Start with ``-S -incoming defer`` (the secondary's failover start): the loaded
    #: guest stays paused whatever run state its device state names (device sections
    #: saved by ``xen-save-devices-state`` name "running"), until the agent's ``cont``.
    incoming: bool = False
    #: Network namespace to run QEMU in (the lab's host namespaces).
    netns: str | None = None
    extra_args: tuple[str, ...] = ()
    #: The ``-vga`` model: "none" (the default: no video RAM outside the RAM file), "std",
    #: "virtio" or "qxl". Video RAM is not in the shared RAM file, so every device-state
    #: capture carries it.
    display: str = "none"
    #: Extra ``-device`` option strings (e.g. "virtio-rng-pci"), in this order on both hosts.
    devices: tuple[str, ...] = ()
    #: Run QEMU under its seccomp filter (:data:`SANDBOX`); ``vm.sandbox``.
    sandbox: bool = True
    #: Run QEMU as this user once its files are open (``-runas``); ``vm.runas``. Empty:
    #: as the agent. The user must be able to reach the VM's run directory (the
    #: device-state sockets are made there).
    runas: str = ""
    #: Outputs the operator accepted outside output commit (``unprotected_output = true``
    #: in a VM definition): "nic", "disk", or a ``-device`` string. Not on the command
    #: line; the taps' check and ``kemari status`` read it (:mod:`kemari_suite.tap.outputs`).
    unprotected_outputs: tuple[str, ...] = ()
    # The three image fields below say which guest image boots and why; they are not part
    # of the command line (``kernel``/``initrd`` are) and :func:`qemu_argv` ignores them.
    #: The image's id: the build key of a ``kemari image build`` image, or "sha256:..."
    #: over the kernel and initrd of any other (see :mod:`kemari_suite.vm.lastbuild`).
    image_id: str = ""
    #: Where the image came from: "built" (from the config's ``[image]``), "last-build"
    #: (the last ``kemari image build`` output), "configured" (``image.kernel``/``initrd``),
    #: "vm-definition" (its ``[boot]``); empty when the caller chose the files itself.
    image_source: str = ""
    #: One line saying why this image boots (and whether it differs from the last build).
    image_reason: str = ""
    #: The uffd-wp tracker's helper (:mod:`kemari_suite.vm.wphelper`), loaded into QEMU
    #: on both hosts (the failover start becomes the next primary); None: not loaded.
    wp_helper: Path | None = None
    #: How QEMU loads it: "plugin" (``-plugin``) or "preload" (``LD_PRELOAD``).
    wp_helper_mode: str = "plugin"
    #: Why the helper is loaded, or why not (shown with the tracker's choice).
    wp_helper_reason: str = ""

    def replace(self, **changes: Any) -> VMSpec:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class VMPaths:
    """The files a VM owns."""

    run_dir: Path
    ram: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr(self) -> Path:
        return self.run_dir / "qemu.stderr"

    @property
    def migration_socket(self) -> Path:
        return self.run_dir / "devstate.sock"

    @property
    def wp_socket(self) -> Path:
        """Where the uffd-wp helper inside QEMU listens."""
        return self.run_dir / "wp.sock"

    def qemu_files(self) -> list[Path]:
        """The files QEMU and its controller create in the run directory."""
        return [
            self.qmp,
            self.pidfile,
            self.console,
            self.stderr,
            self.migration_socket,
            self.wp_socket,
            self.run_dir / "cmdline",
        ]

    def remove_qemu_files(self) -> list[Path]:
        """Remove QEMU's files (not the agent's, which share the folder); then the
        folder itself if nothing else is left in it."""
        removed = []
        for f in self.qemu_files():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()
        return removed

    @classmethod
    def for_vm(cls, name: str, run_root: Path, shm_dir: Path) -> VMPaths:
        return cls(run_dir=run_root / f"kemari-{name}", ram=shm_dir / f"kemari-{name}.ram")


def qemu_argv(spec: VMSpec, paths: VMPaths) -> list[str]:
    """The QEMU command line for ``spec``. Pure: no side effects."""
    accel = spec.accel
    accel_opt = "tcg,thread=multi" if accel == "tcg" and spec.vcpus > 1 else accel
    argv = [
        QEMU_BINARY,
        "-name",
        f"{spec.name},debug-threads=on",
        "-machine",
        f"{spec.machine},memory-backend=ram0",
        "-accel",
        accel_opt,
        "-m",
        f"{spec.memory_mib}M",
        "-smp",
        str(spec.vcpus),
        "-object",
        f"memory-backend-file,id=ram0,size={spec.memory_mib}M,mem-path={paths.ram},share=on",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        spec.display,
    ]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        argv += ["-append", spec.append]
    else:
        argv += ["-boot", "c"]
    argv += [
        "-chardev",
        f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=ser0,path={paths.console}",
        "-serial",
        "chardev:ser0",
        "-pidfile",
        str(paths.pidfile),
        # A guest poweroff leaves QEMU up (status "shutdown") and raises SHUTDOWN: the
        # agent forwards it instead of mistaking the exit for a host failure.
        "-no-shutdown",
    ]
    if spec.sandbox:
        argv += ["-sandbox", SANDBOX_RUNAS if spec.runas else SANDBOX]
    if spec.runas:
        argv += ["-runas", spec.runas]
    if spec.netdev is not None:
        argv += [
            "-netdev",
            f"{spec.netdev},id=net0",
            # romfile= keeps the option ROM out of every device-state capture.
            "-device",
            f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
        ]
    if spec.blockdev is not None:
        argv += [
            "-blockdev",
            f"{spec.blockdev},node-name=disk0-file",
            "-blockdev",
            "driver=raw,file=disk0-file,node-name=disk0",
            "-device",
            "virtio-blk-pci,drive=disk0",
        ]
    for device in spec.devices:
        argv += ["-device", device]
    if spec.wp_helper is not None and spec.wp_helper_mode == "plugin":
        argv += ["-plugin", f"{spec.wp_helper},sock={paths.wp_socket}"]
    if spec.incoming:
        argv += ["-S", "-incoming", "defer"]
    argv += list(spec.extra_args)
    if spec.netns is not None:
        argv = ["ip", "netns", "exec", spec.netns, *argv]
    return argv


def qemu_env(spec: VMSpec, paths: VMPaths) -> dict[str, str]:
    """Environment QEMU needs beyond the agent's: the helper, when it is preloaded."""
    if spec.wp_helper is None or spec.wp_helper_mode != "preload":
        return {}
    return {"LD_PRELOAD": str(spec.wp_helper), "KEMARI_WP_SOCK": str(paths.wp_socket)}


@dataclass(frozen=True)
class IOPaths:
    """The sockets through which the agent's taps serve the guest's disk and NIC."""

    nbd: Path
    net: Path


def io_paths(paths: VMPaths) -> IOPaths:
    return IOPaths(nbd=paths.run_dir / "nbd.sock", net=paths.run_dir / "net.sock")


__all__ = [
    "QEMU_BINARY",
    "SANDBOX",
    "SANDBOX_RUNAS",
    "IOPaths",
    "VMPaths",
    "VMSpec",
    "choose_accel",
    "io_paths",
    "qemu_argv",
    "qemu_env",
]
