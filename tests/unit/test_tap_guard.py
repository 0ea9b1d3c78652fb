"""Refusing protected VMs whose output bypasses the taps."""

from __future__ import annotations

from pathlib import Path

import pytest

from kemari_suite.errors import TapError
from kemari_suite.tap.guard import check_tapped, parse_keyval
from kemari_suite.vm.qemu import VMSpec

NET = Path("/run/k/net.sock")
NBD = Path("/run/k/nbd.sock")
GOOD_NET = f"stream,server=off,addr.type=unix,addr.path={NET}"
GOOD_DISK = f"driver=nbd,server.type=unix,server.path={NBD},export=disk0"


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(
        name="g", kernel=Path("/k"), initrd=Path("/i"), netdev=GOOD_NET, blockdev=GOOD_DISK
    )
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def test_keyval_parsing() -> None:
    assert parse_keyval("stream,server=off,addr.path=/a,,b") == (
        "stream",
        {"server": "off", "addr.path": "/a,b"},
    )
    assert parse_keyval("driver=nbd,readonly") == ("", {"driver": "nbd", "readonly": "on"})


def test_a_fully_tapped_vm_passes() -> None:
    check_tapped(
        spec(extra_args=("-no-shutdown", "-device", "virtio-rng-pci", "-serial", "file:/x")),
        net_socket=NET,
        nbd_socket=NBD,
    )
    check_tapped(spec(netdev=None, blockdev=None), net_socket=None, nbd_socket=None)
    check_tapped(
        spec(extra_args=("-drive", "file=/iso,media=cdrom", "-device", "my-dev,x=1")),
        net_socket=NET,
        nbd_socket=NBD,
        allow_devices=["my-dev"],
    )


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"netdev": "tap,ifname=t0,script=no"}, "expected stream"),
        ({"netdev": "stream,server=on,addr.type=unix,addr.path=/run/k/net.sock"}, "NIC"),
        ({"netdev": "stream,server=off,addr.type=unix,addr.path=/other"}, "NIC"),
        ({"blockdev": "driver=file,filename=/disk.img"}, "expected driver=nbd"),
        ({"blockdev": "driver=nbd,server.type=unix,server.path=/other"}, "disk"),
        ({"extra_args": ("-netdev", "user,id=n1")}, "-netdev"),
        ({"extra_args": ("-nic", "user")}, "-nic"),
        ({"extra_args": ("--chardev", "socket,id=c,path=/s")}, "--chardev"),
        ({"extra_args": ("-drive", "if=pflash,file=/vars.fd")}, "writable -drive"),
        ({"extra_args": ("-device", "virtio-serial-pci")}, "virtio-serial-pci"),
        ({"extra_args": ("-device", "driver=e1000,netdev=x")}, "e1000"),
        ({"extra_args": ("-virtfs", "local,path=/x")}, "-virtfs"),
        ({"extra_args": ("-serial", "tcp:1.2.3.4:5")}, "channel"),
    ],
)
def test_untapped_outputs_are_refused(changes: dict[str, object], why: str) -> None:
    with pytest.raises(TapError, match="untapped output") as exc:
        check_tapped(spec(**changes), net_socket=NET, nbd_socket=NBD)
    assert why in str(exc.value)


def test_devices_without_their_tap_are_refused() -> None:
    with pytest.raises(TapError, match="no frame proxy"):
        check_tapped(spec(), net_socket=None, nbd_socket=NBD)
    with pytest.raises(TapError, match="no block tap"):
        check_tapped(spec(), net_socket=NET, nbd_socket=None)
