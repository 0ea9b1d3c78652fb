"""No guest output escapes output commit: the audit protect and `kemari check` share."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import pytest

from kemari_suite.config import (
    DiskConfig,
    KemariConfig,
    PathsConfig,
    ReplicationConfig,
    TapConfig,
    VMConfig,
)
from kemari_suite.errors import ConfigError, TapError
from kemari_suite.node import run_primary
from kemari_suite.tap.guard import OutputKind, check_tapped
from kemari_suite.tap.outputs import (
    audit_outputs,
    check_outputs,
    check_wired,
    unprotected_outputs,
)
from kemari_suite.vm.spec import VMSpec
from kemari_suite.vm.vmdef import VMDefinition, parse_vmdef

PLAIN_TAP = "tap,ifname=tap0,script=no,downscript=no"


def cfg_with(**vm: object) -> KemariConfig:
    return KemariConfig(vm=VMConfig(**vm))  # type: ignore[arg-type]


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(name="g", kernel=Path("/k"), initrd=Path("/i"))
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


# ---- the NIC of vm.netdev ------------------------------------------------------------


def test_a_plain_tap_netdev_is_refused_naming_the_fix() -> None:
    cfg = cfg_with(netdev=PLAIN_TAP)
    audit = audit_outputs(cfg)
    assert not audit.ok
    [f] = audit.refused
    assert f.kind is OutputKind.NIC
    assert f.key == "vm.netdev"
    with pytest.raises(ConfigError) as exc:
        check_outputs(cfg)
    text = str(exc.value)
    assert "vm.netdev" in text and "tap0" in text
    assert 'tap.host_tap = "tap0"' in text
    assert "unprotected_output = true" in text


def test_the_frame_proxy_taps_the_nic() -> None:
    cfg = KemariConfig(tap=TapConfig(host_tap="tap0"))
    assert audit_outputs(cfg).findings == ()
    # tap.host_tap wins over a leftover vm.netdev: the agent rewires the NIC.
    cfg = dataclasses.replace(cfg, vm=VMConfig(netdev=PLAIN_TAP))
    assert audit_outputs(cfg, spec(netdev=PLAIN_TAP)).ok
    assert audit_outputs(KemariConfig()).findings == ()


def test_an_accepted_nic_is_allowed_and_reported() -> None:
    cfg = cfg_with(netdev=PLAIN_TAP, unprotected_output=True)
    audit = check_outputs(cfg)
    assert audit.ok and len(audit.accepted) == 1
    [line] = unprotected_outputs(cfg)
    assert "tap0" in line and "unprotected_output = true" in line
    assert unprotected_outputs(KemariConfig(tap=TapConfig(host_tap="t"))) == []


# ---- disks, serial ports, channels, USB ----------------------------------------------


def test_a_disk_outside_the_block_tap_is_refused() -> None:
    s = spec(blockdev="driver=file,filename=/d.img")
    [f] = audit_outputs(KemariConfig(), s).refused
    assert f.kind is OutputKind.DISK and "/d.img" in f.device
    assert "[[disk]]" in f.fix
    # With disk.path the block tap serves it.
    assert audit_outputs(KemariConfig(disk=DiskConfig(path="/d.img")), s).ok


@pytest.mark.parametrize(
    ("args", "kind", "word"),
    [
        (("-serial", "tcp:1.2.3.4:5"), OutputKind.SERIAL, "channel"),
        (("-serial", "pty"), OutputKind.SERIAL, "pty"),
        (("-serial", "unix:/run/s.sock,server"), OutputKind.SERIAL, "unix"),
        (("-chardev", "socket,id=c0,path=/s"), OutputKind.CHANNEL, "socket"),
        (("-chardev", "pty,id=c0"), OutputKind.CHANNEL, "pty"),
        (("-device", "virtio-serial-pci"), OutputKind.CHANNEL, "virtio-serial"),
        (("-device", "virtserialport,chardev=c0"), OutputKind.CHANNEL, "virtserialport"),
        (("-device", "usb-redir,chardev=u0"), OutputKind.USB, "USB"),
        (("-chardev", "spicevmc,id=u0,name=usbredir"), OutputKind.USB, "USB"),
        (("-usbdevice", "tablet"), OutputKind.USB, "-usbdevice"),
        (("-spice", "port=5900"), OutputKind.DISPLAY, "-spice"),
        (("-vnc", ":0"), OutputKind.DISPLAY, "-vnc"),
        (("-virtfs", "local,path=/x"), OutputKind.FILESYSTEM, "-virtfs"),
    ],
)
def test_channels_and_usb_redirection_are_refused(
    args: tuple[str, ...], kind: OutputKind, word: str
) -> None:
    audit = audit_outputs(KemariConfig(), spec(extra_args=args))
    [f] = audit.refused
    assert f.kind is kind
    assert word in f.describe()
    with pytest.raises(ConfigError, match="untapped guest output"):
        audit.raise_if_refused()
    with pytest.raises(TapError, match="untapped output"):
        check_tapped(spec(extra_args=args), net_socket=None, nbd_socket=None)


def test_a_serial_file_others_can_read_is_refused(tmp_path: Path) -> None:
    public = tmp_path / "public.log"
    public.write_text("")
    public.chmod(0o644)
    private = tmp_path / "private.log"
    private.write_text("")
    private.chmod(0o600)
    [f] = audit_outputs(KemariConfig(), spec(extra_args=("-serial", f"file:{public}"))).refused
    assert str(public) in f.describe() and "chmod 600" in f.fix
    assert audit_outputs(KemariConfig(), spec(extra_args=("-serial", f"file:{private}"))).ok
    chardev = ("-chardev", f"file,id=c,path={public}")
    assert not audit_outputs(KemariConfig(), spec(extra_args=chardev)).ok
    # Consoles with no reader outside QEMU.
    for value in ("null", "stdio", "none"):
        assert audit_outputs(KemariConfig(), spec(extra_args=("-serial", value))).ok


def test_every_refused_output_is_named_at_once() -> None:
    cfg = cfg_with(netdev=PLAIN_TAP)
    s = spec(
        netdev=PLAIN_TAP,
        blockdev="driver=file,filename=/d.img",
        extra_args=("-serial", "pty", "-device", "usb-redir,chardev=u"),
    )
    with pytest.raises(ConfigError) as exc:
        check_outputs(cfg, s)
    text = str(exc.value)
    for part in ("tap0", "/d.img", "-serial pty", "usb-redir"):
        assert part in text


# ---- the taps' own check honours what was accepted ------------------------------------


def test_the_wired_check_honours_accepted_outputs() -> None:
    s = spec(netdev=PLAIN_TAP)
    with pytest.raises(TapError, match="no frame proxy"):
        check_wired(
            KemariConfig(vm=VMConfig(netdev=PLAIN_TAP)), s, net_socket=None, nbd_socket=None
        )
    accepted = KemariConfig(vm=VMConfig(netdev=PLAIN_TAP, unprotected_output=True))
    check_wired(accepted, s, net_socket=None, nbd_socket=None)
    check_tapped(
        spec(blockdev="driver=file,filename=/d", devices=("virtio-serial-pci",)),
        net_socket=None,
        nbd_socket=None,
        accepted=("disk", "virtio-serial-pci"),
    )


# ---- VM definitions: unprotected_output on [[nic]], [[disk]], [[device]] ---------------

VMDEF = """
name = "web1"
machine = "pc-i440fx-7.2"
accel = "tcg"
[boot]
kernel = "/k"
[[disk]]
name = "root"
path = "/var/lib/kemari/web1.img"
size_mib = 16
{disk_extra}
[[nic]]
mac = "52:54:00:12:34:56"
tap = "ktap0"
{nic_extra}
[[device]]
driver = "{device}"
{device_extra}
[replication]
key_file = "/etc/kemari/replication.key"
[hosts.a]
address = "10.0.0.1"
[hosts.b]
address = "10.0.0.2"
"""


def vmdef(
    *, disk_extra: str = "", nic_extra: str = "", device: str = "pvpanic", device_extra: str = ""
) -> VMDefinition:
    import tomllib

    text = VMDEF.format(
        disk_extra=disk_extra, nic_extra=nic_extra, device=device, device_extra=device_extra
    )
    return parse_vmdef(tomllib.loads(text), machines=None, check_files=False)


def test_a_definition_is_tapped_by_default() -> None:
    defn = vmdef()
    view = defn.for_host("a")
    assert defn.unprotected_outputs("a") == ()
    assert view.config.tap.host_tap == "ktap0"
    assert audit_outputs(view.config, view.spec).findings == ()


def test_an_unprotected_nic_is_qemus_own_tap_and_accepted() -> None:
    defn = vmdef(nic_extra="unprotected_output = true")
    view = defn.for_host("a")
    assert view.config.tap.host_tap == ""
    assert view.config.vm.unprotected_output is True
    assert view.spec.netdev == "tap,ifname=ktap0,script=no,downscript=no"
    assert "ifname=ktap0" in " ".join(view.argv())  # not rewired to the frame proxy
    audit = check_outputs(view.config, view.spec)
    assert [f.kind for f in audit.accepted] == [OutputKind.NIC]


def test_an_unprotected_disk_and_device_are_accepted_by_the_audit() -> None:
    defn = vmdef(
        disk_extra="unprotected_output = true",
        device="virtio-serial-pci",
        device_extra="unprotected_output = true",
    )
    assert defn.unprotected_outputs("a") == ("disk", "virtio-serial-pci")
    view = defn.for_host("a")
    assert view.config.disk.path == ""  # not behind the block tap
    assert view.spec.blockdev is not None and "web1.img" in view.spec.blockdev
    accepted = defn.unprotected_outputs("a")
    audit = audit_outputs(view.config, view.spec, accepted=accepted)
    assert audit.ok
    assert {f.kind for f in audit.accepted} == {OutputKind.DISK, OutputKind.CHANNEL}
    # Without the opt-out the same definition is refused at parse time.
    with pytest.raises(ConfigError, match=r"device\[0\].driver"):
        vmdef(device="virtio-serial-pci")


def test_the_spec_carries_the_definitions_opt_outs_to_protect() -> None:
    defn = vmdef(disk_extra="unprotected_output = true")
    view = defn.for_host("a")
    assert check_outputs(view.config, view.spec).accepted
    assert any("disk" in line for line in unprotected_outputs(view.config, view.spec))


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"nic_extra": 'unprotected_output = "yes"'}, r"nic\[0\].unprotected_output"),
        ({"device": "vfio-pci", "device_extra": "unprotected_output = true"}, "passthrough"),
        ({"device": "virtio-balloon-pci", "device_extra": "unprotected_output = true"}, "balloon"),
    ],
)
def test_opt_outs_that_are_refused(extra: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        vmdef(**extra)


def test_a_shared_disk_cannot_be_unprotected() -> None:
    import tomllib

    text = VMDEF.format(
        disk_extra='backend = "shared"\nunprotected_output = true',
        nic_extra="",
        device="pvpanic",
        device_extra="",
    )
    with pytest.raises(ConfigError, match=r"disk\[0\].unprotected_output"):
        parse_vmdef(tomllib.loads(text), machines=None, check_files=False)


# ---- protect refuses before QEMU starts -----------------------------------------------


@pytest.mark.timeout(120)
def test_protect_refuses_an_untapped_nic_before_qemu_starts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = KemariConfig(
        paths=PathsConfig(cache_dir=tmp_path / "cache", run_dir=run, shm_dir=tmp_path / "shm"),
        vm=VMConfig(name="untapped", netdev=PLAIN_TAP),
        replication=ReplicationConfig(peer="127.0.0.1:1", key="k" * 32),
    )
    (tmp_path / "shm").mkdir()
    s = spec(name="untapped", kernel=tmp_path / "vmlinuz", initrd=None, netdev=PLAIN_TAP)
    with pytest.raises(ConfigError, match=r"vm\.netdev") as exc:
        asyncio.run(run_primary(cfg, spec=s))
    assert "tap.host_tap" in str(exc.value)
    # Nothing started: no artifacts, no QEMU files, no RAM file.
    assert not run.exists() or not any(run.rglob("*"))
    assert os.listdir(tmp_path / "shm") == []
