"""The guest image builder's pure parts: specs, command line, cache key, modules, cpio,
and the host-side probe scan. No apt, no QEMU."""

from __future__ import annotations

import dataclasses
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.errors import ImageError
from kemari_suite.vm.guestmem import (
    COUNTER_MAGIC,
    MEMDIRTY_MAGIC,
    PAGE_SIZE,
    find_counter,
    find_memdirty,
    locate_probes,
    read_value,
)
from kemari_suite.vm.image import (
    BASE_CMDLINE,
    Apt,
    Archive,
    DebPackage,
    ExtraFile,
    ImageInputs,
    ResolutionMemo,
    apt_state_stamp,
    compile_workloads,
    encode_run,
    guest_dir,
    image_key,
    kernel_cmdline,
    kernel_dependency,
    modinfo_depends,
    parse_add,
    parse_control,
    plan_modules,
    resolve_kernel_package,
    resolve_package,
)

# --------------------------------------------------------------------------- parse_add


def test_parse_add_accepts_file(tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(b"x")
    assert parse_add(f"{src}:/usr/local/bin/tool") == (src, "/usr/local/bin/tool")


def test_parse_add_splits_on_last_colon(tmp_path: Path) -> None:
    src = tmp_path / "a:b"
    src.write_bytes(b"x")
    assert parse_add(f"{src}:/a") == (src, "/a")


@pytest.mark.parametrize(
    "dest_part",
    ["", "relative/path", "/etc/", "/etc/../init", "/./x", "//etc//x"],
)
def test_parse_add_rejects_bad_dest(tmp_path: Path, dest_part: str) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    spec = f"{src}:{dest_part}"
    with pytest.raises(ImageError) as info:
        parse_add(spec)
    assert spec in str(info.value)
    assert info.value.step == "add"


def test_parse_add_rejects_missing_separator_and_source(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="SRC:DEST"):
        parse_add("no-separator")
    with pytest.raises(ImageError, match="SRC:DEST"):
        parse_add(":/dest")
    missing = f"{tmp_path / 'absent'}:/x"
    with pytest.raises(ImageError, match="does not exist") as info:
        parse_add(missing)
    assert missing in str(info.value)
    with pytest.raises(ImageError, match="not a regular file"):
        parse_add(f"{tmp_path}:/x")


# --------------------------------------------------------------------------- cmdline


def test_cmdline_defaults() -> None:
    line = kernel_cmdline()
    words = line.split()
    assert "console=ttyS0" in words
    assert "panic=-1" in words
    assert words == list(BASE_CMDLINE)
    assert "kemari." not in line


def test_cmdline_network_and_extra() -> None:
    line = kernel_cmdline(ip="10.0.0.2/24", gw="10.0.0.1", extra="  foo=bar  ")
    words = line.split()
    assert "kemari.ip=10.0.0.2/24" in words
    assert "kemari.gw=10.0.0.1" in words
    assert words[-1] == "foo=bar"


@pytest.mark.parametrize("ip", ["10.0.0.2", "10.0.0.300/24", "10.0.0.2/33", "fe80::1/64", "x/8"])
def test_cmdline_rejects_bad_ip(ip: str) -> None:
    with pytest.raises(ImageError, match=r"kemari\.ip"):
        kernel_cmdline(ip=ip)


def test_cmdline_rejects_bad_gw() -> None:
    with pytest.raises(ImageError, match=r"kemari\.gw"):
        kernel_cmdline(gw="10.0.0.1/24")


def test_cmdline_run_is_one_word() -> None:
    line = kernel_cmdline(run='counter -p 8000 & echo "a b" \\ 100%')
    runs = [w for w in line.split() if w.startswith("kemari.run=")]
    assert len(runs) == 1
    assert runs[0] == "kemari.run=counter%20-p%208000%20%26%20echo%20%22a%20b%22%20%5C%20100%25"
    assert kernel_cmdline(run="") == kernel_cmdline()


def test_cmdline_too_long() -> None:
    with pytest.raises(ImageError, match="2047"):
        kernel_cmdline(run="x" * 3000)


def _busybox() -> str | None:
    for candidate in ("busybox", "/bin/busybox"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.mark.parametrize(
    "command",
    ["counter 100", "a  b\tc", "echo 'q' \"dq\" $HOME; x=1 & y", "100% \\n \\x41 é", "%41"],
)
def test_init_decodes_what_cmdline_encodes(command: str) -> None:
    """Run the urldecode function of guest/init.sh itself on the encoded command."""
    busybox = _busybox()
    if busybox is None:
        pytest.skip("no busybox on this host to run init.sh's decoder")
    template = (guest_dir() / "init.sh").read_text()
    start = template.index("urldecode() {")
    func = template[start : template.index("\n}\n", start) + 3]
    script = f'{func}printf "%s" "$(urldecode "$1")"'
    done = subprocess.run(
        [busybox, "sh", "-c", script, "sh", encode_run(command)],
        capture_output=True,
        check=True,
    )
    assert done.stdout.decode() == command


# --------------------------------------------------------------------------- cache key


def _inputs() -> ImageInputs:
    return ImageInputs(
        kernel_package="linux-image-6.1.0-56-cloud-amd64",
        kernel_package_version="6.1.192-2",
        busybox_version="1:1.35.0-4+deb12u1+b1",
        gcc_version="gcc (Debian 12.2.0-14+deb12u1) 12.2.0",
        init_template=b"#!/bin/sh\necho hi\n",
        workload_sources=(("counter.c", b"int main(){}"), ("probe.h", b"#pragma once")),
        extras=(ExtraFile("/etc/x", b"data", 0o644),),
        init_command="counter",
    )


def test_image_key_is_stable() -> None:
    a, b = _inputs(), _inputs()
    assert image_key(a) == image_key(b)
    # Pinned: the key must not change between processes or Python versions, or every
    # cached image would be rebuilt. Update only together with BUILD_FORMAT.
    assert image_key(a) == "3d30c8f31beacab75db2933c"


def test_image_key_ignores_workload_order() -> None:
    a = _inputs()
    b = dataclasses.replace(a, workload_sources=tuple(reversed(a.workload_sources)))
    assert image_key(a) == image_key(b)


@pytest.mark.parametrize(
    "change",
    [
        {"kernel_package": "linux-image-6.1.0-57-cloud-amd64"},
        {"kernel_package_version": "6.1.192-3"},
        {"busybox_version": "1:1.36.0-1"},
        {"gcc_version": "gcc 13"},
        {"init_template": b"#!/bin/sh\necho hi!\n"},
        {
            "workload_sources": (
                ("counter.c", b"int main(){return 1;}"),
                ("probe.h", b"#pragma once"),
            )
        },
        {"workload_sources": (("counter2.c", b"int main(){}"), ("probe.h", b"#pragma once"))},
        {"workload_sources": (("counter.c", b"int main(){}"), ("probe.h", b"#pragma  once"))},
        {"extras": ()},
        {"extras": (ExtraFile("/etc/y", b"data", 0o644),)},
        {"extras": (ExtraFile("/etc/x", b"datA", 0o644),)},
        {"extras": (ExtraFile("/etc/x", b"data", 0o755),)},
        {"init_command": ""},
        {"init_command": "counter 10"},
        {"modules": ("virtio",)},
        {"build_format": 99},
    ],
)
def test_image_key_sees_every_input(change: dict[str, object]) -> None:
    base = _inputs()
    assert image_key(dataclasses.replace(base, **change)) != image_key(base)  # type: ignore[arg-type]


def test_image_key_fields_do_not_run_together() -> None:
    a = dataclasses.replace(_inputs(), busybox_version="ab", gcc_version="c")
    b = dataclasses.replace(_inputs(), busybox_version="a", gcc_version="bc")
    assert image_key(a) != image_key(b)


# --------------------------------------------------------------------------- apt parsing

APT_SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.

"""


def test_parse_control_and_kernel_dependency() -> None:
    stanzas = parse_control(APT_SHOW)
    assert len(stanzas) == 1
    assert stanzas[0]["Version"] == "6.1.192-2"
    assert stanzas[0]["Description"].endswith("cloud platforms.")
    assert kernel_dependency(stanzas[0]) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")


def test_kernel_dependency_alternatives_and_none() -> None:
    stanza = {"Depends": "initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-9-amd64"}
    assert kernel_dependency(stanza) == ("linux-image-6.1.0-9-amd64", None)
    assert kernel_dependency({"Depends": "libc6 (>= 2.36), busybox"}) is None
    assert kernel_dependency({}) is None


def test_deb_file_stem_escapes_epoch() -> None:
    pkg = DebPackage("busybox-static", "1:1.35.0-4", "amd64")
    assert pkg.file_stem == "busybox-static_1%3a1.35.0-4_amd64"


def test_resolution_memo(tmp_path: Path) -> None:
    path = tmp_path / "resolved.json"
    pkg = DebPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "amd64")
    ResolutionMemo(path, "s1").put("linux-image-cloud-amd64", pkg, "s1")
    assert ResolutionMemo(path, "s1").get("linux-image-cloud-amd64") == pkg
    assert ResolutionMemo(path, "s1").get("other") is None
    assert ResolutionMemo(path, "s2").get("linux-image-cloud-amd64") is None
    path.write_text("not json")
    assert ResolutionMemo(path, "s1").get("linux-image-cloud-amd64") is None


def test_apt_state_stamp_follows_files(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a_Packages").write_text("one")
    first = apt_state_stamp([lists])
    assert apt_state_stamp([lists]) == first
    (lists / "a_Packages").write_text("two!")
    assert apt_state_stamp([lists]) != first


# --------------------------------------------------------------------------- modules


def fake_module(depends: str | None) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section (what modinfo_depends reads)."""
    modinfo = b"license=GPL\0" + (f"depends={depends}\0".encode() if depends is not None else b"")
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    body = bytearray(64)
    mod_off = len(body)
    body += modinfo
    str_off = len(body)
    body += shstrtab
    body += b"\0" * (-len(body) % 8)
    shoff = len(body)

    def shdr(name: int, sh_type: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, sh_type, 0, 0, offset, size, 0, 0, 1, 0)

    body += shdr(0, 0, 0, 0)
    body += shdr(1, 3, str_off, len(shstrtab))
    body += shdr(11, 1, mod_off, len(modinfo))
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    body[:64] = header
    return bytes(body)


def test_modinfo_depends() -> None:
    assert modinfo_depends(fake_module("virtio_ring,virtio")) == ["virtio_ring", "virtio"]
    assert modinfo_depends(fake_module("")) == []
    assert modinfo_depends(fake_module(None)) == []
    with pytest.raises(ImageError):
        modinfo_depends(b"not an elf at all" * 8)


def _moddir(tmp_path: Path, mods: dict[str, str], builtin: list[str]) -> Path:
    moddir = tmp_path / "lib/modules/6.1.0-test"
    for rel, depends in mods.items():
        path = moddir / "kernel" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = fake_module(depends)
        path.write_bytes(lzma.compress(data) if rel.endswith(".xz") else data)
    moddir.mkdir(parents=True, exist_ok=True)
    (moddir / "modules.builtin").write_text("".join(f"kernel/{b}\n" for b in builtin))
    return moddir


def test_plan_modules_orders_dependencies_first(tmp_path: Path) -> None:
    moddir = _moddir(
        tmp_path,
        {
            "drivers/virtio/virtio_ring.ko": "",
            "drivers/virtio/virtio_pci.ko.xz": "virtio_ring,virtio",
            "drivers/block/virtio_blk.ko": "virtio_ring,virtio",
            "drivers/char/hw_random/virtio-rng.ko": "virtio",
        },
        builtin=["drivers/virtio/virtio.ko"],
    )
    plan = plan_modules(moddir, ["virtio_pci", "virtio", "virtio_blk", "failover", "virtio_rng"])
    assert [name for name, _ in plan.load] == [
        "virtio_ring",
        "virtio_pci",
        "virtio_blk",
        "virtio_rng",
    ]
    assert plan.builtin == ("virtio",)
    assert plan.absent == ("failover",)
    # .ko.xz is shipped decompressed: busybox insmod loads plain ELF only.
    assert dict(plan.load)["virtio_pci"][:4] == b"\x7fELF"


def test_plan_modules_missing_dependency(tmp_path: Path) -> None:
    moddir = _moddir(tmp_path, {"drivers/net/virtio_net.ko": "net_failover"}, builtin=[])
    with pytest.raises(ImageError, match="virtio_net needs net_failover"):
        plan_modules(moddir, ["virtio_net"])


# --------------------------------------------------------------------------- cpio


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A strict newc reader: name -> (mode, data, rdev)."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        assert data[pos + namesize - 1] == 0
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_archive_newc_roundtrip() -> None:
    ar = Archive()
    ar.file("/bin/tool", b"abc", 0o755)
    ar.symlink("bin/sh", "/bin/busybox")
    ar.chardev("dev/console", 5, 1)
    ar.dir("tmp", 0o1777)
    ar.file("etc/deep/er/file", b"12345")
    entries = read_newc(ar.newc())
    assert list(entries) == sorted(entries)
    assert entries["bin"][0] == stat.S_IFDIR | 0o755
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, b"abc", (0, 0))
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"/bin/busybox", (0, 0))
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600
    assert entries["dev/console"][2] == (5, 1)
    assert entries["tmp"][0] == stat.S_IFDIR | 0o1777
    assert entries["etc/deep/er"][0] == stat.S_IFDIR | 0o755
    assert entries["etc/deep/er/file"][1] == b"12345"
    assert ar.newc() == ar.newc()


