"""Build the guest image from Debian packages and boot it under QEMU (TCG).

The image goes into $KEMARI_CACHE (default /var/cache/kemari), so the download and build
happen once per machine. The guest's RAM is a file in /dev/shm, as in the product, so the
test also finds the counter's probe there from the host. Names derive from the
pytest-xdist worker id; QEMU is killed by its PID and the files are removed in finally.
"""

from __future__ import annotations

import gzip
import mmap
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kemari_suite.vm.guestmem import find_counter, locate_probes, read_value
from kemari_suite.vm.image import GuestImage, build_image, kernel_cmdline

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="building images needs root (apt-get)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
CACHE = Path(os.environ.get("KEMARI_CACHE", "/var/cache/kemari"))
BOOT_TIMEOUT = 60.0
RAM_MIB = 128


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(CACHE, init="counter 100")


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first console line matching ``pattern``; fails if QEMU exits or time runs out."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if rx.search(line):
                return line
        if proc.poll() is not None:
            err = (log.parent / "qemu.stderr").read_text(errors="replace")
            pytest.fail(
                f"QEMU exited {proc.returncode} waiting for {pattern!r}:\n{err}{text[-3000:]}"
            )
        time.sleep(0.02)
    pytest.fail(f"no {pattern!r} on the console in {timeout} s:\n{text[-3000:]}")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool")
def test_add_puts_host_file_into_initramfs(image: GuestImage, tmp_path: Path) -> None:
    extra = tmp_path / "hello.sh"
    extra.write_text(f"#!/bin/sh\necho hello {WORKER}\n")
    extra.chmod(0o755)
    built = build_image(CACHE, init="counter 100", add=[f"{extra}:/usr/local/bin/hello"])
    assert built.key != image.key
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"],
        input=gzip.decompress(built.initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    # "<mode> <links> <user> <group> <size> <month> <day> <year> <name>[ -> <target>]"
    lines = {line.split()[8]: line for line in listing.splitlines()}
    assert lines["usr/local/bin/hello"].startswith("-rwxr-xr-x")
    for path in ("init", "bin/busybox", "bin/sh", "bin/counter", "bin/memdirty", "bin/records"):
        assert path in lines, path
    assert "etc/kemari/run" in lines
    assert any(p.endswith("/virtio_net.ko") for p in lines)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool")
def test_agent_with_empty_image_section_boots_what_was_built(tmp_path: Path) -> None:
    """`kemari image build --add X` records its output; an agent whose config leaves
    [image] empty boots that very image, X included (the record goes to a folder of this
    test's own, never to the shared cache's)."""
    from kemari_suite.config import KemariConfig, PathsConfig
    from kemari_suite.vm.define import select_image, vm_spec
    from kemari_suite.vm.lastbuild import record_last_build

    extra = tmp_path / "x.txt"
    extra.write_text(f"extra {WORKER}\n")
    built = build_image(CACHE, add=[f"{extra}:/etc/x.txt"])
    records = tmp_path / "cache"
    record_last_build(records, built)
    cfg = KemariConfig(paths=PathsConfig(cache_dir=records))
    choice = select_image(cfg)
    assert choice.source == "last-build" and choice.image_id == built.key
    spec = vm_spec(cfg, choice)
    assert (spec.kernel, spec.initrd, spec.image_id) == (built.kernel, built.initrd, built.key)
    assert spec.initrd is not None
    names = subprocess.run(
        ["cpio", "-it", "--quiet"],
        input=gzip.decompress(spec.initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "etc/x.txt" in names.split()


@pytest.fixture
def vm_files(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    ram = Path(f"/dev/shm/kemari-test-image-{WORKER}-{os.getpid()}.ram")
    disk = tmp_path / "vda.img"
    with disk.open("wb") as fh:
        fh.truncate(8 << 20)
    try:
        yield tmp_path / "console.log", ram, disk
    finally:
        ram.unlink(missing_ok=True)


def test_second_build_is_cached(image: GuestImage) -> None:
    again = build_image(CACHE, init="counter 100")
    assert again.cached
    assert (again.key, again.kernel, again.initrd) == (image.key, image.kernel, image.initrd)
    assert again.kernel_version == image.kernel_version
    other = build_image(CACHE, init="counter 100", add=[])
    assert other.key == image.key


def test_boot_counter(
    image: GuestImage,
    vm_files: tuple[Path, Path, Path],
    record_property: Callable[[str, object], None],
) -> None:
    console, ram, disk = vm_files
    assert image.kernel.is_file() and image.initrd.is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", image.kernel_version)
    # The baked-in command is "counter 100"; kemari.run overrides it and also starts
    # records on the virtio disk, so the virtio modules are exercised too.
    cmdline = kernel_cmdline(
        ip="10.0.2.15/24", gw="10.0.2.2", run="records -p 7000 & counter -p 8000 100"
    )
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(RAM_MIB),
        "-nographic",
        "-no-reboot",
        "-monitor", "none",
        "-object", f"memory-backend-file,id=ram0,size={RAM_MIB}M,mem-path={ram},share=on",
        "-machine", "pc,memory-backend=ram0",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", cmdline,
        "-serial", f"file:{console}",
        "-nic", "user,model=virtio-net-pci,restrict=on",
        "-drive", f"file={disk},format=raw,if=virtio",
    ]  # fmt: skip
    start = time.monotonic()
    stderr = (console.parent / "qemu.stderr").open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for(console, r"^KEMARI-BOOTED$", proc, BOOT_TIMEOUT)
        boot_s = time.monotonic() - start
        print(f"\nboot to KEMARI-BOOTED under TCG: {boot_s:.2f} s")
        record_property("boot_seconds", round(boot_s, 3))

        line = _wait_for(console, r"^COUNTER \d+$", proc, 30)
        assert int(line.split()[1]) == 100
        ready = _wait_for(console, r"^KEMARI-RECORDS-READY ", proc, 10)
        assert "device=/dev/vda capacity=2048" in ready

        with ram.open("rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mem:
            hits = locate_probes(mem)
            assert len(hits) == 1, hits
            assert (hits[0].ticks_per_second, hits[0].aux) == (100, 8000)
            first = find_counter(mem)
            assert first is not None and first >= 100
            time.sleep(1.0)
            later = read_value(mem, hits[0].offset)
            assert later is not None and later > first

        text = console.read_text(errors="replace")
        assert "insmod" not in text, text  # every module loaded
        assert "could not configure eth0" not in text, text
        assert "Kernel panic" not in text
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stderr.close()
