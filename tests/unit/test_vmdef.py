from __future__ import annotations

import dataclasses
import json
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kemari_suite.cli.vm import app as vm_app
from kemari_suite.config import dump_toml, read_toml
from kemari_suite.errors import ConfigError, SetupError
from kemari_suite.vm import vmdef
from kemari_suite.vm.qemu import qemu_argv
from kemari_suite.vm.vmdef import (
    MachineCatalog,
    check_warnings,
    diff_identity,
    identity,
    identity_digest,
    load_vmdef,
    masked_argv,
)

REPO = Path(__file__).resolve().parents[2]

MACHINE_HELP = """\
Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""
CATALOG = MachineCatalog.parse(MACHINE_HELP)


def machines() -> MachineCatalog:
    return CATALOG


def tcg(_requested: str) -> tuple[str, str]:
    return "tcg", "test"


@dataclass
class Env:
    root: Path
    kernel: Path
    initrd: Path
    disk_a: Path
    disk_b: Path

    def write(self, text: str, name: str = "vm.toml") -> Path:
        p = self.root / name
        p.write_text(textwrap.dedent(text).format(env=self))
        return p


@pytest.fixture
def env(tmp_path: Path) -> Env:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 100)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd" * 100)
    disks = []
    for host in ("a", "b"):
        d = tmp_path / f"disk-{host}.img"
        with d.open("wb") as f:
            f.truncate(8 << 20)
        disks.append(d)
    return Env(tmp_path, kernel, initrd, disks[0], disks[1])


#: A replication key of the accepted length (at least 32 bytes).
KEY = "kemari-test-replication-key-of-32+bytes"
KEY_LINE = f'key = "{KEY}"'

BASE = """\
name = "web1"
machine = "pc-i440fx-7.2"
vcpus = 2
memory_mib = 256
accel = "tcg"
display = "none"

[boot]
kernel = "{env.kernel}"
initrd = "{env.initrd}"
cmdline = "console=ttyS0 root=/dev/vda"

[[disk]]
name = "root"
path = "{env.disk_a}"
size_mib = 8

[[nic]]
mac = "52:54:00:12:34:56"
tap = "ktap0"
ip = "10.0.0.50/24"

[[device]]
driver = "virtio-rng-pci"

[replication]
key = "kemari-test-replication-key-of-32+bytes"
max_interval_ms = 50

[tap]
policy = "adaptive"

[alerts]
syslog = false

[hosts.a]
address = "10.0.0.1"
netns = "nsa"
paths.run_dir = "{env.root}/run-a"
paths.shm_dir = "{env.root}/shm-a"

