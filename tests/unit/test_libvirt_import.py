from __future__ import annotations

import tomllib
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kemari_suite.cli.vm import EXIT_CANNOT
from kemari_suite.cli.vm import app as vm_app
from kemari_suite.errors import ConfigError
from kemari_suite.vm.libvirt import (
    ImportResult,
    import_domain,
    import_domain_file,
    parse_memory,
    to_toml,
)
from kemari_suite.vm.vmdef import MachineCatalog, identity, load_vmdef

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "libvirt"

CATALOG = MachineCatalog.parse(
    "Supported machines are:\n"
    "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
    "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
    "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
    "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
)


def machines() -> MachineCatalog:
    return CATALOG


def imp(name: str, **kw: object) -> ImportResult:
    return import_domain_file(FIXTURES / name, machines=machines, **kw)  # type: ignore[arg-type]


def notes_of(res: ImportResult, severity: str) -> list[str]:
    return [f"{n.field}: {n.message}" for n in res.notes if n.severity == severity]


def domain(devices: str = "", os: str = "", top: str = "", machine: str = "pc-i440fx-7.2") -> str:
    return (
        f"<domain type='kvm'><name>t1</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='{machine}'>hvm</type>{os}</os>{top}"
        f"<devices>{devices}</devices></domain>"
    )


def imp_text(xml: str, **kw: object) -> ImportResult:
    return import_domain(xml, machines=machines, **kw)  # type: ignore[arg-type]


# ---- round trip -----------------------------------------------------------------------


def test_kernel_boot_domain_round_trips_through_load_vmdef(tmp_path: Path) -> None:
    kernel, initrd, disk = tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "web1.img"
    kernel.write_bytes(b"k" * 1000)
    initrd.write_bytes(b"i" * 1000)
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    xml = (FIXTURES / "kernel-boot.xml").read_text()
    xml = (
        xml.replace("/var/lib/kemari/vmlinuz", str(kernel))
        .replace("/var/lib/kemari/initrd.img", str(initrd))
        .replace("/var/lib/kemari/web1.img", str(disk))
    )
    res = imp_text(xml, host_a="10.1.0.1", host_b="10.1.0.2")
    assert res.ok, res.notes
    assert not notes_of(res, "cannot")
    out = tmp_path / "web1.toml"
    out.write_text(res.text)
    defn = load_vmdef(out, machines=machines)
    assert defn.name == "web1" and defn.memory_mib == 256 and defn.vcpus == 2
    assert defn.machine == "pc-i440fx-7.2" and defn.accel == "kvm" and defn.display == "none"
    assert defn.boot.kernel == kernel and defn.boot.cmdline == "console=ttyS0 root=/dev/vda rw"
    assert defn.disks[0].path == str(disk) and defn.disks[0].size_mib == 64
    assert defn.nics[0].mac == "52:54:00:12:34:56" and defn.nics[0].bridge == "br0"
    assert [d.driver for d in defn.devices] == ["virtio-rng-pci", "pvpanic"]
    a = defn.for_host("a", resolve_accel=lambda _r: ("tcg", "test"))
    assert a.config.replication.peer == "10.1.0.2:7410"
    assert identity(defn)["disks"][0]["size_mib"] == 64
    # The serial console and the bridge each get a note, nothing is dropped silently.
    assert any("serial console" in n for n in notes_of(res, "changed"))
    assert any("kt-web1" in n for n in notes_of(res, "changed"))


