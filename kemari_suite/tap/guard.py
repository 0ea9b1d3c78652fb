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

from collections.abc import Iterable
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


def _refuse(vm: str, why: str) -> TapError:
    return TapError(vm, f"untapped output: {why}")


def check_tapped(
    spec: VMSpec,
    *,
    net_socket: Path | str | None,
    nbd_socket: Path | str | None,
    allow_devices: Iterable[str] = (),
) -> None:
    """Raise unless every output of ``spec`` goes through the taps.

    ``net_socket`` is the frame proxy's socket (None: the VM must have no NIC),
    ``nbd_socket`` the block tap's (None: the VM must have no disk).

    Raises:
        TapError: the NIC, the disk or an extra argument bypasses the taps; the message
            names it.
    """
    vm = spec.name
    if spec.netdev is not None:
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
    if spec.blockdev is not None:
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
    allowed = SAFE_DEVICES | frozenset(allow_devices)
    args = list(spec.extra_args)
    for device in getattr(spec, "devices", ()):
        # The VM definition's extra devices face the same allow-list.
        args += ["-device", device]
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        opt = "-" + arg.lstrip("-")  # QEMU takes --opt as -opt
        value = args[i + 1] if i + 1 < len(args) else ""
        if opt in FORBIDDEN_OPTIONS:
            raise _refuse(vm, f"extra argument {arg} {value}".rstrip())
        if opt == "-drive":
            _, keys = parse_keyval(value)
            if keys.get("readonly") not in ("on", "true", "yes") and keys.get("media") != "cdrom":
                raise _refuse(vm, f"writable -drive {value}")
        if opt == "-device":
            driver, keys = parse_keyval(value)
            driver = driver or keys.get("driver", "")
            if driver not in allowed:
                raise _refuse(
                    vm,
                    f"-device {value}: {driver or '?'} is not known to be output-free "
                    "(pass allow_devices to accept it)",
                )
        if opt == "-serial" and value.startswith(("tcp:", "udp:", "unix:", "pipe:", "pty")):
            # The console to a file or stdio is fine; a serial line to a socket is a
            # channel to other programs.
            raise _refuse(vm, f"-serial {value} is a channel, not a console")


__all__ = ["FORBIDDEN_OPTIONS", "SAFE_DEVICES", "check_tapped", "parse_keyval"]