[hosts.b]
address = "10.0.0.2"
port = 7420
netns = "nsb"
paths.run_dir = "{env.root}/run-b"
paths.shm_dir = "{env.root}/shm-b"
disk.root.path = "{env.disk_b}"
nic.0.tap = "ktap1"
"""


def load(env: Env, text: str = BASE, **kw: object) -> vmdef.VMDefinition:
    return load_vmdef(env.write(text), machines=machines, **kw)  # type: ignore[arg-type]


def expect_error(env: Env, text: str, key: str, *words: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(env, text, **kw)
    assert info.value.key == key, str(info.value)
    for w in words:
        assert w in info.value.reason, info.value.reason
    return info.value


# ---- loading -------------------------------------------------------------------------


def test_loads_and_derives_both_hosts(env: Env) -> None:
    defn = load(env)
    assert defn.name == "web1" and defn.memory_mib == 256 and defn.vcpus == 2
    assert defn.host_names == ("a", "b")
    a = defn.for_host("a", resolve_accel=tcg)
    b = defn.for_host("b", resolve_accel=tcg)
    assert a.config.replication.listen == "10.0.0.1:7410"
    assert a.config.replication.peer == "10.0.0.2:7420"
    assert b.config.replication.listen == "10.0.0.2:7420"
    assert b.config.replication.peer == "10.0.0.1:7410"
    assert a.config.replication.key == KEY and a.config.replication.max_interval_ms == 50
    assert a.config.disk.path == str(env.disk_a) and b.config.disk.path == str(env.disk_b)
    assert a.config.disk.size_mib == 8 and a.config.disk.backend == "builtin"
    assert a.config.tap.host_tap == "ktap0" and b.config.tap.host_tap == "ktap1"
    assert a.config.tap.policy == "adaptive"
    assert a.config.vm.netns == "nsa" and a.config.vm.mac == "52:54:00:12:34:56"
    assert a.config.vm.ip == "10.0.0.50/24" and a.config.vm.netdev == ""
    assert a.config.alerts.syslog is False
    assert a.config.image.kernel == str(env.kernel)
    assert a.config.paths.run_dir == env.root / "run-a"
    assert a.spec.append == "console=ttyS0 root=/dev/vda kemari.ip=10.0.0.50/24"
    assert a.spec.devices == ("virtio-rng-pci",)
    assert a.spec.netdev == "tap,ifname=ktap0,script=no,downscript=no"
    assert a.spec.blockdev == f"driver=file,filename={env.disk_a}"
    assert a.peer == "b" and b.peer == "a"


@pytest.mark.parametrize("tapped", [True, False])
def test_both_hosts_argv_identical_after_masking_host_local_parts(env: Env, tapped: bool) -> None:
    defn = load(env)
    a = defn.for_host("a", resolve_accel=tcg)
    b = defn.for_host("b", resolve_accel=tcg)
    la, lb = a.argv(tapped=tapped), b.argv(tapped=tapped)
    assert la != lb  # they do differ: netns, run dir, RAM file, disk, TAP
    assert la[:4] == ["ip", "netns", "exec", "nsa"] and lb[:4] == ["ip", "netns", "exec", "nsb"]
    ma, mb = masked_argv(a, la), masked_argv(b, lb)
    assert ma == mb
    joined = " ".join(ma)
    assert "mem-path={ram}" in joined and "{run_dir}/qmp.sock" in joined
    if tapped:
        assert "addr.path={run_dir}/net.sock" in joined
        assert "server.path={run_dir}/nbd.sock" in joined
    else:
        assert "ifname={tap}," in joined and "filename={disk}" in joined
    # And nothing host-local is left over.
    for view in (a, b):
        for value in view.local_values().values():
            assert value not in joined
    # The failover start differs only by -incoming.
    inc = masked_argv(b, b.argv(tapped=tapped, incoming=True))
    assert inc == [*mb, "-S", "-incoming", "defer"]


def test_a_changed_guest_field_survives_masking(env: Env) -> None:
    a = load(env).for_host("a", resolve_accel=tcg)
    b = load(env, BASE.replace("memory_mib = 256", "memory_mib = 128")).for_host(
        "b", resolve_accel=tcg
    )
    assert masked_argv(a) != masked_argv(b)


def test_argv_is_what_qemu_argv_gives(env: Env) -> None:
    view = load(env).for_host("a", resolve_accel=tcg)
    assert view.argv(tapped=False) == qemu_argv(view.spec, view.paths)
    assert view.tapped_spec().netdev == (
        f"stream,server=off,addr.type=unix,addr.path={view.paths.run_dir}/net.sock"
    )


def test_firmware_boot(env: Env) -> None:
    text = BASE.replace(
        '[boot]\nkernel = "{env.kernel}"\ninitrd = "{env.initrd}"\n'
        'cmdline = "console=ttyS0 root=/dev/vda"',
        '[boot]\nfirmware = "bios"',
    )
    defn = load(env, text)
    assert defn.boot.mode == "firmware"
    argv = defn.for_host("a", resolve_accel=tcg).argv()
    assert "-kernel" not in argv and "-append" not in argv
    assert argv[argv.index("-boot") + 1] == "c"
    assert identity(defn)["boot"] == {"mode": "firmware", "firmware": "bios"}


def test_display_and_vram_warning(env: Env) -> None:
    defn = load(env, BASE.replace('display = "none"', 'display = "std"'))
    argv = defn.for_host("a", resolve_accel=tcg).argv()
    assert argv[argv.index("-vga") + 1] == "std"
    assert any("16 MiB" in w and "every checkpoint" in w for w in check_warnings(defn))
    assert not any("video RAM" in w for w in check_warnings(load(env)))


def test_top_level_checks_without_host_and_host_overrides_with(env: Env) -> None:
    env.disk_b.unlink()
    load(env)  # top level: disk a is there
    load(env, host="a")
    expect_error(env, BASE, "hosts.b.disk.root.path", "does not exist", host="b")


def test_check_files_off_skips_existence(env: Env) -> None:
    env.kernel.unlink()
    load(env, check_files=False)


def test_machine_probe_failure_falls_back_to_a_note(env: Env) -> None:
    def broken() -> MachineCatalog:
        raise SetupError("qemu", "not installed")

    defn = load_vmdef(env.write(BASE), machines=broken)
    assert any("not checked" in n for n in defn.notes)
    assert any("not checked" in w for w in check_warnings(defn))


def test_machine_catalog_parse() -> None:
    assert CATALOG.aliases == {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
    assert CATALOG.default == "pc-i440fx-7.2"
    assert "pc-q35-7.1" in CATALOG.names and "pc" not in CATALOG.names
    assert CATALOG.pin("q35") == "pc-q35-7.2" and CATALOG.pin("nope") is None


def test_real_qemu_machine_list_is_cached() -> None:
    try:
        cat = vmdef.qemu_machines()
    except SetupError:
        pytest.skip("no QEMU here")
    assert vmdef.qemu_machines() is cat
    assert cat.aliases.get("pc", "").startswith("pc-i440fx-")


# ---- errors, each naming its key -------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("vcpus = 2", 'vcpus = 2\ncolour = "red"', "colour", ("unknown key",)),
        ("vcpus = 2", 'vcpus = "2"', "vcpus", ("expected an integer",)),
        ("memory_mib = 256", "memory_mib = 8", "memory_mib", ("between 16",)),
        ('name = "web1"', 'name = "web 1"', "name", ("letters",)),
        ('machine = "pc-i440fx-7.2"', 'machine = "pc"', "machine", ("alias", "pc-i440fx-7.2")),
        ('machine = "pc-i440fx-7.2"', 'machine = "q35"', "machine", ("alias", "pc-q35-7.2")),
        ('machine = "pc-i440fx-7.2"', 'machine = "pc-i440fx-9.1"', "machine", ("not a machine",)),
        ('machine = "pc-i440fx-7.2"', 'machine = "microvm"', "machine", ("pc-i440fx-*",)),
        ('display = "none"', 'display = "cirrus"', "display", ("not one of",)),
        ('accel = "tcg"', 'accel = "hvf"', "accel", ("not one of",)),
        ('tap = "ktap0"', 'tap = "ktap0"\nmodel = "e1000"', "nic[0].model", ("virtio-net-pci",)),
        ('tap = "ktap0"', 'tap = "ktap0"\nvhost = true', "nic[0].vhost", ("userspace",)),
        ('mac = "52:54:00:12:34:56"', 'mac = "52:54:00:12:34"', "nic[0].mac", ("six hex",)),
        ('mac = "52:54:00:12:34:56"', 'mac = "01:00:5e:00:00:01"', "nic[0].mac", ("multicast",)),
        ('ip = "10.0.0.50/24"', 'ip = "10.0.0.50"', "nic[0].ip", ("A.B.C.D/NN",)),
        ('tap = "ktap0"\n', "", "nic[0].tap", ("tap", "bridge")),
        ('tap = "ktap0"', 'tap = "a-much-too-long-tap-name"', "nic[0].tap", ("interface",)),
        (
            'driver = "virtio-rng-pci"',
            'driver = "vfio-pci"',
            "device[0].driver",
            ("passthrough",),
        ),
        ('driver = "virtio-rng-pci"', 'driver = "pci-assign"', "device[0].driver", ("passthr",)),
        (
            'driver = "virtio-rng-pci"',
            'driver = "vhost-user-fs-pci"',
            "device[0].driver",
            ("vhost",),
        ),
        (
            'driver = "virtio-rng-pci"',
            'driver = "vhost-vsock-pci"',
            "device[0].driver",
            ("vhost",),
        ),
        ('driver = "virtio-rng-pci"', 'driver = "usb-storage"', "device[0].driver", ("list",)),
        (
            'driver = "virtio-rng-pci"',
            'driver = "virtio-balloon-pci"',
            "device[0].driver",
            ("tracker",),
        ),
        (
            'driver = "virtio-rng-pci"',
            'driver = "virtio-rng-pci"\nprops = {{ chardev = "c0" }}',
            "device[0].props.chardev",
            ("backend",),
        ),
        ("size_mib = 8", "size_mib = 16", "disk[0].path", ("size mismatch", "16")),
        (KEY_LINE, KEY_LINE + '\npeer = "1.2.3.4:1"', "replication.peer", ("derived",)),
        (KEY_LINE, KEY_LINE + '\nlisten = "0.0.0.0:1"', "replication.listen", ("derived",)),
        (KEY_LINE, KEY_LINE + '\nmode = "fast"', "replication.mode", ("not one of",)),
        (KEY_LINE, KEY_LINE + "\ntypo = 1", "replication.typo", ("unknown key",)),
        ('policy = "adaptive"', 'host_tap = "x"', "tap.host_tap", ("derived",)),
        ("syslog = false", "syslog = 1", "alerts.syslog", ("true or false",)),
        (
            'address = "10.0.0.2"\nport = 7420',
            'address = "10.0.0.1"\nport = 7410',
            "hosts.b.address",
            ("same",),
        ),
        ('address = "10.0.0.2"', 'address = "bad host!"', "hosts.b.address", ("IP address",)),
        ("port = 7420", "port = 70000", "hosts.b.port", ("between",)),
        ('nic.0.tap = "ktap1"', 'nic.1.tap = "ktap1"', "hosts.b.nic.1", ("no nic[1]",)),
        ('nic.0.tap = "ktap1"', 'nic.0.mac = "52:54:00:00:00:01"', "hosts.b.nic.0.mac", ()),
        ('disk.root.path = "', 'disk.data.path = "', "hosts.b.disk.data", ("no disk named",)),
        ('netns = "nsb"', 'netns = "nsb"\ncolour = 1', "hosts.b.colour", ("unknown key",)),
    ],
)
def test_errors_name_the_key(
    env: Env, old: str, new: str, key: str, words: tuple[str, ...]
) -> None:
    assert old in BASE, old
    expect_error(env, BASE.replace(old, new, 1), key, *words)


def test_disk_missing_names_disk0_path(env: Env) -> None:
    env.disk_a.unlink()
    expect_error(env, BASE, "disk[0].path", "does not exist")


def test_disk_not_a_file(env: Env) -> None:
    expect_error(env, BASE.replace("{env.disk_a}", "{env.root}"), "disk[0].path", "neither")


def test_kernel_and_initrd_missing(env: Env) -> None:
    env.initrd.unlink()
    expect_error(env, BASE, "boot.initrd", "no such file")
    env.kernel.unlink()
    expect_error(env, BASE, "boot.kernel", "no such file")


def test_both_kernel_and_firmware(env: Env) -> None:
    text = BASE.replace("[boot]\n", '[boot]\nfirmware = "bios"\n')
    expect_error(env, text, "boot.firmware", "not both")


def test_uefi_is_refused(env: Env) -> None:
    text = BASE.replace(
        '[boot]\nkernel = "{env.kernel}"\ninitrd = "{env.initrd}"\n'
        'cmdline = "console=ttyS0 root=/dev/vda"',
        '[boot]\nfirmware = "uefi"',
    )
    expect_error(env, text, "boot.firmware", "UEFI")


def test_no_boot_section(env: Env) -> None:
    start = BASE.index("[boot]")
    end = BASE.index("[[disk]]")
    expect_error(env, BASE[:start] + BASE[end:], "boot", "kernel")


def test_duplicate_mac_then_nic_limit(env: Env) -> None:
    second_same = BASE.replace(
        "[[device]]", '[[nic]]\nmac = "52:54:00:12:34:56"\ntap = "ktap9"\n\n[[device]]'
    )
    expect_error(env, second_same, "nic[1].mac", "nic[0]")
    second_other = second_same.replace(
        'mac = "52:54:00:12:34:56"\ntap = "ktap9"', 'mac = "52:54:00:12:34:57"\ntap = "ktap9"'
    )
    expect_error(env, second_other, "nic[1]", "at most 1 NIC")


def test_more_than_one_disk(env: Env) -> None:
    text = BASE.replace("[[nic]]", f'[[disk]]\nname = "data"\npath = "{env.disk_b}"\n\n[[nic]]')
    expect_error(env, text, "disk[1]", "at most 1 disk")


def test_duplicate_disk_name(env: Env) -> None:
    text = BASE.replace("[[nic]]", f'[[disk]]\nname = "root"\npath = "{env.disk_b}"\n\n[[nic]]')
    expect_error(env, text, "disk[1].name", "disk[0]")


def test_hosts_count_and_unknown_host(env: Env) -> None:
    start = BASE.index("[hosts.b]")
    expect_error(env, BASE[:start], "hosts", "exactly two")
    defn = load(env)
    with pytest.raises(ConfigError) as info:
        defn.for_host("c")
    assert info.value.key == "hosts" and "unknown host 'c'" in info.value.reason
    expect_error(env, BASE, "hosts", "unknown host", host="c")


def test_drbd_backend_defaults_to_the_by_res_device(env: Env) -> None:
    text = BASE.replace(
        'path = "{env.disk_a}"\nsize_mib = 8', 'backend = "drbd"\nresource = "web1"'
    ).replace('disk.root.path = "{env.disk_b}"\n', "")
    defn = load(env, text, check_files=False)
    assert defn.disks[0].path == "/dev/drbd/by-res/web1/0"
    view = defn.for_host("a", resolve_accel=tcg)
    assert view.config.disk.backend == "drbd"
    assert view.spec.blockdev == "driver=host_device,filename=/dev/drbd/by-res/web1/0"
    err = expect_error(env, text, "disk[0].path", "drbdadm up web1")
    assert "does not exist" in err.reason
    expect_error(env, text.replace('resource = "web1"', ""), "disk[0].resource", "DRBD")


def test_bridge_only_nic_gets_a_derived_tap_and_a_warning(env: Env) -> None:
    text = BASE.replace('tap = "ktap0"', 'bridge = "br0"').replace('nic.0.tap = "ktap1"\n', "")
    defn = load(env, text)
    assert defn.for_host("a", resolve_accel=tcg).config.tap.host_tap == "kt-web1"
    assert any("kt-web1" in w and "br0" in w for w in check_warnings(defn))


def test_lease_tiebreaker_needs_a_lease_device(env: Env) -> None:
    text = BASE.replace(KEY_LINE, KEY_LINE + '\ntiebreaker = "lease"')
    expect_error(env, text, "disk[0].lease_device", "lease")
    with_lease = text.replace("size_mib = 8", 'size_mib = 8\nlease_device = "{env.disk_a}"')
    view = load(env, with_lease).for_host("a", resolve_accel=tcg)
    assert view.config.disk.lease_device == str(env.disk_a)


def test_not_toml_and_missing_file(env: Env) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(env, "name = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_vmdef(env.root / "nope.toml", machines=machines)


# ---- identity ---------------------------------------------------------------------------


def test_identity_is_host_independent(env: Env) -> None:
    defn = load(env)
    ia, ib = identity(defn, "a"), identity(defn, "b")
    assert ia == ib
    assert identity_digest(defn, "a") == identity_digest(ia) == identity_digest(ib)
    assert ia["memory_mib"] == 256 and ia["disks"] == [
        {"name": "root", "backend": "builtin", "size_mib": 8}
    ]
    assert ia["boot"]["kernel"]["size"] == 600 and len(ia["boot"]["kernel"]["sha256"]) == 64
    json.dumps(ia)  # JSON-able


def test_identity_changes_with_the_kernel_content(env: Env) -> None:
    before = identity_digest(load(env))
    env.kernel.write_bytes(b"other kernel")
    after = load(env)
    assert identity_digest(after) != before


def test_diff_identity_names_the_fields(env: Env) -> None:
    a = identity(load(env))
    b = identity(
        load(
            env,
            BASE.replace("memory_mib = 256", "memory_mib = 128").replace(
                'mac = "52:54:00:12:34:56"', 'mac = "52:54:00:12:34:57"'
            ),
        )
    )
    lines = diff_identity(a, b)
    assert "memory_mib: primary 256, secondary 128" in lines
    assert "nics[0].mac: primary 52:54:00:12:34:56, secondary 52:54:00:12:34:57" in lines
    assert diff_identity(a, a) == []
    c = dict(b)
    c["devices"] = []
    assert "devices.count: primary 1, secondary 0" in diff_identity(a, c)
    assert "devices[0]: primary virtio-rng-pci, secondary (absent)" in diff_identity(a, c)
    assert diff_identity(a, b, labels=("a", "b"))[0].count(" a ") == 1


def test_examples_load(tmp_path: Path) -> None:
    files = sorted((REPO / "examples" / "vm").glob("*.toml"))
    assert files
    for f in files:
        defn = load_vmdef(f, machines=machines, check_files=False)
        for h in defn.host_names:
            view = defn.for_host(h, resolve_accel=tcg)
            assert view.argv()[0] in ("qemu-system-x86_64", "ip")


def test_shared_example_overrides_the_disk_on_one_host() -> None:
    defn = load_vmdef(
        REPO / "examples" / "vm" / "shared-lun.toml", machines=machines, check_files=False
    )
    a, b = (defn.for_host(h, resolve_accel=tcg) for h in ("a", "b"))
    assert a.config.disk.path != b.config.disk.path
    assert a.config.disk.fencing == b.config.disk.fencing == "scsi-pr"
    assert identity(defn, "a") == identity(defn, "b")
    assert masked_argv(a) == masked_argv(b)


def test_scsi_pr_fencing_needs_a_shared_disk(tmp_path: Path) -> None:
    text = (REPO / "examples" / "vm" / "shared-lun.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('backend = "shared"', 'backend = "builtin"', 1))
    with pytest.raises(ConfigError, match=r"disk\[0\]\.fencing.*shared LUN"):
        load_vmdef(bad, machines=machines, check_files=False)


# ---- written with dump_toml -------------------------------------------------------------


def test_examples_written_with_dump_toml_load_as_the_same_definition(tmp_path: Path) -> None:
    for f in sorted((REPO / "examples" / "vm").glob("*.toml")):
        out = tmp_path / f.name
        out.write_text(dump_toml(read_toml(f), header=f"copy of {f.name}"))
        assert read_toml(out) == read_toml(f)
        again = load_vmdef(out, machines=machines, check_files=False)
        assert again == dataclasses.replace(
            load_vmdef(f, machines=machines, check_files=False), source=out
        )


names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
ifnames = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
abs_paths = st.lists(names, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
macs = st.lists(st.integers(0, 255), min_size=5, max_size=5).map(
    lambda b: "52:" + ":".join(f"{x:02x}" for x in b)
)


def host_part(addresses: list[str]) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {"address": st.sampled_from(addresses)},
        optional={
            "port": st.integers(1, 65535),
            "netns": names,
            "paths": st.fixed_dictionaries(
                {}, optional={"run_dir": abs_paths, "shm_dir": abs_paths}
            ),
            "disk": st.fixed_dictionaries({"root": st.fixed_dictionaries({"path": abs_paths})}),
            "nic": st.fixed_dictionaries({"0": st.fixed_dictionaries({"tap": ifnames})}),
        },
    )


#: Trees shaped like the definitions the lab writes and libvirt import produces.
definitions = st.fixed_dictionaries(
    {
        "name": names,
        "machine": st.sampled_from(["pc-i440fx-7.2", "pc-q35-7.1", "pc-q35-7.2"]),
        "boot": st.one_of(
            st.fixed_dictionaries(
                {"kernel": abs_paths},
                optional={"initrd": abs_paths, "cmdline": st.text(max_size=40)},
            ),
            st.just({"firmware": "bios"}),
        ),
        "disk": st.lists(
            st.fixed_dictionaries(
                {"name": st.just("root"), "path": abs_paths},
                optional={"size_mib": st.integers(1, 1 << 20), "backend": st.just("builtin")},
            ),
            min_size=1,
            max_size=1,
        ),
        "nic": st.lists(
            st.fixed_dictionaries(
                {"mac": macs, "tap": ifnames},
                optional={"ip": st.just("10.0.0.50/24"), "model": st.just("virtio-net-pci")},
            ),
            min_size=1,
            max_size=1,
        ),
        "device": st.lists(
            st.fixed_dictionaries(
                {"driver": st.sampled_from(["virtio-rng-pci", "pvpanic", "i6300esb"])},
                optional={
                    "props": st.dictionaries(
                        st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True).filter(
                            lambda k: k not in ("driver", "host", "rng", "drive")
                        ),
                        st.one_of(st.booleans(), st.integers(0, 1 << 40), st.text(max_size=8)),
                        max_size=2,
                    )
                },
            ),
            max_size=2,
        ),
        "hosts": st.fixed_dictionaries(
            {"a": host_part(["10.0.0.1", "a.example"]), "b": host_part(["10.0.0.2", "fd00::2"])}
        ),
    },
    optional={
        "vcpus": st.integers(1, 64),
        "memory_mib": st.integers(16, 1 << 16),
        "accel": st.sampled_from(["auto", "tcg", "kvm"]),
        "display": st.sampled_from(["none", "std"]),
        "replication": st.fixed_dictionaries(
            {}, optional={"key": st.text(max_size=16), "max_interval_ms": st.integers(1, 1000)}
        ),
        "tap": st.fixed_dictionaries({}, optional={"policy": st.just("adaptive")}),
        "alerts": st.fixed_dictionaries({}, optional={"hook": st.text(max_size=16)}),
    },
)


def outcome(tree: dict[str, object]) -> object:
    try:
        return vmdef.parse_vmdef(tree, machines=machines, check_files=False)
    except ConfigError as err:
        return ("refused", err.key, err.reason)


@settings(max_examples=150, deadline=None)
@given(tree=definitions, header=st.text(max_size=40))
def test_definitions_round_trip_through_dump_toml(tree: dict[str, object], header: str) -> None:
    back = tomllib.loads(dump_toml(tree, header=header))
    assert back == tree
    assert outcome(back) == outcome(tree)


# ---- CLI --------------------------------------------------------------------------------

runner = CliRunner()


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def fake_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kemari_suite.cli.vm._machines", machines)


def test_cli_check_ok(env: Env, fake_qemu: None) -> None:
    f = env.write(BASE.replace('display = "none"', 'display = "qxl"'))
    res = runner.invoke(vm_app, ["check", str(f), "--host", "b"])
    assert res.exit_code == 0, res.output
    assert identity_digest(load_vmdef(f, machines=machines)) in res.output
    assert "128 MiB of video RAM" in flat(res.output) and "warning" in res.output
    res = runner.invoke(vm_app, ["check", str(f), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["identity"]["display"] == "qxl" and len(data["identity_digest"]) == 64


def test_cli_check_error_exits_2_naming_the_key(env: Env, fake_qemu: None) -> None:
    env.disk_a.unlink()
    res = runner.invoke(vm_app, ["check", str(env.write(BASE))])
    assert res.exit_code == 2
    assert "error:" in res.output and "disk[0].path: " in flat(res.output)


def test_cli_argv(env: Env, fake_qemu: None) -> None:
    f = env.write(BASE)
    res = runner.invoke(vm_app, ["argv", str(f), "--host", "b", "--json"])
    assert res.exit_code == 0, res.output
    argv = json.loads(res.stdout)
    assert argv[:4] == ["ip", "netns", "exec", "nsb"]
    res = runner.invoke(vm_app, ["argv", str(f), "--host", "a", "--direct"])
    assert res.exit_code == 0 and "ifname=ktap0" in res.stdout
    res = runner.invoke(vm_app, ["argv", str(f), "--host", "zz"])
    assert res.exit_code == 2 and "hosts: unknown host 'zz'" in flat(res.output)