def test_desktop_domain_lists_what_cannot_carry_over(tmp_path: Path) -> None:
    res = imp("desktop-q35.xml")
    assert not res.ok
    cannot = notes_of(res, "cannot")
    assert any("qcow2" in n and "qemu-img convert -O raw" in n for n in cannot)
    assert any("backingStore" in n and "flattening" in n for n in cannot)
    changed = "\n".join(notes_of(res, "changed"))
    assert "q35 is an alias: pinned to pc-q35-7.2" in changed
    assert "e1000e -> virtio-net-pci" in changed
    assert "sata -> virtio-blk" in changed
    assert "1536 MiB balloon target" in changed
    assert "128 MiB of video RAM" in changed
    assert "network 'default' -> its bridge virbr0" in changed
    assert "poweroff -> reset" in changed
    dropped = "\n".join(notes_of(res, "dropped"))
    assert "vhost is dropped: the frame proxy needs the packets in userspace" in dropped
    assert "graphics[0] spice" in dropped and "cdrom" in dropped
    assert "memballoon" in dropped and "org.qemu.guest_agent.0" in dropped
    assert "tablet on usb" in dropped and "host-passthrough" in dropped
    data = res.data
    assert data["machine"] == "pc-q35-7.2" and data["memory_mib"] == 2048
    assert data["display"] == "qxl" and data["boot"] == {"firmware": "bios"}
    assert data["nic"] == [
        {"mac": "52:54:00:a1:b2:c3", "model": "virtio-net-pci", "bridge": "virbr0"}
    ]
    assert data["device"] == [{"driver": "virtio-rng-pci"}, {"driver": "i6300esb"}]
    # Even so, the text is a valid definition (the disk is a placeholder until flattened).
    out = tmp_path / "d.toml"
    out.write_text(res.text)
    load_vmdef(out, machines=machines, check_files=False)


def test_passthrough_and_second_disk_and_nic(tmp_path: Path) -> None:
    res = imp("db-passthrough.xml", host_a="10.0.0.1", host_b="10.0.0.2")
    assert not res.ok
    cannot = "\n".join(notes_of(res, "cannot"))
    assert "disk[1] vdb" in cannot and "kept disk[0] vda (/dev/vg0/db02-root)" in cannot
    assert "disk[2] vdc: network disk (rbd)" in cannot
    assert "interface[1]" in cannot and "kept interface[0] (52:54:00:de:ad:01)" in cannot
    assert "hostdev[0]: device passthrough" in cannot
    assert "tpm[0]" in cannot
    assert res.data["disk"] == [{"name": "vda", "path": "/dev/vg0/db02-root"}]
    assert res.data["nic"][0]["tap"] == "tap-db02"
    assert res.data["display"] == "std"
    assert any("cirrus" in n for n in notes_of(res, "changed"))
    assert res.data["device"] == [{"driver": "ib700"}]
    assert any(n.startswith("cputune") for n in notes_of(res, "dropped"))
    assert not any("placeholder" in n for n in notes_of(res, "changed"))


def test_uefi_cannot(tmp_path: Path) -> None:
    res = imp("uefi.xml")
    assert any("UEFI" in n for n in notes_of(res, "cannot"))
    assert res.data["memory_mib"] == 4096 and res.data["machine"] == "pc-q35-7.2"
    assert sum("placeholder" in n for n in notes_of(res, "changed")) == 2


def test_entities_and_doctype_are_refused() -> None:
    with pytest.raises(ConfigError, match="DOCTYPE"):
        imp("entities.xml")
    with pytest.raises(ConfigError, match="DOCTYPE"):
        imp_text('<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain/>')


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        ("not xml <", "not valid XML"),
        ("<network><name>x</name></network>", "expected a <domain>"),
        ("<domain><memory>1</memory></domain>", "no <name>"),
        ("<domain><name>x</name></domain>", "no <memory>"),
        ("<domain><name>x</name><memory unit='parsecs'>1</memory></domain>", "unit"),
    ],
)
def test_bad_documents(xml: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        imp_text(xml)


# ---- pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("131072", None, 128 << 20),
        ("131072", "KiB", 128 << 20),
        ("131072", "k", 128 << 20),
        ("256", "MiB", 256 << 20),
        ("256", "M", 256 << 20),
        ("2", "GiB", 2 << 30),
        ("2", "G", 2 << 30),
        ("1", "GB", 10**9),
        ("1000", "KB", 10**6),
        ("4096", "b", 4096),
        ("4096", "bytes", 4096),
        ("1", "TiB", 1 << 40),
    ],
)
def test_parse_memory_units(value: str, unit: str | None, expected: int) -> None:
    assert parse_memory(value, unit, source=None, key="memory") == expected


def test_memory_rounding_and_current_memory() -> None:
    res = imp_text(domain().replace("<memory unit='MiB'>128</memory>", "<memory>1000000</memory>"))
    assert res.data["memory_mib"] == 977
    assert any("rounded up to 977 MiB" in n for n in notes_of(res, "changed"))


