"""Shared storage as a real LUN: a storage L1 exports an iSCSI LUN, two host L1s log in.

::

                      -netdev socket,mcast=230.98.<n>.1:<48000+n>,localaddr=127.0.0.1
          (one multicast group on the host's loopback: a hub, every frame to every L1)
        |                              |                               |
    L1 "l1a" 10.98.<n>.1/24        L1 "l1b" 10.98.<n>.2/24        L1 "l1s" 10.98.<n>.10/24
    open-iscsi (iscsiadm, iscsid)  open-iscsi                     LIO (configfs): fileio
    /dev/sdX = the LUN             /dev/sdX = the LUN             LUN 0, one ACL per host,
    sg_persist: key A              sg_persist: key B              SPC-3 reservations

Three L1s on one link: QEMU's ``socket,mcast=`` netdev. Multicast on 127.0.0.1 needs no
root network change on the host (the membership is taken on the loopback address), and
like the pair's UDP link any L1 can be killed and restarted without the others noticing
more than lost frames. The group and port come from the lab's slot, so parallel test
workers never share a segment.

The target is set up through configfs directly (``target_core_file``,
``iscsi_target_mod``): no targetcli, whose Python start-up takes seconds under TCG. The
LUN is a sparse file in the storage L1 (``/srv/klab-lun0.img``), served by fileio, which
emulates SPC-3 persistent reservations in LIO itself. Each host gets an ACL for its own
initiator name (:func:`initiator_iqn`); there is no authentication (a lab segment).

The initiators run ``iscsid`` by hand (the L1s have no systemd), write their own
``InitiatorName`` (the image is shared, so its generated name would be the same on both),
discover, log in, and find the LUN's disk in sysfs (no udev, so no by-path links).

:func:`run_pr_fencing` is the scenario of ``tests/klab/test_iscsi_pr.py``: both hosts
registered, l1a holds the reservation (type 5) and writes; l1b preempts-and-aborts
l1a's key; then l1a's write is refused by the target (RESERVATION CONFLICT), l1b's
succeeds, and l1b reads back what l1a wrote before. The reservation commands are the
engine's own (:class:`~kemari_suite.disk.scsipr.ScsiPr`), run in the L1s through
:class:`GuestSgPersist`. :mod:`.iscsifence` does the same through the engine's shared
backend itself (``disk.fencing = "scsi-pr"``).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.disk.drbdadm import CommandResult
from kemari_suite.disk.scsipr import (
    PrKeys,
    PrReservation,
    ScsiPr,
    ScsiPrError,
    SgPersist,
    format_key,
)
from kemari_suite.errors import ConfigError, DiskError, VMError
from kemari_suite.klab.drbd import Runner
from kemari_suite.klab.host import L1Host, L1Spec
from kemari_suite.klab.image import DEFAULT_PACKAGES, HostImage
from kemari_suite.klab.pair import L1Group

#: The lab image for this scenario: the default packages plus the initiator and
#: sg3-utils (the target is the kernel's LIO, configured through configfs).
ISCSI_PACKAGES: tuple[str, ...] = (*DEFAULT_PACKAGES, "open-iscsi", "sg3-utils")
#: Slot s uses multicast group 230.98.<s>.1, UDP port MCAST_BASE_PORT + s.
MCAST_BASE_PORT = 48000
MAX_SLOT = 199
TARGET_IQN = "iqn.2026-12.org.kemari.klab:lun0"
ISCSI_PORT = 3260
LUN_FILE = "/srv/klab-lun0.img"
CONFIGFS = "/sys/kernel/config"


def initiator_iqn(host: str) -> str:
    """The iSCSI initiator name of lab host ``host`` (pure)."""
    return f"iqn.2026-12.org.kemari.klab:{host}"


def mcast_netdev(slot: int) -> str:
    """The ``-netdev`` options (without id) of slot ``slot``'s shared segment.

    Raises:
        ConfigError: the slot is out of range.
    """
    if not 0 <= slot <= MAX_SLOT:
        raise ConfigError(f"slot {slot} is not in 0..{MAX_SLOT}", key="klab.slot")
    return f"socket,mcast=230.98.{slot}.1:{MCAST_BASE_PORT + slot},localaddr=127.0.0.1"


@dataclass(frozen=True)
class IscsiLabSpec:
    """A storage L1 and two host L1s on one segment."""

    lab_id: str
    slot: int = 0
    hosts: tuple[str, str] = ("l1a", "l1b")
    storage: str = "l1s"
    memory_mib: int = 512
    lun_mib: int = 64
    #: The suite's tree, shared read-only into the two host L1s (virtiofs, share.py),
    #: for :func:`run_backend_fencing`; "": not shared.
    share: str = ""
    #: Give the two host L1s a NIC on QEMU's user network (eth1: the host's witness).
    lan: bool = False
    #: The storage L1's memory (0: ``memory_mib``, as the hosts').
    storage_memory_mib: int = 0

    @property
    def subnet(self) -> str:
        return f"10.98.{self.slot % 256}"

    def address(self, index: int) -> str:
        """Host ``index``'s address (0, 1), or the storage L1's (-1), without prefix."""
        return f"{self.subnet}.{10 if index < 0 else index + 1}"

    @property
    def portal(self) -> str:
        return f"{self.address(-1)}:{ISCSI_PORT}"

    def l1_specs(self) -> tuple[L1Spec, L1Spec, L1Spec]:
        """(storage, host a, host b)."""
        netdev = mcast_netdev(self.slot)

        def one(host: str, index: int) -> L1Spec:
            return L1Spec(
                host=host,
                ip=f"{self.address(index)}/24",
                netdev=netdev,
                mac=f"52:54:00:6d:{self.slot % 256:02x}:{index % 256:02x}",
                memory_mib=(self.storage_memory_mib or self.memory_mib)
                if index < 0
                else self.memory_mib,
                share=self.share if index >= 0 else "",
                lan=self.lan and index >= 0,
            )

        return one(self.storage, -1), one(self.hosts[0], 0), one(self.hosts[1], 1)


class IscsiLab(L1Group):
    """The three L1s of an :class:`IscsiLabSpec`: ``storage``, ``a`` and ``b``."""

    def __init__(
        self,
        spec: IscsiLabSpec,
        image: HostImage,
        *,
        lab_dir: Path,
        run_root: Path,
        shm_dir: Path,
    ) -> None:
        super().__init__(
            spec.lab_id,
            spec.l1_specs(),
            image,
            lab_dir=lab_dir,
            run_root=run_root,
            shm_dir=shm_dir,
        )
        self.spec = spec
        self.storage, self.a, self.b = self.hosts

    @property
    def pair(self) -> IscsiHosts:
        """The two host L1s as a pair (``[0]`` l1a, ``[1]`` l1b): the storage L1 is
        never one of them, so a scenario that kills one of its pair never kills it."""
        return IscsiHosts(self.spec, (self.a, self.b))


@dataclass(frozen=True)
class IscsiHosts:
    """Two host L1s of an :class:`IscsiLab` (a :class:`~.pair.HostPair`): the engine
    replicates between them over the lab's segment, both see the LUN."""

    spec: IscsiLabSpec
    hosts: tuple[L1Host, L1Host]

    def __getitem__(self, index: int) -> L1Host:
        return self.hosts[index]


