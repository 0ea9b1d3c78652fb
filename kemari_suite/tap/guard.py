"""Refuse a protected VM whose output could bypass the taps.

Output commit holds only while every output of the guest is tapped: its one NIC is a
``-netdev stream`` to the frame proxy and its one disk an NBD export of the block tap.
Anything else that lets the guest reach the outside world (another NIC, a
virtio-serial channel, a writable pflash or other disk, a shared folder, a parallel
port, extra character devices) would show output before its checkpoint commits.

The serial console (``-serial``) is allowed: it is documented as not output-committed
(after a failover it repeats what the primary printed after the last checkpoint).

:func:`check_tapped` inspects a :class:`~kemari_suite.vm.qemu.VMSpec`; ``-device``
entries in ``extra_args`` must be on an allow-list of devices without an output path
(extend it with ``allow_devices``).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import TapError
from kemari_suite.vm.qemu import VMSpec

#: Extra -device drivers that give the guest no way to send data out.
SAFE_DEVICES: frozenset[str] = frozenset(
    {
        "virtio-rng-pci",
        "virtio-rng-device",
        "virtio-balloon-pci",
        "pvpanic",
        "pvpanic-pci",
        "i6300esb",
        "ib700",
        "isa-debug-exit",
        "virtio-keyboard-pci",
        "virtio-mouse-pci",
        "virtio-tablet-pci",
    }
)

#: Options that attach an output path of their own.
FORBIDDEN_OPTIONS: frozenset[str] = frozenset(
    {
        "-netdev",
        "-nic",
        "-net",
        "-blockdev",
        "-pflash",
        "-mtdblock",
        "-sd",
        "-hda",
        "-hdb",
        "-hdc",
        "-hdd",
        "-parallel",
        "-chardev",
        "-virtfs",
        "-fsdev",
        "-usbdevice",
        "-object",
    }
)


def parse_keyval(text: str) -> tuple[str, dict[str, str]]:
    """Split a QEMU option string ("type,key=value,...", ",," escapes a comma) into its
    leading implicit value ("" if the first item is a key=value) and the keys."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    head = ""
    keys: dict[str, str] = {}
    for n, item in enumerate(items):
        if "=" in item:
            k, v = item.split("=", 1)
            keys[k] = v
        elif n == 0:
            head = item
        elif item:
            keys[item] = "on"
    return head, keys


class OutputKind(enum.Enum):
    """What kind of path to the outside an untapped output is."""

    NIC = "nic"
    DISK = "disk"
    SERIAL = "serial"
    CHANNEL = "channel"
    USB = "usb"
    FILESYSTEM = "filesystem"
    DISPLAY = "display"
    DEVICE = "device"


@dataclass(frozen=True)
class Untapped:
    """One guest output that bypasses the taps, found in a spec's extra arguments or
    devices: ``device`` names it as QEMU sees it, ``reason`` says where it leads."""

    kind: OutputKind
    device: str
    reason: str
    #: What makes it acceptable ("" when only removing it does).
    fix: str = ""


#: ``-serial``/``-chardev`` backends that connect the guest to other programs.
CHANNEL_BACKENDS: frozenset[str] = frozenset(
    {
        "socket",
        "tcp",
        "udp",
        "unix",
        "telnet",
        "websocket",
        "pipe",
        "pty",
        "serial",
        "tty",
        "parallel",
        "parport",
        "vc",
        "spiceport",
        "qemu-vdagent",
        "dbus",
    }
)
#: Backends and devices that pass guest USB traffic to another machine or program.
USB_REDIRECTION: frozenset[str] = frozenset({"spicevmc", "usb-redir", "usb-host"})
#: ``-serial``/``-chardev`` backends with no reader outside QEMU.
SILENT_BACKENDS: frozenset[str] = frozenset({"null", "none", "ringbuf", "memory", "stdio"})
#: Options that show the guest's screen (or its clipboard and USB) to remote clients.
DISPLAY_OPTIONS: frozenset[str] = frozenset({"-spice", "-vnc"})


def others_can_read(path: Path) -> bool:
    """True when ``path`` exists and a user other than its owner can read it. A file
    that does not exist yet is created by QEMU under the agents' umask (0077: the units
    set it), so it is private."""
    try:
        return bool(os.stat(path).st_mode & 0o044)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _file_output(kind: OutputKind, device: str, path: str) -> Untapped | None:
    if not path or others_can_read(Path(path)):
        return Untapped(
            kind,
            device,
            f"writes guest output to {path or '?'}, which other users can read",
            f"make {path or 'it'} readable by its owner alone (chmod 600, in a 0700 folder)",
        )
    return None


def _serial(arg: str, value: str) -> Untapped | None:
    """A ``-serial`` value: a private file or a silent backend is a console, anything
    that reaches another program is a channel."""
    device = f"{arg} {value}"
    backend, _, rest = value.partition(":")
    if backend in SILENT_BACKENDS or value.startswith(("chardev:", "mon:stdio")):
        return None
    if backend == "file":
        return _file_output(OutputKind.SERIAL, device, rest)
    if backend in USB_REDIRECTION:
        return Untapped(OutputKind.USB, device, "USB redirection to a remote client")
    return Untapped(
        OutputKind.SERIAL, device, "a channel to other programs (socket, pty or device)"
    )


