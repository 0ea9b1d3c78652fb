"""L1 hosts on paper: the kernel command line, the QEMU command line, the link's ports,
the image's cache key and files. Nothing is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from kemari_suite.errors import ConfigError
from kemari_suite.klab.guestfiles import FENCE_HANDLER, INIT, agent_sources, image_files, l1_cmdline
from kemari_suite.klab.host import L1Spec, l1_vm_spec
from kemari_suite.klab.image import HostImage, image_key
from kemari_suite.klab.pair import PairSpec, link_ports
from kemari_suite.vm.apt import DebPackage
from kemari_suite.vm.qemu import VMPaths, qemu_argv

IMAGE = HostImage(Path("/c/disk.img"), Path("/c/vmlinuz"), "6.1.0-57-cloud-amd64", "k", True)


def test_cmdline_names_the_host_and_boots_nvme_without_initramfs() -> None:
    line = l1_cmdline("l1a", "10.99.0.1/24")
    words = line.split()
    assert "root=/dev/nvme0n1" in words and f"init={INIT}" in words and "rw" in words
    assert "klab.host=l1a" in words and "klab.ip=10.99.0.1/24" in words
    assert "console=ttyS0" in words


@pytest.mark.parametrize("host,ip", [("L1A", ""), ("l1 a", ""), ("l1a", "10.0.0.1"), ("", "")])
def test_cmdline_refuses_bad_names_and_addresses(host: str, ip: str) -> None:
    with pytest.raises(ConfigError):
        l1_cmdline(host, ip)


def test_qemu_line_has_tcg_cpu_max_nvme_root_agent_port_and_link(tmp_path: Path) -> None:
    a, _ = PairSpec("t0", slot=3, data_disk_mib=64).l1_specs()
    spec = l1_vm_spec("klab-t0-l1a", a, IMAGE, tmp_path / "l1a")
    argv = qemu_argv(spec, VMPaths.for_vm(spec.name, tmp_path / "run", tmp_path / "shm"))
    line = " ".join(argv)
    assert "-accel tcg" in line and "-cpu max" in line
    assert f"-kernel {IMAGE.kernel}" in line and "-initrd" not in argv
    assert f"file={tmp_path / 'l1a' / 'root.qcow2'},format=qcow2" in line
    assert "nvme,serial=klabroot,drive=klabroot" in line
    assert "virtserialport,chardev=klabagent,name=klab.agent" in line
    assert f"path={tmp_path / 'l1a' / 'agent.sock'},server=on,wait=off" in line
    p_a, p_b = link_ports(3)
    assert f"socket,udp=127.0.0.1:{p_b},localaddr=127.0.0.1:{p_a},id=net0" in line
    assert f"filename={tmp_path / 'l1a' / 'data.img'}" in line


def test_no_data_disk_no_link(tmp_path: Path) -> None:
    spec = l1_vm_spec("x", L1Spec("l1a"), IMAGE, tmp_path)
    assert spec.blockdev is None and spec.netdev is None


def test_the_two_ends_of_a_link_cross_and_slots_never_share_ports() -> None:
    a, b = PairSpec("t0", slot=7).l1_specs()
    assert a.netdev is not None and b.netdev is not None
    pa, pb = link_ports(7)
    assert f"udp=127.0.0.1:{pb}" in a.netdev and f"localaddr=127.0.0.1:{pa}" in a.netdev
    assert f"udp=127.0.0.1:{pa}" in b.netdev and f"localaddr=127.0.0.1:{pb}" in b.netdev
    assert (a.ip, b.ip) == ("10.99.7.1/24", "10.99.7.2/24") and a.mac != b.mac
    used = [p for s in range(200) for p in link_ports(s)]
    assert len(used) == len(set(used))
    with pytest.raises(ConfigError):
        link_ports(200)


def test_image_key_follows_every_input() -> None:
    kernel = DebPackage("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3", "amd64")
    base = {
        "suite": "bookworm",
        "mirror": "http://deb.debian.org/debian",
        "packages": ("kmod", "drbd-utils"),
        "kernel": kernel,
        "size_mib": 1536,
        "files": image_files(),
    }
    key = image_key(**base)  # type: ignore[arg-type]
    assert key == image_key(**base)  # type: ignore[arg-type]
    changes = {
        "mirror": "http://mirror.example/debian",
        "packages": ("kmod",),
        "kernel": DebPackage(kernel.name, "6.1.192-4", "amd64"),
        "size_mib": 2048,
        "files": (*image_files(), ("/etc/x", "y", 0o644)),
    }
    for name, value in changes.items():
        assert image_key(**{**base, name: value}) != key, name  # type: ignore[arg-type]


def test_the_image_carries_the_agents_own_code() -> None:
    files = {path: (content, mode) for path, content, mode in image_files()}
    assert files[INIT][1] == 0o755 and files[FENCE_HANDLER][1] == 0o755
    src = Path(__file__).resolve().parents[2] / "kemari_suite"
    for path, content in agent_sources():
        if path.endswith("klab/wire.py"):
            assert content == (src / "klab" / "wire.py").read_text()
        if path.endswith("guestagent.py"):
            assert content == (src / "klab" / "guestagent.py").read_text()
    assert "exit 7" in files[FENCE_HANDLER][0]