def target_script(
    *, iqn: str, lun_file: str, lun_mib: int, portal: str, initiators: Sequence[str]
) -> str:
    """The shell script that exports ``lun_file`` as LUN 0 of ``iqn`` on ``portal``
    with one ACL per initiator name, through configfs (pure)."""
    t = f"{CONFIGFS}/target"
    tpg = f"{t}/iscsi/{iqn}/tpgt_1"
    dev = f"{t}/core/fileio_0/lun0"
    lines = [
        "set -e",
        # LIO keeps reservation state (APTPL) under its db_root, /etc/target, falling
        # back to /var/target: without the folder every PR OUT fails "not ready".
        "mkdir -p /etc/target/pr /var/target/pr",
        "modprobe target_core_mod",
        "modprobe target_core_file",
        "modprobe iscsi_target_mod",
        f"mountpoint -q {CONFIGFS} || mount -t configfs configfs {CONFIGFS}",
        f"mkdir -p {shlex.quote(str(Path(lun_file).parent))}",
        f"truncate -s {lun_mib}M {shlex.quote(lun_file)}",
        f"mkdir -p {dev}",
        f"echo fd_dev_name={lun_file},fd_dev_size={lun_mib << 20} > {dev}/control",
        f"echo klab-lun0 > {dev}/wwn/vpd_unit_serial",
        f"echo 1 > {dev}/enable",
        f"mkdir -p {tpg}/lun/lun_0",
        f"ln -s {dev} {tpg}/lun/lun_0/klab_lun0",
        f"mkdir -p {tpg}/np/{portal}",
        f"echo 0 > {tpg}/attrib/authentication",
        f"echo 0 > {tpg}/attrib/generate_node_acls",
    ]
    for name in initiators:
        acl = f"{tpg}/acls/{name}"
        lines += [f"mkdir -p {acl}/lun_0", f"ln -s {tpg}/lun/lun_0 {acl}/lun_0/klab_lun0"]
    lines.append(f"echo 1 > {tpg}/enable")
    return "\n".join(lines) + "\n"


