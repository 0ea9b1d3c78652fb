"""The DRBD power-loss scenario, on two L1 hosts: the first real run of the DRBD backend.

::

    both     modprobe drbd; write the resource file (the project's renderer, 8.4 dialect);
             drbdadm create-md --force; drbdadm up
    l1a      drbdadm primary --force         initial sync to l1b, protocol C
    l1a      mkfs.ext4 /dev/drbd0; mount; write data + fsynced records; sha256
    host     SIGKILL l1a's QEMU              power loss: l1a's page cache dies with it
    l1b      /proc/drbd leaves Connected     the peer noticed
    l1b      drbdadm primary                 fencing resource-and-stonith: the fence-peer
                                             handler runs (and says "peer fenced")
    l1b      mount (journal replay); check data and every record
    l1a      start again from its own disk; drbdadm up: Secondary, resynced (its
             activity log marks every extent hot at the crash: here the whole device)
    l1a      drbdadm disconnect; l1b writes new data; drbdadm connect: DRBD resyncs
             only what its bitmap marked meanwhile (about the new data, not the device)
    both     umount; drbdadm down; stop
    host     e2fsck -fn and debugfs on both backing files (offline check: both hold
             the data written before the kill and after the failover)

Each step's time is measured on the host's clock and returned in :class:`PowerLossRun`.
Nothing here prints: ``progress`` gets one line per step.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.disk.drbdconf import DrbdConfig, DrbdNode
from kemari_suite.errors import DrbdError
from kemari_suite.klab.drbd import DrbdMinor, L1DrbdResource, load_module, proc_drbd, wait_drbd
from kemari_suite.klab.guestfiles import FENCE_HANDLER, FENCE_LOG
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.pair import L1Pair
from kemari_suite.vm.buildkit import need_tool
from kemari_suite.vm.debiancheck import read_file

RESOURCE = "r0"
MOUNT = "/mnt/r0"
DATA_FILE = "data.bin"
RECORDS_FILE = "records"
AFTER_FILE = "after.bin"
#: Appends N fsynced records "seq sha" to the records file; prints the last one written.
RECORD_WRITER = """
import hashlib, os, sys
n, path = int(sys.argv[1]), sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for i in range(1, n + 1):
    os.write(fd, f"{i} {hashlib.sha256(str(i).encode()).hexdigest()}\\n".encode())
    os.fsync(fd)
