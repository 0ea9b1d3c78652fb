from __future__ import annotations

from pathlib import Path

from kemari_suite.vm.qemu import VMPaths, VMSpec, choose_accel, qemu_argv


def _spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(name="g", kernel=Path("/k"), initrd=Path("/i"))
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def test_argv_shares_ram_and_pins_machine() -> None:
    paths = VMPaths.for_vm("g", Path("/run/x"), Path("/dev/shm"))
    argv = qemu_argv(_spec(), paths)
    joined = " ".join(argv)
    assert "memory-backend-file,id=ram0,size=128M,mem-path=/dev/shm/kemari-g.ram,share=on" in joined
    assert "pc-i440fx-7.2,memory-backend=ram0" in joined
    assert "-incoming" not in argv
    assert argv[0] == "qemu-system-x86_64"


def test_primary_and_failover_lines_differ_only_in_incoming() -> None:
    paths = VMPaths.for_vm("g", Path("/run/x"), Path("/dev/shm"))
    spec = _spec(netdev="tap,ifname=t0,script=no,downscript=no", blockdev="driver=file,filename=/d")
    a = qemu_argv(spec, paths)
    b = qemu_argv(spec.replace(incoming=True), paths)
    assert b[: len(a)] == a and b[len(a) :] == ["-incoming", "defer"]
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile=" in a


def test_netns_and_smp() -> None:
    paths = VMPaths.for_vm("g", Path("/r"), Path("/s"))
    argv = qemu_argv(_spec(netns="ns1", vcpus=2, accel="tcg"), paths)
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert "tcg,thread=multi" in argv


def test_choose_accel_override_and_reason() -> None:
    assert choose_accel("tcg") == ("tcg", "set in config")
    accel, why = choose_accel("auto")
    assert accel in ("tcg", "kvm") and why
