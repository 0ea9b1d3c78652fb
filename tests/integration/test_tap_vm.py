"""Both taps under a real guest in a lab, driven by a minimal stand-in for the primary.

The guest (TCG) runs ``records`` on its virtio-blk disk and ``counter`` as a TCP service.
Its disk is an NBD export of a BlockTap in PROTECTED mode, its NIC a ``-netdev stream``
to a FrameProxy attached to the lab's primary TAP. A client in the lab's client
namespace talks to the guest.

The stand-in primary (``MiniPrimary``) does what the real one does around the taps, with
no memory transfer and no secondary: ``stop`` -> switch the epoch -> ``io_log(epoch)``
-> ``cont`` -> (the acknowledgement, at once) ``commit_epoch`` -> ``output_ready`` ->
``release``. That is enough to show the output rule end to end: nothing reaches the
client before its epoch is released, and every record the client saw acknowledged is
on the backend file at that moment.

Labs use slots 10..19 of this worker (tests/conftest.py uses 20.., test_lab.py 0..).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import itertools
import os
import shutil
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from kemari_suite import lab
from kemari_suite.config import DiskConfig, KemariConfig, PathsConfig
from kemari_suite.disk import DiskBackend, open_backend
from kemari_suite.errors import ConnectError
from kemari_suite.lab.netclient import tcp_request
from kemari_suite.tap.epochs import OpKind, parse
from kemari_suite.tap.events import TapMode
from kemari_suite.tap.nbd import BlockTap, NBDServer
from kemari_suite.tap.net import FrameProxy
from kemari_suite.tap.policy import KemariPolicy, RemusPolicy, SyncPolicy, SyncScheduler
from kemari_suite.tap.tun import open_tap
from kemari_suite.vm.image import GuestImage, kernel_cmdline
from kemari_suite.vm.qemu import AsyncVM, VMSpec, console_tail, wait_for_console

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TAP)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_slots = itertools.count(10)
DISK_SIZE = 8 << 20
RECORDS_PORT = 7000
COUNTER_PORT = 8000
BOOT_TIMEOUT = 90.0
_CLONE_NEWNET = 0x40000000


@pytest.fixture
def tap_lab() -> Iterator[lab.LabLayout]:
    slot = next(_slots)
    if slot > 19:  # pragma: no cover
        pytest.skip("out of tap lab slots in this worker")
    lab_id = lab.worker_lab_id(WORKER, slot)
    lab.down(lab_id)
    try:
        yield lab.up(lab_id, "unlimited")
    finally:
        lab.down(lab_id)


def ns_connect(ns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket connected from inside namespace ``ns`` (setns in a throwaway thread)."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                assert libc.setns(fd, _CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection((host, port), timeout=timeout)
        except Exception as err:
            box["error"] = err

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout + 2)
    if "sock" not in box:
        raise ConnectError(f"{host}:{port}", str(box.get("error", "timeout")))
    s = box["sock"]
    assert isinstance(s, socket.socket)
    return s


@dataclass
class MiniPrimary:
    """The taps' side of a sync point, without memory or a secondary (module docstring)."""

    vm: AsyncVM
    block: BlockTap
    net: FrameProxy
    epoch: int = 1
    pauses_ms: list[float] = field(default_factory=list)
    logs: dict[int, bytes] = field(default_factory=dict)
    #: (epoch, time.monotonic() of its release)
    releases: list[tuple[int, float]] = field(default_factory=list)

    async def sync_point(self, sched: SyncScheduler | None = None) -> int:
        e = self.epoch
        t0 = time.perf_counter()
        await self.vm.execute("stop")
        # The epoch switches while the VM is stopped, pushed into both taps.
        self.epoch = e + 1
        self.block.switch_epoch(self.epoch)
        self.net.switch_epoch(self.epoch)
        if sched is not None:
            sched.started(e)
        self.logs[e] = self.block.io_log(e)
        await self.vm.execute("cont")
        self.pauses_ms.append((time.perf_counter() - t0) * 1e3)
        # The secondary would verify and acknowledge here.
        self.block.commit_epoch(e)
        await self.block.output_ready(e)
        self.net.release(e)
        self.releases.append((e, time.monotonic()))
        if sched is not None:
            sched.finished()
        return e

    async def run(self, policy: SyncPolicy, stop: asyncio.Event) -> None:
        sched = SyncScheduler(policy)
        self.block.on_event = sched.notify
        self.net.on_event = sched.notify
        try:
            while not stop.is_set():
                waiter = asyncio.ensure_future(sched.wait_due(timeout=0.2))
                reason = await waiter
                if reason is not None and not stop.is_set():
                    await self.sync_point(sched)
        finally:
            self.block.on_event = None
            self.net.on_event = None


@dataclass
class Rig:
    lay: lab.LabLayout
    vm: AsyncVM
    disk: DiskBackend
    block: BlockTap
    nbd: NBDServer
    net: FrameProxy
    primary: MiniPrimary

    def records_on_file(self, n: int) -> bytes:
        return self.disk.read(n * 4096, 32)