def export_lun(storage: Runner, spec: IscsiLabSpec) -> None:
    """Export the LUN from the storage L1 (see :func:`target_script`).

    Raises:
        AgentError: a step of the script failed (its stderr in the message).
    """
    script = target_script(
        iqn=TARGET_IQN,
        lun_file=LUN_FILE,
        lun_mib=spec.lun_mib,
        portal=spec.portal,
        initiators=[initiator_iqn(h) for h in spec.hosts],
    )
    storage.run("sh -s", stdin=script.encode(), timeout=180)


_FIND_DISK = (
    "for d in /sys/class/iscsi_session/session*/device/target*/*/block/*; do "
    '[ -e "$d" ] && basename "$d"; done; true'
)


def login(host: Runner, name: str, portal: str, *, timeout: float = 180.0) -> str:
    """Start iscsid in ``host``, log in to the lab's target; the LUN's device path.

    Raises:
        AgentError: a command failed.
        DiskError: the LUN's disk did not appear in time.
    """
    host.run(
        "modprobe iscsi_tcp && modprobe sd_mod && modprobe sg && "
        "mkdir -p /etc/iscsi /run/lock/iscsi /var/lib/iscsi && "
        f"echo InitiatorName={initiator_iqn(name)} > /etc/iscsi/initiatorname.iscsi && "
        "(pgrep -x iscsid >/dev/null || "
        "setsid -f iscsid </dev/null >/var/log/iscsid.log 2>&1)",
        timeout=120,
    )
    host.run(
        f"for i in $(seq 30); do iscsiadm -m discovery -t sendtargets -p {portal} && exit 0; "
        "sleep 2; done; exit 1",
        timeout=timeout,
    )
    host.run(f"iscsiadm -m node -T {TARGET_IQN} -p {portal} --login", timeout=timeout)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        disks = host.run(_FIND_DISK, timeout=30).stdout.split()
        if disks:
            return f"/dev/{disks[0]}"
        time.sleep(0.5)
    raise DiskError("iscsi", f"{name}: no disk of {TARGET_IQN} after {timeout:.0f} s")


