"""What the kernel lab's L1 kernel has and the host's lacks, checked in one booted L1:
nested SVM and /dev/kvm, soft-dirty page tracking, netem and sch_plug.

TCG does not emulate VMX: only the AMD path (kvm_amd) can be tested here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.disk.drbdadm import DrbdResource, detect_dialect
from kemari_suite.disk.drbdconf import DrbdConfig, DrbdNode
from kemari_suite.disk.drbdevents import EventObject, parse_events2
from kemari_suite.disk.drbdstatus import ConnectionState, DiskState
from kemari_suite.klab.drbd import L1DrbdResource, load_module
from kemari_suite.klab.guestfiles import FENCE_HANDLER
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.pair import PairSpec
from kemari_suite.vm.buildkit import locked

from .conftest import lab_id, needs_lab, slot

pytestmark = [*needs_lab, pytest.mark.timeout(600)]

PAIR = PairSpec(lab_id(1), slot=slot(1), data_disk_mib=64)

#: Maps a /dev/shm file shared, dirties every page, clears soft-dirty, writes PICK pages,
#: then prints the pages whose pagemap entry has bit 55 (soft-dirty) set.
SOFT_DIRTY = """
import mmap, os, struct
PAGES, PICK = 256, (3, 17, 100, 101, 255)
fd = os.open("/dev/shm/klab-sd", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, PAGES * 4096)
m = mmap.mmap(fd, PAGES * 4096, mmap.MAP_SHARED)
for i in range(PAGES):
    m[i * 4096] = 1
open("/proc/self/clear_refs", "w").write("4")
for i in PICK:
    m[i * 4096 + 7] = 2
import ctypes
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
with open("/proc/self/pagemap", "rb") as pm:
    pm.seek(base // 4096 * 8)
    entries = struct.unpack(f"{PAGES}Q", pm.read(PAGES * 8))
print(" ".join(str(i) for i, e in enumerate(entries) if e >> 55 & 1))
"""


@pytest.fixture(scope="module")
def l1(
    klab_nested_image: HostImage,
    base_config: KemariConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[L1Host]:
    work = tmp_path_factory.mktemp("klab-kernel")
    shm = Path("/dev/shm") / f"kemari-test-{work.name}"
    shm.mkdir(exist_ok=True)
    with locked(base_config.paths.cache_dir / "klab" / ".tests.lock"):
        host = L1Host(
            f"klab-{lab_id(1)}-k",
            # A data disk and a link whose far end never answers: DRBD stays Connecting.
            PAIR.l1_specs()[0],
            klab_nested_image,
            lab_dir=work / "lab",
            run_root=work / "run",
            shm_dir=shm,
        )
        host.start()
        try:
            host.wait_ready()
            yield host
        finally:
            host.kill()
            host.remove_files()
            shutil.rmtree(shm, ignore_errors=True)


def test_kvm_amd_gives_dev_kvm(l1: L1Host) -> None:
    flags = set(l1.run("cat /proc/cpuinfo").stdout.split())
    assert {"svm", "npt"} <= flags
    l1.run("modprobe kvm_amd", timeout=60)
    assert l1.run("test -c /dev/kvm && echo ok").stdout.strip() == "ok"
    assert l1.run("cat /sys/module/kvm_amd/parameters/npt").stdout.strip() in ("1", "Y")


def test_soft_dirty_is_exact_on_a_shared_mapping(l1: L1Host) -> None:
    out = l1.run("python3 -", stdin=SOFT_DIRTY.encode(), timeout=120).stdout.split()
    assert [int(p) for p in out] == [3, 17, 100, 101, 255]


def test_netem_delays_packets(l1: L1Host) -> None:
    l1.run("tc qdisc add dev lo root netem delay 50ms", timeout=60)
    try:
        out = l1.run("ping -c 3 -i 0.3 -q 127.0.0.1", timeout=60).stdout
    finally:
        l1.run("tc qdisc del dev lo root", timeout=60)
    # "rtt min/avg/max/mdev = 100.4/100.9/101.5/0.4 ms": each way is delayed 50 ms.
    rtt_min = float(out.rsplit("=", 1)[1].split("/")[0])
    assert rtt_min >= 95.0


def test_sch_plug_holds_packets_until_released(l1: L1Host) -> None:
    l1.run("tc qdisc add dev lo root plug limit 100000", timeout=60)
    try:
        l1.run("tc qdisc change dev lo root plug block", timeout=60)
        held = l1.run("ping -c 1 -W 1 127.0.0.1", timeout=60, check=False)
        assert held.exit_code != 0
        l1.run("tc qdisc change dev lo root plug release_indefinite", timeout=60)
        assert l1.run("ping -c 1 -W 5 127.0.0.1", timeout=60, check=False).exit_code == 0
    finally:
        l1.run("tc qdisc del dev lo root", timeout=60)


@pytest.fixture
def drbd_up(l1: L1Host) -> Iterator[L1DrbdResource]:
    """Resource r9 up on this L1 alone (its peer never answers), down afterwards."""
    load_module(l1)
    cfg = DrbdConfig(
        resource="r9",
        nodes=(
            DrbdNode(PAIR.hosts[0], PAIR.address(0), 0),
            DrbdNode(PAIR.hosts[1], PAIR.address(1), 1),
        ),
        disk="/dev/vda",
        fence_peer_handler=f"{FENCE_HANDLER} {{resource}}",
    )
    res = L1DrbdResource(cfg, PAIR.hosts[0], l1)
    res.write_config()
    res.create_md(force=True)
    res.up()
    try:
        yield res
    finally:
        res.down()


def test_drbd_84_events2_parses_with_the_projects_parser(l1: L1Host, drbd_up: object) -> None:
    out = l1.run("drbdsetup events2 r9 --now --statistics --timestamps").stdout
    events = {e.obj: e.props for e in parse_events2(out.splitlines()) if e.props}
    assert events[EventObject.DEVICE]["disk"] == "Inconsistent"
    assert events[EventObject.CONNECTION]["connection"] == "Connecting"


def test_the_projects_drbd_wrapper_reads_84_state(drbd_up: L1DrbdResource) -> None:
    dialect = detect_dialect(drbd_up.tools)
    assert dialect == "8.4"
    res = DrbdResource(
        drbd_up.config,
        drbd_up.node,
        config_path=drbd_up.config_path,
        tools=drbd_up.tools,
        dialect=dialect,
    )
    events = res.events_now()
    assert events and events[-1].initial_state_done
    status = res.status()
    assert status is not None
    assert status.devices[0].disk_state is DiskState.INCONSISTENT
    assert status.connections[0].connection_state is ConnectionState.CONNECTING
    # What 8.4 cannot report comes from the config: this host is node 0, its peer node 1.
    assert status.node_id == 0
    assert (status.connections[0].peer_node_id, status.connections[0].name) == (1, PAIR.hosts[1])