async def start_rig(lay: lab.LabLayout, image: GuestImage, paths: PathsConfig) -> Rig:
    run_dir = paths.run_dir
    disk_path = run_dir / "guest-disk.img"
    with disk_path.open("wb") as fh:
        fh.truncate(DISK_SIZE)
    # The configured backend (the built-in disk), as the engine opens it.
    disk = open_backend(KemariConfig(disk=DiskConfig(path=str(disk_path))))
    assert disk is not None
    disk.attach()
    disk.promote()
    # The mini primary (made below, once the VM exists) pushes the epoch.
    block = BlockTap(disk, epoch=1, mode=TapMode.PROTECTED)
    nbd = NBDServer(block, run_dir / "nbd.sock", export_name="disk0")
    await nbd.start()
    tap = open_tap(lay.tap_primary, netns=lay.ns_primary)
    net = FrameProxy(
        run_dir / "net.sock",
        tap,
        epoch=1,
        mode=TapMode.PROTECTED,
    )
    await net.start()
    await asyncio.to_thread(lab.wait_tap_forwarding, lay.lab_id, "primary")
    spec = VMSpec(
        name=f"tap-{lay.lab_id}",
        kernel=image.kernel,
        initrd=image.initrd,
        append=kernel_cmdline(
            ip=f"{lay.guest_ip}/{lay.lan_prefix}",
            run=f"records -p {RECORDS_PORT} & counter -q -p {COUNTER_PORT} 50",
        ),
        netdev=f"stream,server=off,addr.type=unix,addr.path={run_dir / 'net.sock'}",
        blockdev=(f"driver=nbd,server.type=unix,server.path={run_dir / 'nbd.sock'},export=disk0"),
        netns=lay.ns_primary,
    )
    vm = AsyncVM(spec, run_root=run_dir, shm_dir=paths.shm_dir)
    primary = MiniPrimary(vm, block, net)
    rig = Rig(lay, vm, disk, block, nbd, net, primary)
    await vm.start()
    try:
        await asyncio.to_thread(
            wait_for_console,
            vm.paths.console,
            "KEMARI-RECORDS-READY",
            BOOT_TIMEOUT,
            alive=vm.alive,
        )
    except Exception:
        await stop_rig(rig)
        raise
    return rig


async def stop_rig(rig: Rig) -> None:
    with contextlib.suppress(Exception):
        await rig.vm.kill()
    await rig.net.close()
    await rig.nbd.close()
    await rig.block.close()
    rig.disk.close()


def run_with_rig(
    lay: lab.LabLayout,
    image: GuestImage,
    paths: PathsConfig,
    body: Callable[[Rig], object],
) -> None:
    async def go() -> None:
        rig = await start_rig(lay, image, paths)
        try:
            res = body(rig)
            if asyncio.iscoroutine(res):
                await asyncio.wait_for(res, 240)
        except BaseException:
            print(console_tail(rig.vm.paths.console, 30))
            raise
        finally:
            await stop_rig(rig)

    asyncio.run(go())


def test_output_is_held_until_its_epoch_is_released(
    tap_lab: lab.LabLayout,
    guest_image: GuestImage,
    run_paths: PathsConfig,
    record_property: Callable[[str, object], None],
) -> None:
    lay = tap_lab

    async def body(rig: Rig) -> None:
        p, net = rig.primary, rig.net
        # The guest has booted; whatever it sent so far is held.
        assert net.stats.released_frames == 0 and net.stats.passed_frames == 0
        # No sync points: the client's SYN gets in (inbound passes), every answer is held.
        with pytest.raises(ConnectError):
            await asyncio.to_thread(
                tcp_request, lay.ns_client, lay.guest_ip, COUNTER_PORT, b"", 3.0
            )
        assert net.stats.to_guest_frames > 0
        assert net.stats.held_frames > 0 and net.stats.released_frames == 0
        held_before = net.held_epochs()
        assert held_before == [1]
        # Sync points at a fixed 20 ms: the same request is answered now.
        stop = asyncio.Event()
        loop_task = asyncio.create_task(p.run(RemusPolicy(0.02), stop))
        try:
            t0 = time.monotonic()
            out = await asyncio.to_thread(
                tcp_request, lay.ns_client, lay.guest_ip, COUNTER_PORT, b"", 10.0
            )
            record_property("first_answer_s", round(time.monotonic() - t0, 3))
            assert int(out.decode().strip()) > 0
        finally:
            stop.set()
            await loop_task
        assert net.stats.released_frames > 0
        assert net.stats.dropped_frames == 0 and net.stats.overflows == 0
        # Epochs were released in order, each after the one before.
        epochs = [e for e, _ in p.releases]
        assert epochs == sorted(epochs) and epochs[0] == 1
        record_property("sync_pause_ms_p50", round(statistics.median(p.pauses_ms), 2))

    run_with_rig(lay, guest_image, run_paths, body)