class GuestSgPersist(SgPersist):
    """``sg_persist`` inside an L1: each command runs through the L1's agent."""

    def __init__(self, runner: Runner, *, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self.runner = runner

    def run(self, device: str, args: Sequence[str]) -> CommandResult:
        """Run ``sg_persist ARGS DEVICE`` in the L1.

        Raises:
            ScsiPrError: non-zero exit (24: reservation conflict; 124: timed out; 255:
                the agent channel failed).
        """
        argv = ("sg_persist", *args, device)
        command = shlex.join(argv)
        t0 = time.monotonic()
        try:
            res = self.runner.run(f"LC_ALL=C {command}", timeout=self.timeout_s, check=False)
        except VMError as err:
            raise ScsiPrError(device, command, 255, f"L1 agent: {err}") from err
        if res.timed_out:
            raise ScsiPrError(device, command, 124, f"timed out after {self.timeout_s} s")
        if res.exit_code != 0:
            raise ScsiPrError(device, command, res.exit_code, res.stderr or res.stdout)
        return CommandResult(argv, 0, res.stdout, res.stderr, time.monotonic() - t0)


@dataclass(frozen=True)
class PrFencingRun:
    """What one run of :func:`run_pr_fencing` measured (host clock) and found."""

    boot_s: tuple[float, float, float]
    devices: tuple[str, str]
    keys: tuple[str, str]
    #: Keys and holder before the preempt, as l1b read them.
    keys_before: tuple[str, ...]
    holder_before: str
    type_before: int | None
    #: l1b's own reserve while l1a held it: refused with this exit code (24 expected).
    b_reserve_rc: int
    data_sha256: str
    preempt_s: float
    keys_after: tuple[str, ...]
    holder_after: str
    #: l1a's O_DIRECT write after the preempt: its exit code and what dd said.
    a_write_rc: int
    a_write_error: str
    #: "reservation conflict" lines in l1a's kernel log after that write.
    a_conflicts_logged: int
    #: l1a may still read (type 5 only fences writes).
    a_read_ok: bool
    #: The engine's write path on l1a (buffered pwrite + fdatasync): where it failed.
    a_buffered_write: str
    b_write_ok: bool
    b_read_sha256: str
    total_s: float
    steps: dict[str, float] = field(default_factory=dict)
    #: sg_persist's raw answers, by name (kept as test fixtures).
    samples: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.holder_before == self.keys[0]
            and self.type_before == 5
            and set(self.keys_before) == set(self.keys)
            and self.b_reserve_rc == 24
            and self.keys_after == (self.keys[1],)
            and self.holder_after == self.keys[1]
            and self.a_write_rc != 0
            and self.a_conflicts_logged > 0
            and self.a_buffered_write != "ok"
            and self.b_write_ok
            and self.b_read_sha256 == self.data_sha256
        )

    def as_dict(self, *, samples: bool = False) -> dict[str, Any]:
        out = {**asdict(self), "ok": self.ok}
        if not samples:
            del out["samples"]
        return out


#: What the shared backend's FileDisk does (buffered pwrite, then fdatasync); prints
#: the step that failed and its errno, or "ok".
BUFFERED_WRITE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
step = "pwrite"
try:
    os.pwrite(fd, os.urandom(65536), 20 << 20)
    step = "fdatasync"
    os.fdatasync(fd)
    print("ok")
except OSError as err:
    print(f"{step}: errno {err.errno} ({err.strerror})")
