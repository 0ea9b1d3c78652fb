"""Attach to a TAP device (``/dev/net/tun``, ``IFF_TAP | IFF_NO_PI``), optionally inside a
named network namespace.

A tun file descriptor belongs to the network namespace it was opened in, and the
interface name is looked up there. ``setns(CLONE_NEWNET)`` switches only the calling
thread, so a short-lived thread enters the namespace, opens and attaches the device, and
hands the descriptor back; it keeps working from any thread afterwards. The device
itself (for example the lab's ``ktap-<id>-p``, created persistent by ``ip tuntap add``)
must exist or may be created; only one descriptor can be attached to a single-queue TAP
at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct
import threading
from dataclasses import dataclass

from kemari_suite.errors import TapError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16


@dataclass
class TapDevice:
    """An attached TAP device: a non-blocking descriptor reading and writing whole
    Ethernet frames."""

    name: str
    fd: int
    netns: str | None = None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _attach(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _setns(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(nsfd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(nsfd)


def open_tap(name: str, *, netns: str | None = None) -> TapDevice:
    """Attach to TAP ``name`` (in namespace ``netns`` if given, else in our own).

    Raises:
        TapError: bad name, no such namespace, no permission, or the device is busy
            (another process is attached) or is not a TAP.
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise TapError(name or "?", "not a valid interface name")
    if netns is None:
        try:
            return TapDevice(name, _attach(name))
        except OSError as err:
            raise TapError(name, f"cannot attach: {err}") from err
    result: dict[str, object] = {}

    def work() -> None:
        try:
            _setns(netns)
            result["fd"] = _attach(name)
        except OSError as err:
            result["error"] = err

    # A fresh thread that ends right after: its namespace switch dies with it.
    t = threading.Thread(target=work, name=f"tap-{name}", daemon=True)
    t.start()
    t.join()
    failure = result.get("error")
    if failure is not None or "fd" not in result:
        raise TapError(name, f"cannot attach in namespace {netns}: {failure}")
    fd = result["fd"]
    assert isinstance(fd, int)
    return TapDevice(name, fd, netns)


__all__ = ["TapDevice", "open_tap"]