async def records_session(rig: Rig, n_records: int, policy: SyncPolicy) -> list[float]:
    """Write records 0..n-1 through the guest; check each one on the backend file the
    moment its OK arrives. Returns the W -> OK latencies in ms."""
    lay, p = rig.lay, rig.primary
    stop = asyncio.Event()
    loop_task = asyncio.create_task(p.run(policy, stop))
    latencies: list[float] = []
    sock: socket.socket | None = None
    try:
        sock = await asyncio.to_thread(ns_connect, lay.ns_client, lay.guest_ip, RECORDS_PORT, 15.0)
        f = sock.makefile("rwb", buffering=0)
        for n in range(n_records):
            t0 = time.perf_counter()

            def exchange(n: int = n) -> bytes:
                f.write(f"W {n}\n".encode())
                return f.readline()

            line = await asyncio.to_thread(exchange)
            latencies.append((time.perf_counter() - t0) * 1e3)
            assert line == f"OK {n}\n".encode(), line
            # The OK left the proxy only after its epoch was committed, applied and
            # flushed (O_DSYNC: the guest flushed, so output_ready waited): the record
            # must be on the backend file now.
            head = rig.records_on_file(n)
            assert head[:16] == b"KEMARI-RECORD!!!", (n, head)
            assert struct.unpack("<Q", head[16:24])[0] == n
        f.close()
    finally:
        if sock is not None:
            sock.close()
        stop.set()
        await loop_task
    return latencies


def test_acknowledged_records_are_on_the_disk_before_the_client_sees_them(
    tap_lab: lab.LabLayout,
    guest_image: GuestImage,
    run_paths: PathsConfig,
    record_property: Callable[[str, object], None],
) -> None:
    async def body(rig: Rig) -> None:
        p = rig.primary
        lat = await records_session(rig, 30, KemariPolicy(max_interval=0.1))
        # The disk writes went through the log: epochs with writes were shipped, and the
        # guest's O_DSYNC writes made those epochs carry a flush or FUA.
        shipped = [parse(b) for b in p.logs.values()]
        writes = [r for r in shipped if any(o.kind is OpKind.WRITE for o in r.ops)]
        assert writes, "no epoch carried a disk write"
        assert all(r.needs_flush for r in writes)
        assert rig.block.status()["error"] is None
        assert rig.block.stats.backend_flushes >= 1
        record_property("kemari_write_ok_ms_p50", round(statistics.median(lat), 2))

    run_with_rig(tap_lab, guest_image, run_paths, body)


def test_kemari_policy_adds_less_latency_than_remus(
    tap_lab: lab.LabLayout,
    guest_image: GuestImage,
    run_paths: PathsConfig,
    record_property: Callable[[str, object], None],
) -> None:
    """Request/response latency of a small TCP service (records' "R" query, no disk
    write) under sync points at each output versus fixed 25 ms epochs."""

    async def body(rig: Rig) -> None:
        lay, p = rig.lay, rig.primary
        results: dict[str, list[float]] = {}
        for name, policy in (
            ("kemari", KemariPolicy(max_interval=0.1)),
            ("remus", RemusPolicy(0.025)),
            ("base", None),
            ("kemari2", KemariPolicy(max_interval=0.1)),
        ):
            stop = asyncio.Event()
            task: asyncio.Task[object]
            if policy is None:  # no output commit: the proxy passes frames through
                rig.net.set_unprotected()
                task = asyncio.create_task(stop.wait())
            else:
                rig.net.set_protected()
                task = asyncio.create_task(p.run(policy, stop))
            sock = await asyncio.to_thread(
                ns_connect, lay.ns_client, lay.guest_ip, RECORDS_PORT, 15.0
            )
            f = sock.makefile("rwb", buffering=0)
            lat = []
            try:
                for i in range(60):

                    def exchange(f: io.RawIOBase = f) -> bytes:
                        f.write(b"R\n")
                        return f.readline()

                    t0 = time.perf_counter()
                    line = await asyncio.to_thread(exchange)
                    if i >= 10:  # warm-up
                        lat.append((time.perf_counter() - t0) * 1e3)
                    assert line.startswith(b"R "), line
            finally:
                f.close()
                sock.close()
                stop.set()
                await task
            results[name] = lat
        kemari = statistics.median(results["kemari"] + results["kemari2"])
        remus = statistics.median(results["remus"])
        base = statistics.median(results["base"])
        record_property("rr_latency_ms_p50_base", round(base, 2))
        record_property("rr_latency_ms_p50_kemari", round(kemari, 2))
        record_property("rr_latency_ms_p50_remus25", round(remus, 2))
        print(
            f"\nrequest/response p50: base {base:.2f} ms, kemari {kemari:.2f} ms, "
            f"remus(25 ms) {remus:.2f} ms"
        )
        assert kemari < remus

    run_with_rig(tap_lab, guest_image, run_paths, body)
