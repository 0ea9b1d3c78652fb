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
    assert b[: len(a)] == a and b[len(a) :] == ["-S", "-incoming", "defer"]
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


def test_default_display_is_none_and_kernel_boot_unchanged() -> None:
    paths = VMPaths.for_vm("g", Path("/r"), Path("/s"))
    argv = qemu_argv(_spec(), paths)
    assert argv[argv.index("-vga") + 1] == "none"
    assert argv[argv.index("-kernel") + 1] == "/k" and argv[argv.index("-initrd") + 1] == "/i"
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    assert "-boot" not in argv


def test_firmware_boot_has_no_kernel_and_boots_the_disk() -> None:
    paths = VMPaths.for_vm("g", Path("/r"), Path("/s"))
    argv = qemu_argv(_spec(kernel=None, initrd=None), paths)
    for opt in ("-kernel", "-initrd", "-append"):
        assert opt not in argv
    assert argv[argv.index("-boot") + 1] == "c"


def test_kernel_without_initrd() -> None:
    paths = VMPaths.for_vm("g", Path("/r"), Path("/s"))
    argv = qemu_argv(_spec(initrd=None), paths)
    assert "-initrd" not in argv and "-kernel" in argv and "-append" in argv


def test_display_models_and_extra_devices() -> None:
    paths = VMPaths.for_vm("g", Path("/r"), Path("/s"))
    for display in ("std", "virtio", "qxl"):
        argv = qemu_argv(_spec(display=display), paths)
        assert argv[argv.index("-vga") + 1] == display
        assert argv[argv.index("-display") + 1] == "none"
    spec = _spec(devices=("virtio-rng-pci", "i6300esb"), incoming=True, extra_args=("-S",))
    argv = qemu_argv(spec, paths)
    assert argv[-8:] == [
        "-device",
        "virtio-rng-pci",
        "-device",
        "i6300esb",
        "-S",
        "-incoming",
        "defer",
        "-S",
    ]