"""


def _dd_write(dev: str, *, seek_mib: int, mib: int, src: str) -> str:
    return (
        f"dd if={src} of={dev} bs=1M seek={seek_mib} count={mib} "
        "oflag=direct conv=notrunc,fsync status=none"
    )


def _dd_sha(dev: str, *, skip_mib: int, mib: int) -> str:
    return f"dd if={dev} bs=1M skip={skip_mib} count={mib} iflag=direct status=none | sha256sum"


class PrFencingScenario:
    """The steps of :func:`run_pr_fencing`, one method each, on a started lab."""

    def __init__(self, lab: IscsiLab, progress: Callable[[str], None] | None = None) -> None:
        self.lab = lab
        self.steps: dict[str, float] = {}
        self.samples: dict[str, str] = {}
        self._progress = progress
        self.dev: dict[str, str] = {}
        self.pr: dict[str, ScsiPr] = {}

    def step(self, name: str, t0: float) -> float:
        self.steps[name] = round(time.monotonic() - t0, 2)
        if self._progress is not None:
            self._progress(f"{name}: {self.steps[name]:.2f} s")
        return self.steps[name]

    def _sample(self, name: str, host: L1Host, args: str) -> str:
        dev = self.dev[host.spec.host]
        out = host.run(f"LC_ALL=C sg_persist {args} {dev}", check=False)
        self.samples[name] = out.stdout + (f"[stderr]\n{out.stderr}" if out.stderr else "")
        return out.stdout

    def setup(self) -> None:
        """Export the LUN, log both hosts in, make their ScsiPr objects."""
        lab, spec = self.lab, self.lab.spec
        t0 = time.monotonic()
        export_lun(lab.storage, spec)
        self.step("export the LUN (configfs)", t0)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            futs = {
                h.spec.host: pool.submit(login, h, h.spec.host, spec.portal) for h in (lab.a, lab.b)
            }
            for name, fut in futs.items():
                self.dev[name] = fut.result()
        self.step("log in on both hosts", t0)
        for h in (lab.a, lab.b):
            self.pr[h.spec.host] = ScsiPr(
                self.dev[h.spec.host], h.spec.host, tools=GuestSgPersist(h)
            )

    def register_and_reserve(self) -> tuple[PrKeys, PrReservation, int]:
        """Both register; l1a reserves; l1b's own reserve is refused. (keys, res, rc)."""
        a, b = self.lab.a, self.lab.b
        pa, pb = self.pr[a.spec.host], self.pr[b.spec.host]
        t0 = time.monotonic()
        self._sample("read_keys_none", a, "--no-inquiry --in --read-keys")
        self._sample("read_reservation_none", a, "--no-inquiry --in --read-reservation")
        pa.register()
        self._sample("read_keys_one", a, "--no-inquiry --in --read-keys")
        pb.register()
        pa.reserve()
        self.step("register both, l1a reserves", t0)
        rc = 0
        try:
            pb.reserve()
        except ScsiPrError as err:
            rc = err.rc
            self.samples["reserve_conflict_stderr"] = err.stderr
        keys = pb.read_keys()
        res = pb.read_reservation()
        self._sample("read_keys_two", b, "--no-inquiry --in --read-keys")
        self._sample("read_reservation_a", b, "--no-inquiry --in --read-reservation")
        self._sample("read_keys_two_inquiry", b, "--in --read-keys")
        self._sample("read_reservation_a_inquiry", b, "--in --read-reservation")
        return keys, res, rc

    def a_writes(self, mib: int = 4) -> str:
        """l1a writes ``mib`` MiB of random data at 1 MiB (O_DIRECT); its sha256."""
        a = self.lab.a
        dev = self.dev[a.spec.host]
        t0 = time.monotonic()
        a.run(f"head -c {mib}M /dev/urandom > /run/klab-a.bin", timeout=120)
        a.run(_dd_write(dev, seek_mib=1, mib=mib, src="/run/klab-a.bin"), timeout=300)
        sha = a.run("sha256sum /run/klab-a.bin").stdout.split()[0]
        self.step("l1a writes (holder)", t0)
        return sha

    def preempt(self) -> float:
        """l1b takes over as the shared backend's ``promote`` does at failover
        (:meth:`ScsiPr.acquire`: register, read the holder, preempt-and-abort its key,
        check the reservation is ours); the seconds it took."""
        b = self.lab.b
        t0 = time.monotonic()
        self.pr[b.spec.host].acquire()
        took = self.step("l1b preempt-and-abort (ScsiPr.acquire)", t0)
        self._sample("read_keys_b_only", b, "--no-inquiry --in --read-keys")
        self._sample("read_reservation_b", b, "--no-inquiry --in --read-reservation")
        return took

    def a_fenced(self) -> tuple[int, str, int, bool, str]:
        """l1a's writes after the preempt: (dd's exit code, dd's stderr, conflicts
        logged, a read still works, what the engine's buffered pwrite + fdatasync saw)."""
        a = self.lab.a
        dev = self.dev[a.spec.host]
        t0 = time.monotonic()
        before = self._conflicts(a)
        w = a.run(_dd_write(dev, seek_mib=16, mib=1, src="/dev/urandom"), timeout=300, check=False)
        after = self._conflicts(a)
        r = a.run(_dd_sha(dev, skip_mib=1, mib=1), timeout=300, check=False)
        self.step("l1a write refused", t0)
        engine = a.run(f"python3 - {dev}", stdin=BUFFERED_WRITE.encode(), timeout=300, check=False)
        self.samples["a_dd_stderr"] = w.stderr
        self.samples["a_sg_persist_after"] = self._sample_denied(a)
        return w.exit_code, w.stderr.strip(), after - before, r.ok, engine.stdout.strip()

    def _sample_denied(self, a: L1Host) -> str:
        """l1a's own reserve after being preempted (unregistered): its raw answer."""
        dev = self.dev[a.spec.host]
        key = format_key(self.pr[a.spec.host].key)
        args = f"--no-inquiry --out --reserve --param-rk={key} --prout-type=5"
        out = a.run(f"LC_ALL=C sg_persist {args} {dev}", check=False)
        return f"[exit {out.exit_code}]\n{out.stdout}[stderr]\n{out.stderr}"

    @staticmethod
    def _conflicts(h: L1Host) -> int:
        out = h.run("dmesg | grep -c 'reservation conflict' || true").stdout.strip()
        return int(out or 0)

    def b_writes_and_reads(self, mib: int) -> tuple[bool, str]:
        """l1b writes 1 MiB at 16 MiB and reads back l1a's data: (write ok, its sha256)."""
        b = self.lab.b
        dev = self.dev[b.spec.host]
        t0 = time.monotonic()
        w = b.run(_dd_write(dev, seek_mib=16, mib=1, src="/dev/urandom"), timeout=300, check=False)
        sha = b.run(_dd_sha(dev, skip_mib=1, mib=mib), timeout=300).stdout.split()[0]
        self.step("l1b writes, reads l1a's data", t0)
        return w.ok, sha

    def finish(self) -> None:
        """Log out, stop every L1."""
        t0 = time.monotonic()
        for h in (self.lab.a, self.lab.b):
            if h.alive():
                h.run("iscsiadm -m node --logoutall=all", timeout=120, check=False)
        self.lab.stop()
        self.step("log out, stop", t0)