def test_archive_conflicts() -> None:
    ar = Archive()
    ar.file("etc/x", b"")
    with pytest.raises(ImageError, match="is a file"):
        ar.file("etc/x/y", b"")
    with pytest.raises(ImageError, match="directory and a file"):
        ar.file("etc", b"")
    ar.symlink("bin/ls", "/bin/busybox")
    ar.symlink("bin/ls", "/elsewhere", replace=False)
    assert ar.entries["bin/ls"].data == b"/bin/busybox"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool")
def test_archive_is_readable_by_cpio() -> None:
    ar = Archive()
    ar.file("bin/tool", b"abc", 0o755)
    ar.symlink("bin/sh", "/bin/busybox")
    done = subprocess.run(["cpio", "-it", "--quiet"], input=ar.newc(), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["bin", "bin/sh", "bin/tool"]


# --------------------------------------------------------------------------- guest sources


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_workload_binaries_do_not_contain_the_magics(tmp_path: Path) -> None:
    """A magic stored in the binary would also sit, page-aligned, in the initramfs copy of
    the program, and the RAM scan would find a stale second probe there."""
    programs = compile_workloads(guest_dir() / "workloads", tmp_path, lambda _: None)
    assert {"counter", "memdirty", "records"} <= set(programs)
    for name, binary in programs.items():
        assert binary[:4] == b"\x7fELF"
        assert COUNTER_MAGIC not in binary, name
        assert MEMDIRTY_MAGIC not in binary, name


# --------------------------------------------------------------------------- guestmem


def _probe(magic: bytes, value: int, ticks: int = 100, aux: int = 0, pid: int = 42) -> bytes:
    return magic + struct.pack("<QQQQ", value, ticks, aux, pid)


def test_find_counter_in_synthetic_ram() -> None:
    ram = bytearray(64 * PAGE_SIZE)
    assert find_counter(ram) is None
    # Not page-aligned: must be ignored (the ELF's .rodata, stray copies).
    ram[5 * PAGE_SIZE + 8 : 5 * PAGE_SIZE + 8 + 48] = _probe(COUNTER_MAGIC, 999)
    assert find_counter(ram) is None
    ram[17 * PAGE_SIZE : 17 * PAGE_SIZE + 48] = _probe(COUNTER_MAGIC, 1234, 100, 8000, 7)
    assert find_counter(ram) == 1234
    assert find_counter(bytes(ram)) == 1234
    assert find_counter(memoryview(ram)) == 1234
    assert find_counter(np.frombuffer(ram, dtype=np.uint8)) == 1234
    assert find_counter(np.frombuffer(ram, dtype=np.uint64)) == 1234
    hits = locate_probes(ram)
    assert len(hits) == 1
    assert (hits[0].offset, hits[0].ticks_per_second, hits[0].aux, hits[0].pid) == (
        17 * PAGE_SIZE,
        100,
        8000,
        7,
    )
    assert find_memdirty(ram) is None


def test_find_counter_reads_live_value_and_prefers_highest() -> None:
    ram = bytearray(8 * PAGE_SIZE + 100)  # a ragged tail is ignored
    ram[2 * PAGE_SIZE : 2 * PAGE_SIZE + 48] = _probe(COUNTER_MAGIC, 5)
    ram[6 * PAGE_SIZE : 6 * PAGE_SIZE + 48] = _probe(COUNTER_MAGIC, 70)
    ram[7 * PAGE_SIZE : 7 * PAGE_SIZE + 48] = _probe(MEMDIRTY_MAGIC, 31337)
    assert find_counter(ram) == 70
    assert find_memdirty(ram) == 31337
    assert read_value(ram, 2 * PAGE_SIZE) == 5
    struct.pack_into("<Q", ram, 2 * PAGE_SIZE + 16, 6)
    assert read_value(ram, 2 * PAGE_SIZE) == 6
    assert read_value(ram, 3 * PAGE_SIZE) is None
    assert read_value(ram, 7 * PAGE_SIZE) is None  # another magic
    assert read_value(ram, 7 * PAGE_SIZE, MEMDIRTY_MAGIC) == 31337
    assert read_value(ram, 100 * PAGE_SIZE) is None


def test_locate_probes_rejects_bad_magic() -> None:
    with pytest.raises(ValueError):
        locate_probes(bytearray(PAGE_SIZE), b"short")


# --------------------------------------------------------------------------- apt (faked)

FAKE_APT_CACHE = """#!/bin/sh
# fake apt-cache: show [--no-all-versions] NAME -> $FAKE/lists/NAME
echo "apt-cache $*" >> "$FAKE/log"
for last; do :; done
if [ -f "$FAKE/lists/$last" ]; then cat "$FAKE/lists/$last"; exit 0; fi
echo "E: No packages found" >&2
exit 100
"""

FAKE_APT_GET = """#!/bin/sh
# fake apt-get: update moves $FAKE/pending/* into lists; download makes a .deb here
echo "apt-get $*" >> "$FAKE/log"
for last; do :; done
case " $* " in
  *" update "*) mv "$FAKE"/pending/* "$FAKE/lists/" 2>/dev/null; exit 0 ;;
  *" download "*)
    [ -f "$FAKE/fail_download" ] && { echo "E: Failed to fetch" >&2; exit 100; }
    name=${last%%=*}; version=${last#*=}
    echo deb > "${name}_${version}_amd64.deb"; exit 0 ;;
esac
exit 1
"""


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "fake"
    bindir = fake / "bin"
    for d in (bindir, fake / "lists", fake / "pending"):
        d.mkdir(parents=True)
    for name, text in (("apt-cache", FAKE_APT_CACHE), ("apt-get", FAKE_APT_GET)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (fake / "log").write_text("")
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return fake


def _log(fake: Path) -> list[str]:
    return (fake / "log").read_text().splitlines()


def test_resolve_meta_package(fake_apt: Path) -> None:
    (fake_apt / "lists" / "linux-image-cloud-amd64").write_text(APT_SHOW)
    pkg = resolve_kernel_package(Apt(lambda _: None), "linux-image-cloud-amd64")
    assert pkg == DebPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "amd64")
    assert not any("update" in line for line in _log(fake_apt))


def test_resolve_versioned_name_directly(fake_apt: Path) -> None:
    (fake_apt / "lists" / "linux-image-6.1.0-9-amd64").write_text(
        "Package: linux-image-6.1.0-9-amd64\nVersion: 6.1.27-1\nArchitecture: amd64\n"
    )
    pkg = resolve_kernel_package(Apt(lambda _: None), "linux-image-6.1.0-9-amd64")
    assert pkg == DebPackage("linux-image-6.1.0-9-amd64", "6.1.27-1", "amd64")


def test_resolve_runs_apt_get_update_once(fake_apt: Path) -> None:
    (fake_apt / "pending" / "linux-image-cloud-amd64").write_text(APT_SHOW)
    notes: list[str] = []
    apt = Apt(notes.append)
    pkg = resolve_kernel_package(apt, "linux-image-cloud-amd64")
    assert pkg.name == "linux-image-6.1.0-56-cloud-amd64"
    assert sum("apt-get update" in line for line in _log(fake_apt)) == 1
    assert any("apt-get update" in n for n in notes)
    # A second unknown package does not trigger a second update.
    with pytest.raises(ImageError) as info:
        resolve_package(apt, "no-such-package")
    assert "no-such-package" in str(info.value) and "apt-get update" in str(info.value)
    assert sum("apt-get update" in line for line in _log(fake_apt)) == 1


def test_resolve_rejects_non_kernel(fake_apt: Path) -> None:
    (fake_apt / "lists" / "bash").write_text("Package: bash\nVersion: 5.2\nDepends: libc6\n")
    with pytest.raises(ImageError, match="bash neither is nor depends on"):
        resolve_kernel_package(Apt(lambda _: None), "bash")


def test_download_once_and_failure_names_package(fake_apt: Path, tmp_path: Path) -> None:
    apt = Apt(lambda _: None)
    pkg = DebPackage("busybox-static", "1:1.35.0-4", "amd64")
    debs = tmp_path / "debs"
    deb = apt.download(pkg, debs)
    assert deb == debs / "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert deb.is_file()
    assert apt.download(pkg, debs) == deb
    assert sum("download" in line for line in _log(fake_apt)) == 1
    assert [p.name for p in debs.iterdir()] == [deb.name]  # no temporary left behind

    (fake_apt / "fail_download").write_text("")
    other = DebPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "amd64")
    with pytest.raises(ImageError) as info:
        apt.download(other, debs)
    assert "linux-image-6.1.0-56-cloud-amd64=6.1.192-2" in str(info.value)
    assert "apt-get update" in str(info.value)