def _chardev(arg: str, value: str) -> Untapped | None:
    backend, keys = parse_keyval(value)
    backend = backend or keys.get("backend", "")
    device = f"{arg} {value}"
    if backend in USB_REDIRECTION or keys.get("name") == "usbredir":
        return Untapped(OutputKind.USB, device, "USB redirection to a remote client")
    if backend in SILENT_BACKENDS - {"stdio"}:
        return None
    if backend == "file":
        return _file_output(OutputKind.CHANNEL, device, keys.get("path", ""))
    return Untapped(
        OutputKind.CHANNEL,
        device,
        f"a {backend or '?'} character device: a channel to other programs",
    )


def _device(value: str, allowed: frozenset[str]) -> Untapped | None:
    driver, keys = parse_keyval(value)
    driver = driver or keys.get("driver", "")
    device = f"-device {value}"
    if driver in allowed:
        return None
    if driver in USB_REDIRECTION:
        return Untapped(OutputKind.USB, device, "USB redirection or passthrough")
    if driver.startswith("virtio-serial") or driver in ("virtserialport", "virtconsole"):
        return Untapped(OutputKind.CHANNEL, device, "virtio-serial: a channel to host programs")
    return Untapped(
        OutputKind.DEVICE,
        device,
        f"{driver or '?'} is not known to be output-free",
        "pass allow_devices to accept it",
    )


def extra_outputs(spec: VMSpec, *, allow_devices: Iterable[str] = ()) -> Iterator[Untapped]:
    """Every untapped output among ``spec``'s extra arguments and ``-device`` entries (the
    NIC and the disk are the caller's: they depend on the taps the agent runs)."""
    allowed = SAFE_DEVICES | frozenset(allow_devices)
    args = list(spec.extra_args)
    for device in spec.devices:
        # The VM definition's extra devices face the same allow-list.
        args += ["-device", device]
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        opt = "-" + arg.lstrip("-")  # QEMU takes --opt as -opt
        value = args[i + 1] if i + 1 < len(args) else ""
        found: Untapped | None = None
        if opt == "-chardev":
            found = _chardev(arg, value)
        elif opt == "-usbdevice":
            found = Untapped(OutputKind.USB, f"{arg} {value}".rstrip(), "a USB device")
        elif opt in ("-virtfs", "-fsdev"):
            found = Untapped(OutputKind.FILESYSTEM, f"{arg} {value}", "a shared host folder")
        elif opt in DISPLAY_OPTIONS:
            found = Untapped(
                OutputKind.DISPLAY, f"{arg} {value}", "shows the guest to remote clients"
            )
        elif opt in FORBIDDEN_OPTIONS:
            found = Untapped(OutputKind.DEVICE, f"extra argument {arg} {value}".rstrip(), "")
        elif opt == "-drive":
            _, keys = parse_keyval(value)
            if keys.get("readonly") not in ("on", "true", "yes") and keys.get("media") != "cdrom":
                found = Untapped(OutputKind.DISK, f"writable -drive {value}", "a disk")
        elif opt == "-device":
            found = _device(value, allowed)
        elif opt == "-serial":
            found = _serial(arg, value)
        if found is not None:
            yield found


def _refuse(vm: str, why: str) -> TapError:
    return TapError(vm, f"untapped output: {why}")


def check_tapped(
    spec: VMSpec,
    *,
    net_socket: Path | str | None,
    nbd_socket: Path | str | None,
    allow_devices: Iterable[str] = (),
    accepted: Collection[str] = (),
) -> None:
    """Raise unless every output of ``spec`` goes through the taps.

    ``net_socket`` is the frame proxy's socket (None: the VM must have no NIC),
    ``nbd_socket`` the block tap's (None: the VM must have no disk). ``accepted`` names
    the outputs the operator accepted without output commit: ``"nic"``, ``"disk"`` or a
    ``-device`` string (see :mod:`kemari_suite.tap.outputs`).

    Raises:
        TapError: the NIC, the disk or an extra argument bypasses the taps; the message
            names it.
    """
    vm = spec.name
    if spec.netdev is not None and "nic" not in accepted:
        kind, keys = parse_keyval(spec.netdev)
        if net_socket is None:
            raise _refuse(vm, f"NIC -netdev {spec.netdev} but no frame proxy")
        want = str(net_socket)
        if (
            kind != "stream"
            or keys.get("server", "off") not in ("off", "false", "no")
            or keys.get("addr.type") != "unix"
            or keys.get("addr.path") != want
        ):
            raise _refuse(
                vm,
                f"NIC -netdev {spec.netdev}: expected "
                f"stream,server=off,addr.type=unix,addr.path={want}",
            )
    if spec.blockdev is not None and "disk" not in accepted:
        _, keys = parse_keyval(spec.blockdev)
        if nbd_socket is None:
            raise _refuse(vm, f"disk {spec.blockdev} but no block tap")
        want = str(nbd_socket)
        if (
            keys.get("driver") != "nbd"
            or keys.get("server.type") != "unix"
            or keys.get("server.path") != want
        ):
            raise _refuse(
                vm,
                f"disk {spec.blockdev}: expected driver=nbd,server.type=unix,server.path={want}",
            )
    for found in extra_outputs(spec, allow_devices=allow_devices):
        if found.device.removeprefix("-device ") in accepted:
            continue
        why = f"{found.device}: {found.reason}" if found.reason else found.device
        if found.fix:
            why += f" ({found.fix})"
        raise _refuse(vm, why)


__all__ = [
    "CHANNEL_BACKENDS",
    "DISPLAY_OPTIONS",
    "FORBIDDEN_OPTIONS",
    "SAFE_DEVICES",
    "USB_REDIRECTION",
    "OutputKind",
    "Untapped",
    "check_tapped",
    "extra_outputs",
    "others_can_read",
    "parse_keyval",
]
