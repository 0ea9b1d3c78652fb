"""Level-2 guests: the project's own guest (kernel + busybox initramfs) run by QEMU
*inside* an L1, under KVM (nested SVM) or TCG.

The L1 image needs QEMU for this: build it with :data:`NESTED_PACKAGES`. The guest's
kernel and initramfs are copied into the L1 through the agent (:func:`push_guest`); the
L2 QEMU is daemonized inside the L1 with its console in a file, and stopped by the PID
in its pid file::

    host --agent--> L1: /var/lib/klab/l2/{vmlinuz,initrd.img}
                    L1: qemu-system-x86_64 -accel kvm ... -daemonize -pidfile /run/klab-<name>.pid
                        console -> /run/klab-<name>.console

Only the AMD path exists here (TCG emulates SVM, not VMX): ``modprobe kvm_amd``.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from typing import Literal

from kemari_suite.errors import VMError
from kemari_suite.klab.drbd import Runner
from kemari_suite.klab.image import DEFAULT_PACKAGES
from kemari_suite.vm.image import GuestImage, kernel_cmdline

#: The L1 packages for nested guests: the lab's, plus QEMU.
NESTED_PACKAGES: tuple[str, ...] = (*DEFAULT_PACKAGES, "qemu-system-x86")
#: The image size for :data:`NESTED_PACKAGES` (QEMU and its firmware take ~300 MiB).
NESTED_SIZE_MIB = 2048
GUEST_DIR = "/var/lib/klab/l2"
BOOTED_MARKER = "KEMARI-BOOTED"


@dataclass(frozen=True)
class L2Guest:
    """An L2 QEMU running inside an L1."""

    name: str
    accel: str
    pid: int
    #: Seconds from the start command to :data:`BOOTED_MARKER` on its console.
    boot_s: float

    @property
    def console(self) -> str:
        return f"/run/klab-{self.name}.console"


def push_guest(l1: Runner, image: GuestImage) -> tuple[str, str]:
    """Copy the guest's kernel and initramfs into the L1; their paths there.

    Raises:
        AgentError: the copy failed.
    """
    paths = []
    for src, name in ((image.kernel, "vmlinuz"), (image.initrd, "initrd.img")):
        dest = f"{GUEST_DIR}/{name}"
        l1.run(f"mkdir -p {GUEST_DIR} && cat > {dest}", stdin=src.read_bytes(), timeout=300)
        paths.append(dest)
    return paths[0], paths[1]


def enable_kvm(l1: Runner) -> bool:
    """``modprobe kvm_amd``; whether /dev/kvm is usable afterwards. Raises AgentError."""
    l1.run("modprobe kvm_amd", timeout=120, check=False)
    return l1.run("test -c /dev/kvm", check=False).exit_code == 0


def start_l2(
    l1: Runner,
    kernel: str,
    initrd: str,
    *,
    name: str = "l2",
    accel: Literal["kvm", "tcg"] = "kvm",
    memory_mib: int = 128,
    run: str | None = None,
    drives: tuple[str, ...] = (),
    forward_port: int | None = None,
    ready_marker: str = BOOTED_MARKER,
    boot_timeout: float = 240.0,
) -> L2Guest:
    """Start an L2 QEMU inside the L1 and wait for ``ready_marker`` on its console.

    ``drives`` are block devices of the L1 given to the guest as virtio disks, in order
    (``/dev/vda``...: e.g. ``/dev/drbd0``). ``run`` is the command the guest's init runs.
    ``forward_port`` gives the guest a NIC (QEMU's user network, guest 10.0.2.15) and
    forwards that TCP port of the L1's 127.0.0.1 to the same port of the guest.

    Raises:
        AgentError: QEMU could not start in the L1.
        VMError: the guest did not print its ready marker in time (console tail given).
    """
    console, pidfile = f"/run/klab-{name}.console", f"/run/klab-{name}.pid"
    net = forward_port is not None
    append = kernel_cmdline(
        run=run, ip="10.0.2.15/24" if net else None, gw="10.0.2.2" if net else None
    )
    argv = [
        "qemu-system-x86_64", "-name", name, "-accel", accel, "-m", f"{memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", kernel, "-initrd", initrd, "-append", append,
        "-serial", f"file:{console}", "-pidfile", pidfile, "-daemonize",
    ]  # fmt: skip
    if net:
        argv += [
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{forward_port}-:{forward_port}",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]  # fmt: skip
    if accel == "kvm":
        argv[argv.index("-accel") : argv.index("-accel") + 2] = ["-accel", "kvm", "-cpu", "host"]
    for i, dev in enumerate(drives):
        argv += ["-drive", f"if=virtio,index={i},format=raw,cache=none,file={dev}"]
    t0 = time.monotonic()
    l1.run(f"rm -f {console} {pidfile} && {shlex.join(argv)}", timeout=120)
    pid = int(l1.run(f"cat {pidfile}").stdout.strip())
    while ready_marker not in l1.run(f"cat {console} 2>/dev/null || true").stdout:
        if time.monotonic() - t0 > boot_timeout:
            tail = l1.run(f"tail -n 20 {console} 2>/dev/null || true", check=False).stdout
            raise VMError(name, f"no {ready_marker} after {boot_timeout:.0f} s:\n{tail}")
        time.sleep(0.5)
    return L2Guest(name, accel, pid, time.monotonic() - t0)


def stop_l2(l1: Runner, guest: L2Guest) -> None:
    """SIGKILL the L2's QEMU inside the L1 (by its PID). Raises AgentError."""
    l1.run(f"kill -9 {guest.pid} 2>/dev/null; true")


__all__ = [
    "BOOTED_MARKER",
    "GUEST_DIR",
    "NESTED_PACKAGES",
    "NESTED_SIZE_MIB",
    "L2Guest",
    "enable_kvm",
    "push_guest",
    "start_l2",
    "stop_l2",
]