def test_machine_alias_pc_and_missing_machine() -> None:
    res = imp_text(domain(machine="pc"))
    assert res.data["machine"] == "pc-i440fx-7.2"
    assert any("pc is an alias" in n for n in notes_of(res, "changed"))
    res = imp_text(domain().replace(" machine='pc-i440fx-7.2'", ""))
    assert res.data["machine"] == "pc-i440fx-7.2"
    res = imp_text(domain(machine="pc-i440fx-rhel7.6.0"))
    assert any("not offered by this QEMU" in n for n in notes_of(res, "cannot"))
    res = import_domain(domain(machine="pc"), machines=None)
    assert any("cannot be pinned" in n for n in notes_of(res, "cannot"))


@pytest.mark.parametrize(
    ("video", "display", "severity"),
    [
        ("none", "none", None),
        ("vga", "std", "changed"),
        ("virtio", "virtio", "changed"),
        ("qxl", "qxl", "changed"),
        ("cirrus", "std", "changed"),
        ("bochs", "std", "changed"),
    ],
)
def test_video_models(video: str, display: str, severity: str | None) -> None:
    res = imp_text(domain(f"<video><model type='{video}'/></video>"))
    assert res.data["display"] == display
    video_notes = [n for n in res.notes if n.field.startswith("video")]
    if severity is None:
        assert not video_notes
    else:
        assert video_notes[0].severity == severity and "every checkpoint" in video_notes[0].message


def test_interface_kinds() -> None:
    mac = "<mac address='52:54:00:00:00:09'/>"
    eth = f"<interface type='ethernet'>{mac}<target dev='tap5'/></interface>"
    assert imp_text(domain(eth)).data["nic"][0]["tap"] == "tap5"
    net = f"<interface type='network'>{mac}<source network='lan'/></interface>"
    res = imp_text(domain(net))
    assert any("bridge is unknown" in n for n in notes_of(res, "cannot"))
    live = (
        "<interface type='network'><mac address='52:54:00:00:00:09'/>"
        "<source network='lan' bridge='virbr7'/><model type='rtl8139'/></interface>"
    )
    res = imp_text(domain(live))
    assert res.ok and res.data["nic"][0]["bridge"] == "virbr7"
    assert any("rtl8139 -> virtio-net-pci" in n for n in notes_of(res, "changed"))
    user = "<interface type='user'><mac address='52:54:00:00:00:09'/></interface>"
    assert not imp_text(domain(user)).ok
    sriov = "<interface type='hostdev'><mac address='52:54:00:00:00:09'/></interface>"
    res = imp_text(domain(sriov))
    assert "nic" not in res.data and not res.ok


def test_disk_kinds(tmp_path: Path) -> None:
    vol = (
        "<disk type='volume' device='disk'><driver type='raw'/>"
        "<source pool='default' volume='t1.img'/><target dev='vda' bus='virtio'/></disk>"
    )
    res = imp_text(domain(vol))
    assert any("virsh vol-path --pool default t1.img" in n for n in notes_of(res, "cannot"))
    ro = (
        "<disk type='file' device='disk'><driver type='raw'/><source file='/x.img'/>"
        "<target dev='vdb'/><readonly/></disk>"
    )
    assert imp_text(domain(ro)).ok
    lun = "<disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sda'/></disk>"
    assert not imp_text(domain(lun)).ok


def test_firmware_and_boot_devices() -> None:
    res = imp_text(domain(os="<boot dev='network'/><loader type='rom'>/opt/bios.bin</loader>"))
    assert res.data["boot"] == {"firmware": "bios"}
    dropped = "\n".join(notes_of(res, "dropped"))
    assert "boot from network" in dropped and "SeaBIOS" in dropped