def run_pr_fencing(
    lab: IscsiLab, *, data_mib: int = 4, progress: Callable[[str], None] | None = None
) -> PrFencingRun:
    """Run the fencing scenario on a started ``lab`` (all three agents ready); every L1
    is stopped at the end.

    Raises:
        AgentError: an L1 command failed or an L1 stopped answering.
        ScsiPrError: a reservation command that must succeed failed.
        DiskError: the LUN did not appear on a host.
    """
    t_start = time.monotonic()
    sc = PrFencingScenario(lab, progress)
    sc.setup()
    keys, res, b_rc = sc.register_and_reserve()
    sha = sc.a_writes(data_mib)
    preempt_s = sc.preempt()
    pb = sc.pr[lab.b.spec.host]
    keys_after, res_after = pb.read_keys(), pb.read_reservation()
    a_rc, a_err, a_conflicts, a_read, a_buffered = sc.a_fenced()
    b_ok, b_sha = sc.b_writes_and_reads(data_mib)
    sc.finish()
    pa = sc.pr[lab.a.spec.host]
    return PrFencingRun(
        boot_s=tuple(round(h.boot_s or 0.0, 2) for h in lab.hosts),  # type: ignore[arg-type]
        devices=(sc.dev[lab.a.spec.host], sc.dev[lab.b.spec.host]),
        keys=(format_key(pa.key), format_key(pb.key)),
        keys_before=tuple(format_key(k) for k in keys.keys),
        holder_before=format_key(res.key) if res.key else "",
        type_before=res.type,
        b_reserve_rc=b_rc,
        data_sha256=sha,
        preempt_s=preempt_s,
        keys_after=tuple(format_key(k) for k in keys_after.keys),
        holder_after=format_key(res_after.key) if res_after.key else "",
        a_write_rc=a_rc,
        a_write_error=a_err,
        a_conflicts_logged=a_conflicts,
        a_read_ok=a_read,
        a_buffered_write=a_buffered,
        b_write_ok=b_ok,
        b_read_sha256=b_sha,
        total_s=round(time.monotonic() - t_start, 2),
        steps=sc.steps,
        samples=sc.samples,
    )


__all__ = [
    "ISCSI_PACKAGES",
    "MCAST_BASE_PORT",
    "TARGET_IQN",
    "GuestSgPersist",
    "IscsiHosts",
    "IscsiLab",
    "IscsiLabSpec",
    "PrFencingRun",
    "PrFencingScenario",
    "export_lun",
    "initiator_iqn",
    "login",
    "mcast_netdev",
    "run_pr_fencing",
    "target_script",
]