print(n)
"""


@dataclass(frozen=True)
class PowerLossRun:
    """What one run measured (seconds on the host's clock) and found."""

    module_version: str
    boot_s: tuple[float, float]
    initial_sync_s: float
    sync_kib: int
    peer_noticed_s: float
    promote_s: float
    fence_peer_calls: int
    data_sha256: str
    data_intact: bool
    records_acked: int
    records_found: int
    offline_fsck_clean: bool
    offline_data_intact: bool
    #: KiB resynced when the killed primary came back (DRBD's "will sync N KB"); -1: not run.
    crash_resync_kib: int
    #: KiB resynced after a clean cut of the link while the Primary wrote; -1: not run.
    resync_kib: int
    total_s: float
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.data_intact
            and self.records_found >= self.records_acked
            and self.fence_peer_calls >= 1
            and self.offline_fsck_clean
            and self.offline_data_intact
            and 0 < self.resync_kib < self.sync_kib
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def resource_config(pair: L1Pair, fence_handler: str = FENCE_HANDLER) -> DrbdConfig:
    """The resource both hosts of ``pair`` run: their data disks, fenced by
    ``fence_handler`` (by default the lab's, which says "peer fenced"; the engine's demo
    names a wrapper of ``kemari fence-peer``), called with the resource's name."""
    spec = pair.spec
    return DrbdConfig(
        resource=RESOURCE,
        nodes=tuple(
            DrbdNode(name=h.spec.host, address=spec.address(i), node_id=i)
            for i, h in enumerate(pair.hosts)
        ),
        disk="/dev/vda",
        fence_peer_handler=f"{fence_handler} {{resource}}",
    )


def offline_check(image: Path, expect: Mapping[str, str]) -> tuple[bool, bool]:
    """``e2fsck -fn`` of a DRBD backing file (internal meta-data sits after the
    filesystem) and each file of ``expect`` (name -> sha256) read back with debugfs:
    (fsck clean, every file intact). Raises SetupError or ImageError (debugfs)."""
    e2fsck = need_tool("e2fsck", "e2fsprogs")
    done = subprocess.run(
        [e2fsck, "-fn", str(image)], capture_output=True, check=False, timeout=300
    )
    intact = True
    for name, sha in expect.items():
        data = read_file(image, f"/{name}")
        intact = intact and data is not None and hashlib.sha256(data).hexdigest() == sha
    return done.returncode == 0, intact


class PowerLossScenario:
    """The steps of :func:`run_power_loss`, one method each, on a started pair."""

    def __init__(
        self,
        pair: L1Pair,
        progress: Callable[[str], None] | None = None,
        *,
        fence_handler: str = FENCE_HANDLER,
    ) -> None:
        self.pair = pair
        self.a, self.b = pair[0], pair[1]
        self.cfg = resource_config(pair, fence_handler)
        self.res = {h.spec.host: L1DrbdResource(self.cfg, h.spec.host, h) for h in pair.hosts}
        self.steps: dict[str, float] = {}
        self._progress = progress

    def step(self, name: str, t0: float) -> float:
        """Record the seconds since ``t0`` as step ``name``; those seconds."""
        self.steps[name] = round(time.monotonic() - t0, 2)
        if self._progress is not None:
            self._progress(f"{name}: {self.steps[name]:.2f} s")
        return self.steps[name]

    def bring_up(self) -> str:
        """modprobe, resource file, create-md, up on both; the module's version."""
        t0 = time.monotonic()
        version = load_module(self.a)
        load_module(self.b)
        for r in self.res.values():
            r.write_config()
            r.create_md(force=True)
            r.up()
        self.step("modprobe, create-md, up", t0)
        t0 = time.monotonic()
        wait_drbd(self.a, 0, lambda m: m.connected, "Connected", timeout=120)
        self.step("connected", t0)
        return version

    def initial_sync(self) -> DrbdMinor:
        """Make the first host Primary and wait for the full sync; the state it began in."""
        t0 = time.monotonic()
        self.res[self.a.spec.host].primary(force=True)
        first = proc_drbd(self.a).minors[0]
        if first.peer_disk not in ("Inconsistent", "UpToDate"):
            raise DrbdError(RESOURCE, "drbdadm primary --force", 0, f"odd first state {first}")
        wait_drbd(self.a, 0, lambda m: m.in_sync, "in sync", timeout=600, interval=0.5)
        self.step("initial sync", t0)
        return first

    def write(self, data_mib: int, records: int) -> tuple[str, int]:
        """A filesystem, random data and fsynced records on the primary: (sha256, acked)."""
        a = self.a
        t0 = time.monotonic()
        a.run(
            f"mkfs.ext4 -q /dev/drbd0 && mkdir -p {MOUNT} && mount /dev/drbd0 {MOUNT}", timeout=300
        )
        a.run(f"head -c {data_mib}M /dev/urandom > {MOUNT}/{DATA_FILE} && sync", timeout=300)
        sha = a.run(f"sha256sum {MOUNT}/{DATA_FILE}").stdout.split()[0]
        script = RECORD_WRITER.encode()
        out = a.run(f"python3 - {records} {MOUNT}/{RECORDS_FILE}", stdin=script, timeout=600)
        self.step("write data and fsynced records", t0)
        return sha, int(out.stdout.strip())

    def power_loss(self) -> tuple[float, float, int]:
        """SIGKILL the primary, promote the survivor: (noticed s, promote s, fence calls)."""
        t_kill = time.monotonic()
        self.a.kill()
        self.step("SIGKILL primary", t_kill)
        wait_drbd(self.b, 0, lambda m: not m.connected, "disconnected", timeout=180)
        noticed = self.step("peer noticed", t_kill)
        t0 = time.monotonic()
        self.res[self.b.spec.host].primary()
        promote = self.step("drbdadm primary", t0)
        fence = self.b.run(f"cat {FENCE_LOG} 2>/dev/null || true").stdout
        return noticed, promote, sum(1 for ln in fence.splitlines() if "fence-peer" in ln)

    def check_survivor(self) -> tuple[str, int]:
        """Mount on the survivor (journal replay): (data sha256, records intact in order)."""
        b = self.b
        t0 = time.monotonic()
        b.run(f"mkdir -p {MOUNT} && mount /dev/drbd0 {MOUNT}", timeout=300)
        sha = b.run(f"sha256sum {MOUNT}/{DATA_FILE}").stdout.split()[0]
        found = 0
        for i, line in enumerate(b.run(f"cat {MOUNT}/{RECORDS_FILE}").stdout.splitlines(), 1):
            if line != f"{i} {hashlib.sha256(str(i).encode()).hexdigest()}":
                break
            found = i
        self.step("mount and check on the survivor", t0)
        return sha, found

    def _last_resync_kib(self, host: L1Host) -> int:
        """KiB of the last resync ``host``'s DRBD began ("will sync N KB"); -1 if none."""
        words = host.run("dmesg | grep -o 'will sync [0-9]* KB' || true").stdout.split()
        return int(words[-2]) if len(words) >= 2 else -1

    def reprotect(self) -> int:
        """The old primary back from its own disk as Secondary; the KiB resynced.

        A crashed primary's ``drbdadm up`` applies its activity log to its bitmap
        (``drbdmeta apply-al``): every 4 MiB extent hot at the crash is resynced, which
        on a small device that mkfs just wrote all over is the whole device.
        """
        a, b = self.a, self.b
        t0 = time.monotonic()
        a.start(fresh_data=False)
        a.wait_ready()
        self.step("old primary restarted", t0)
        t0 = time.monotonic()
        load_module(a)
        self.res[a.spec.host].write_config()
        self.res[a.spec.host].up()
        wait_drbd(b, 0, lambda m: m.in_sync, "in sync again", timeout=600, interval=0.5)
        self.step("reconnect and resync", t0)
        state = proc_drbd(a).minors[0]
        if (state.role, state.peer_role) != ("Secondary", "Primary"):
            raise DrbdError(RESOURCE, "drbdadm up", 0, f"old primary came back as {state}")
        return self._last_resync_kib(b)

    def cut_and_resync(self, after_mib: int = 4) -> tuple[str, int]:
        """Disconnect the Secondary, write on the Primary, reconnect: DRBD resyncs only
        what its bitmap marked meanwhile. (sha256 of the new data, KiB resynced.)"""
        a, b = self.a, self.b
        t0 = time.monotonic()
        self.res[a.spec.host].disconnect()
        wait_drbd(b, 0, lambda m: not m.connected, "disconnected", timeout=120)
        b.run(f"head -c {after_mib}M /dev/urandom > {MOUNT}/{AFTER_FILE} && sync", timeout=300)
        sha = b.run(f"sha256sum {MOUNT}/{AFTER_FILE}").stdout.split()[0]
        self.res[a.spec.host].connect()
        wait_drbd(b, 0, lambda m: m.in_sync, "in sync after the cut", timeout=600, interval=0.5)
        self.step("cut, write, reconnect, bitmap resync", t0)
        return sha, self._last_resync_kib(b)

    def finish(self) -> None:
        """Unmount on the survivor, ``drbdadm down`` and stop every L1 still running."""
        t0 = time.monotonic()
        self.b.run(f"umount {MOUNT}", timeout=300)
        for h in self.pair.hosts:
            if h.alive():
                self.res[h.spec.host].down()
                h.stop()
        self.step("umount, down, stop", t0)


def run_power_loss(
    pair: L1Pair,
    *,
    data_mib: int = 8,
    records: int = 200,
    reprotect: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PowerLossRun:
    """Run the scenario on a started ``pair`` (both agents ready, data disks attached).

    With ``reprotect`` the killed host is started again from its own disk and resynced
    as Secondary before the end. Every L1 is stopped at the end.

    Raises:
        DrbdError: a drbd-utils command failed or DRBD did not reach a state in time.
        AgentError: an L1 stopped answering.
    """
    t_start = time.monotonic()
    sc = PowerLossScenario(pair, progress)
    version = sc.bring_up()
    first = sc.initial_sync()
    sha, acked = sc.write(data_mib, records)
    noticed, promote, fence_calls = sc.power_loss()
    sha_b, found = sc.check_survivor()
    crash_resync_kib = sc.reprotect() if reprotect else -1
    after_sha, resync_kib = sc.cut_and_resync() if reprotect else ("", -1)
    sc.finish()
    t0 = time.monotonic()
    expect = {DATA_FILE: sha, **({AFTER_FILE: after_sha} if reprotect else {})}
    checks = {h.spec.host: offline_check(h.data_disk, expect) for h in pair.hosts}
    if not reprotect:
        del checks[pair[0].spec.host]  # never resynced: not expected to hold the new data
    sc.step("offline check", t0)
    return PowerLossRun(
        module_version=version,
        boot_s=(round(pair[0].boot_s or 0.0, 2), round(pair[1].boot_s or 0.0, 2)),
        initial_sync_s=sc.steps["initial sync"],
        sync_kib=first.oos_kib or 0,
        peer_noticed_s=noticed,
        promote_s=promote,
        fence_peer_calls=fence_calls,
        data_sha256=sha,
        data_intact=sha_b == sha,
        records_acked=acked,
        records_found=found,
        offline_fsck_clean=all(fsck for fsck, _ in checks.values()),
        offline_data_intact=all(intact for _, intact in checks.values()),
        crash_resync_kib=crash_resync_kib,
        resync_kib=resync_kib,
        total_s=round(time.monotonic() - t_start, 2),
        steps=sc.steps,
    )


__all__ = [
    "RESOURCE",
    "PowerLossRun",
    "PowerLossScenario",
    "offline_check",
    "resource_config",
    "run_power_loss",
]