def test_to_toml_round_trips_nested_tables() -> None:
    data = {
        "name": 'we"b',
        "vcpus": 2,
        "flag": True,
        "hosts": {"a": {"address": "10.0.0.1", "paths": {"run_dir": "/r"}}, "b": {"address": "x"}},
        "device": [
            {"driver": "virtio-rng-pci", "props": {"max-bytes": 1024}},
            {"driver": "pvpanic"},
        ],
        "boot": {"cmdline": "a=b c\\d"},
        "list": ["x", 1],
    }
    text = to_toml(data, header="line one\nline two")
    assert text.startswith("# line one\n# line two\n")
    assert tomllib.loads(text) == data
    with pytest.raises(ConfigError):
        to_toml({"x": None})


#: Text XML 1.0 can carry (no control characters but tab, newline and carriage return).
xml_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"),
    max_size=30,
)


EXTRA_DEVICES = (
    "<rng model='virtio'/>",
    "<watchdog model='ib700' action='poweroff'/>",
    "<panic model='isa'/>",
    "<memballoon model='virtio'/>",
    "<tpm/>",
)


@st.composite
def domains(draw: st.DrawFn) -> str:
    name = draw(xml_text.filter(str.strip))
    memory = draw(st.integers(1, 1 << 40))
    unit = draw(st.sampled_from(["KiB", "MiB", "GiB", "b", "k"]))
    boot = draw(
        st.one_of(
            st.builds(
                lambda k, c: f"<kernel>{escape(k)}</kernel><cmdline>{escape(c)}</cmdline>",
                xml_text,
                xml_text,
            ),
            st.just("<boot dev='hd'/>"),
        )
    )
    disk_path = draw(xml_text)
    mac = draw(st.sampled_from(["", "52:54:00:aa:bb:cc"]))
    nic = (
        "<interface type='bridge'>"
        + (f"<mac address='{mac}'/>" if mac else "")
        + f"<source bridge={quoteattr(draw(xml_text))}/><model type='e1000'/></interface>"
    )
    extras = "".join(
        draw(
            st.lists(
                st.sampled_from(EXTRA_DEVICES),
                max_size=3,
            )
        )
    )
    return (
        f"<domain type='kvm'><name>{escape(name)}</name>"
        f"<memory unit='{unit}'>{memory}</memory><vcpu>{draw(st.integers(1, 80))}</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os><devices>"
        f"<disk type='file'><source file={quoteattr(disk_path)}/><target dev='vda'/></disk>"
        f"{nic}{extras}</devices></domain>"
    )


@settings(max_examples=100, deadline=None)
@given(xml=domains(), host_a=st.sampled_from(["", "10.0.0.1"]))
def test_imported_text_reads_back_as_the_imported_tree(xml: str, host_a: str) -> None:
    res = imp_text(xml, source="gen.xml", host_a=host_a)
    assert tomllib.loads(res.text) == res.data
    assert res.text.startswith("# VM definition imported from gen.xml")


# ---- CLI --------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(autouse=True)
def fake_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kemari_suite.cli.vm._machines", machines)


def test_cli_import_ok_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "web1.toml"
    res = runner.invoke(
        vm_app,
        [
            "import-libvirt",
            str(FIXTURES / "kernel-boot.xml"),
            "-o",
            str(out),
            "--host-a",
            "10.0.0.1",
            "--host-b",
            "10.0.0.2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "changed:" in res.output and out.exists()
    assert tomllib.loads(out.read_text())["hosts"]["b"]["address"] == "10.0.0.2"


def test_cli_import_cannot_exits_3_and_writes_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "desk.toml"
    args = ["import-libvirt", str(FIXTURES / "desktop-q35.xml"), "-o", str(out)]
    res = runner.invoke(vm_app, args)
    assert res.exit_code == EXIT_CANNOT == 3
    assert "cannot:" in res.output and "not written" in res.output and not out.exists()
    res = runner.invoke(vm_app, [*args, "--force"])
    assert res.exit_code == 3 and out.exists()


def test_cli_import_to_stdout_and_bad_xml(tmp_path: Path) -> None:
    res = runner.invoke(vm_app, ["import-libvirt", str(FIXTURES / "kernel-boot.xml")])
    assert res.exit_code == 0
    assert tomllib.loads(res.stdout)["name"] == "web1"
    res = runner.invoke(vm_app, ["import-libvirt", str(FIXTURES / "entities.xml")])
    assert res.exit_code == 2 and "error:" in res.output
