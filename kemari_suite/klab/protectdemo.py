"""Kemari protecting an L2 guest across two L1s, through a power loss of the primary L1.

::

    both     the suite's tree mounted (virtiofs, read-only), eth1 up (the witness),
             modprobe kvm_amd (KVM if both have /dev/kvm, else TCG), the guest copied in,
             the role's config, keys, TAP and disk file (engine.py)
    host     kemari witness on 127.0.0.1
    l1b      kemari standby                       l1a  kemari protect: the guest boots
             under -accel kvm and runs guest/workloads/records.c (O_DSYNC records on
             its disk, "W n" -> "OK n" over TCP through the frame proxy and ktap0)
    l1a      a client writes records 0, 1, 2... and logs each acknowledgement: every
             "OK" left the primary only once its epoch was committed on l1b
    host     reads the log, then SIGKILLs l1a's QEMU at once (l1a's engine, its L2,
             its page cache and the client die mid-stream)
    l1b      the standby wins the witness, replays the committed disk writes and
             resumes the guest; a client in l1b asks the same guest "R" (how many
             records are on its disk) and writes one more record
    host     records_lost = acknowledged - found; failover_ms = SIGKILL to that answer

Nothing here reads the guest's disk offline: the resumed guest itself answers, which is
the point of Kemari (its memory, device state and disk are the committed ones). The
power-loss campaign adds the offline check (:meth:`ProtectScenario.offline_check`).

The disk is the built-in replicated one (a file in each L1), DRBD (``drbd_up``), or a
LUN both hosts see (:class:`SharedLun`: the iSCSI lab's, ``klab/iscsidemo.py``), which
the engine's shared backend writes from the primary only and fences with SCSI-3
reservations; the scenario then also asks the LUN whether the old writer is fenced.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError
from kemari_suite.klab.drbd import Runner, peer_lost_by, refused_state_changes
from kemari_suite.klab.drbdfailover import RESOURCE as DRBD_RESOURCE
from kemari_suite.klab.drbdfailover import PowerLossScenario
from kemari_suite.klab.engine import (
    FENCE_PEER,
    FENCE_PEER_LOG,
    GUEST_IP,
    EngineProcess,
    EngineSpec,
    HostWitness,
    Keys,
    check_tree,
    fence_peer_calls,
    l1_trees,
    lan_up,
    prepare_l1,
)
from kemari_suite.klab.l2 import enable_kvm, push_guest
from kemari_suite.klab.pair import HostPair, L1Pair
from kemari_suite.klab.share import mount_command, python_env
from kemari_suite.vm.image import GuestImage

RECORDS_PORT = 7000
ACK_LOG = "/run/klab-acks"
#: Runs in the primary's L1: waits for the guest's records service (it boots under the
#: engine), then writes argv[1] records from argv[3] (default 0) on, appending each
#: acknowledged number to ACK_LOG.
WRITER = f"""
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        s = socket.create_connection(("{GUEST_IP}", {RECORDS_PORT}), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the guest's records service never answered")
        time.sleep(0.5)
s.settimeout(120)
f = s.makefile("rwb", buffering=0)
log = open("{ACK_LOG}", "a", buffering=1)
start = int(sys.argv[3]) if len(sys.argv) > 3 else 0
for n in range(start, start + int(sys.argv[1])):
    f.write(b"W %d\\n" % n)
    line = f.readline().split()
    if line != [b"OK", str(n).encode()]:
        sys.exit(f"bad answer to W {{n}}: {{line}}")
    log.write(f"{{n}}\\n")
"""
#: Runs in the surviving L1: asks the resumed guest "R", then writes the next record.
#: Prints one JSON object: the highest valid record and whether the write was answered.
CHECKER = f"""
import json, socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
t0 = time.monotonic()
while True:
    try:
        s = socket.create_connection(("{GUEST_IP}", {RECORDS_PORT}), timeout=2)
        s.settimeout(10)
        f = s.makefile("rwb", buffering=0)
        f.write(b"R\\n")
        answer = f.readline().split()
        if answer[:1] == [b"R"]:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the guest never answered after the failover")
    time.sleep(0.2)
t_answer = time.monotonic()
last = int(answer[1])
f.write(b"W %d\\n" % (last + 1))
wrote = f.readline().split() == [b"OK", str(last + 1).encode()]
after = time.monotonic() - t_answer
print(json.dumps({{"last": last, "wrote_next": wrote, "after_s": round(after, 3)}}))
"""


@dataclass
class ProtectRun:
    """What one run measured (host clock unless named) and found."""

    accel: str = ""
    disk_backend: str = "builtin"
    tracker: str = ""
    #: With ``tracker_verify``: the primary's count of scans checked against the compare
    #: tracker, pages reported and pages over-reported (a missed page would have
    #: stopped it), read just before the kill.
    tracker_verify: dict[str, int] | None = None
    #: The primary's state and committed epochs just before the kill.
    protected: bool = False
    epochs_committed: int = 0
    checkpoints: int = 0
    records_acked: int = 0
    records_found: int = 0
    wrote_after_resume: bool = False
    resumed: bool = False
    #: DRBD only: the survivor is DRBD Primary after the failover, how many times DRBD
    #: called its fence-peer handler (the engine's ``kemari fence-peer``) there, and
    #: the handler's exit codes (7: the peer is fenced, we hold the lease).
    promoted: bool | None = None
    fence_peer_calls: int | None = None
    fence_peer_exits: list[int] | None = None
    #: How l1b's DRBD lost the killed primary: "network" (DRBD noticed by itself),
    #: "disconnect" (a ``drbdadm disconnect`` there), "" (neither: still connected).
    drbd_peer_lost: str | None = None
    #: The state changes l1b's DRBD refused (its kernel log): a promotion the engine
    #: tried again (the peer lost meanwhile, or still a connected Primary) shows here.
    drbd_refused: list[str] | None = None
    #: Whose L1 lost power: "primary" (l1a: the standby resumes the guest) or
    #: "secondary" (l1b: the primary goes on alone).
    victim: str = "primary"
    #: The surviving copy read offline once its agent and guest were stopped: how many
    #: records 0, 1, ... are valid on it (None: not checked).
    records_offline: int | None = None
    #: A LUN both hosts see (iSCSI): the SCSI-3 reservation read from the standby once
    #: the primary was protected (``keys_before``, ``holder_before``) and from the
    #: survivor after the loss (``keys_after``, ``holder_after``), the survivor's key,
    #: and ``held_by_survivor``: after the loss the survivor's key holds it (the standby
    #: preempted the killed primary's; a killed standby changes nothing).
    reservation: dict[str, Any] | None = None
    #: A LUN, victim "primary": the old primary is fenced: its key is gone and its L1,
    #: restarted and logged in again, has its write refused by the target (details in
    #: ``fence``). None where there is no old primary to fence.
    fenced: bool | None = None
    fence: dict[str, Any] | None = None
    #: SIGKILL of l1a's QEMU to the resumed guest's first answer in l1b (includes the
    #: heartbeat timeout).
    failover_ms: float | None = None
    #: The standby's own figure (its status' failover report).
    engine_failover_ms: float | None = None
    boot_s: dict[str, float] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0

    @property
    def records_lost(self) -> int:
        return max(0, self.records_acked - self.records_found)

    @property
    def ok(self) -> bool:
        return (
            self.resumed
            and self.protected
            and self.records_acked > 0
            and self.records_lost == 0
            and self.wrote_after_resume
            and self.promoted is not False
            and (self.fence_peer_exits is None or 7 in self.fence_peer_exits)
            and (self.tracker_verify is None or self.tracker_verify.get("scans", 0) > 0)
            and (self.records_offline is None or self.records_offline >= self.records_acked)
            and self.fenced is not False
            and (self.reservation is None or self.reservation.get("held_by_survivor") is True)
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "records_lost": self.records_lost, "ok": self.ok}


class SharedLun(Protocol):
    """The guest's disk as one LUN both hosts of the pair see, already set up (exported,
    both hosts logged in): what :class:`ProtectScenario` asks of it."""

    def devices(self) -> tuple[str, str]:
        """The LUN's block device in the primary's L1 and in the standby's."""
        ...

    def reserved(self, run: ProtectRun) -> None:
        """The primary is protected: read the reservation (from the standby) into
        ``run.reservation``."""
        ...

    def after_loss(self, run: ProtectRun) -> None:
        """``run.victim``'s L1 lost power and the survivor serves the guest: read the
        reservation again, and for a killed primary prove it fenced (``run.fenced``,
        ``run.fence``)."""
        ...

    def offline_records(self, limit: int) -> int:
        """The records 0, 1, ... valid on the LUN (at most ``limit``), read where the
        data lives, not through a host (the survivor's agent stopped)."""
        ...


P = TypeVar("P", bound=HostPair)
#: The role each L1 of the pair began in: its config's name and its agent's key.
ROLES = ("primary", "secondary")


def _host_up(host: Runner, tree: str, accel: str) -> bool:
    """The tree mounted, eth1 up, ``kvm_amd`` loaded unless ``accel`` is "tcg"; whether
    the L1 has KVM."""
    host.run(mount_command(tree), timeout=300)
    lan_up(host)
    return enable_kvm(host) if accel != "tcg" else False


class ProtectScenario(Generic[P]):
    """The steps of :func:`run_protect_demo`, one method each (the pair already runs).

    ``pair`` is an :class:`L1Pair` or two hosts of a larger lab (the iSCSI lab's, with
    ``lun``: the guest's disk is that LUN, ``disk_backend="iscsi"``); ``self.pair`` keeps
    its type.
    """

    def __init__(
        self,
        pair: P,
        work: Path,
        host_paths: PathsConfig,
        progress: Callable[[str], None] | None = None,
        run: ProtectRun | None = None,
        lun: SharedLun | None = None,
    ) -> None:
        self.pair, self.work, self.host_paths = pair, Path(work), host_paths
        self.progress = progress
        self.run = run if run is not None else ProtectRun()
        self.lun = lun
        self.spec: EngineSpec | None = None
        self.keys: Keys | None = None
        self.guest: GuestImage | None = None
        #: The DRBD steps on the L1s' data disks (:meth:`drbd_up`).
        self.drbd: PowerLossScenario | None = None
        self.witness: HostWitness | None = None
        self.agents: dict[str, EngineProcess] = {}
        self._t = time.monotonic()

    def note(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def step(self, name: str, detail: str) -> None:
        """Record the time since the last step under ``name``; ``detail`` is shown."""
        now = time.monotonic()
        self.run.steps[name] = round(now - self._t, 2)
        self.note(f"{detail} ({now - self._t:.1f} s)")
        self._t = now

    def drbd_up(self) -> None:
        """DRBD 8.4 on both L1s' data disks, l1a Primary, the initial sync done (the
        steps of the DRBD power-loss scenario); the resource is named after the VM and
        fenced by the engine's ``kemari fence-peer`` (its wrapper is written with each
        L1's config by :meth:`prepare`)."""
        if not isinstance(self.pair, L1Pair):
            raise LabError(self.pair.spec.lab_id, "DRBD runs on an L1Pair's data disks")
        self.drbd = sc = PowerLossScenario(self.pair, self.progress, fence_handler=FENCE_PEER)
        sc.bring_up()
        sc.initial_sync()
        self.run.steps.update({f"drbd {k}": v for k, v in sc.steps.items()})
        self._t = time.monotonic()

    def prepare(
        self,
        guest: GuestImage,
        tree: str,
        *,
        accel: str = "auto",
        disk_backend: str = "builtin",
        tracker_verify: bool = False,
        reprotect: bool = False,
    ) -> EngineSpec:
        """Mount the tree, eth1, KVM, the guest; the configs checked on the host.
        ``reprotect``: the survivor of a failover protects the guest again once the
        other L1 answers as a standby (:meth:`rejoin`).

        Raises:
            LabError: no KVM where ``accel="kvm"`` asks for it; ``disk_backend="iscsi"``
                without a LUN.
        """
        if disk_backend == "iscsi" and self.lun is None:
            raise LabError(self.pair.spec.lab_id, 'disk_backend "iscsi" needs the lab\'s LUN')
        kvm = [_host_up(h, tree, accel) for h in self.pair.hosts]
        chosen = "kvm" if all(kvm) else "tcg"
        if accel == "kvm" and chosen != "kvm":
            raise LabError(self.pair.spec.lab_id, "no /dev/kvm in an L1")
        self.run.accel = chosen
        paths = [push_guest(h, guest) for h in self.pair.hosts]
        spec = EngineSpec(
            lab_id=self.pair.spec.lab_id,
            slot=self.pair.spec.slot,
            tree=tree,
            kernel=paths[0][0],
            initrd=paths[0][1],
            accel=chosen,
            workload=f"records -d /dev/vda -p {RECORDS_PORT}",
            disk_backend=disk_backend,
            # The engine names the DRBD resource after the VM (disk.factory), as the
            # playbooks do: the VM takes the lab resource's name.
            vm_name=DRBD_RESOURCE if disk_backend == "drbd" else "klabvm",
            tracker_verify=tracker_verify,
            lun_devices=self.lun.devices() if self.lun is not None else (),
            reprotect=reprotect,
        )
        self.run.disk_backend = disk_backend
        self.spec = spec
        trees = l1_trees(spec, (self.pair.spec.address(0), self.pair.spec.address(1)))
        self.keys = keys = Keys.new()
        self.guest = guest
        self.work.mkdir(parents=True, exist_ok=True)
        for i, role in enumerate(("primary", "secondary")):
            check_tree(trees[role], self.work / f"{role}.toml")
            prepare_l1(self.pair[i], spec, role, trees[role], keys)
        self.witness = HostWitness(spec, self.work / "witness", self.host_paths)
        self.witness.start(keys)
        self.step("prepare", f"L1s prepared (accel {chosen})")
        return spec

    def rejoin(self, index: int) -> None:
        """L1 ``index``, restarted after its power loss, made ready again as in
        :meth:`prepare` (its root disk is new: the tree, eth1, KVM, the guest, its
        config with the pair's keys)."""
        assert self.spec is not None and self.keys is not None and self.guest is not None
        host, role = self.pair[index], ROLES[index]
        if _host_up(host, self.spec.tree, self.spec.accel) != (self.spec.accel == "kvm"):
            raise LabError(self.pair.spec.lab_id, f"{host.spec.host}: KVM not as before")
        push_guest(host, self.guest)
        trees = l1_trees(self.spec, (self.pair.spec.address(0), self.pair.spec.address(1)))
        prepare_l1(host, self.spec, role, trees[role], self.keys)

    def protect(self, timeout: float = 900.0) -> None:
        """Standby in l1b, protect in l1a, until the primary is protected."""
        assert self.spec is not None
        a, b = self.pair[0], self.pair[1]
        self.agents["secondary"] = sb = EngineProcess(b, self.spec, "secondary")
        sb.start()
        sb.wait_state({"waiting", "receiving", "standby"}, 300, self.note)
        self.step("standby", "kemari standby answers in l1b")
        self.agents["primary"] = pr = EngineProcess(a, self.spec, "primary")
        pr.start()
        st = pr.wait_state({"protected"}, timeout, self.note)
        self.run.protected = True
        self.run.tracker = str(st.get("tracker") or "")
        self.step("protect", f"kemari protect in l1a: protected (tracker {self.run.tracker})")
        if self.lun is not None:
            self.lun.reserved(self.run)
            self.step("reservation", f"the LUN's reservation: {self.run.reservation}")

    def check_fencing(self) -> None:
        """A LUN: after the loss, the reservation, and whether the old primary is fenced
        (:meth:`SharedLun.after_loss`); nothing for the other disks."""
        if self.lun is None:
            return
        self.lun.after_loss(self.run)
        self.step("fencing", f"fenced {self.run.fenced}: {self.run.fence or self.run.reservation}")

    def write_records(
        self, min_acks: int, max_records: int = 100000, *, host: int = 0, start: int = 0
    ) -> None:
        """Write records ``start``, ``start + 1``, ... to the guest from L1 ``host`` (the
        one it runs in) until at least ``min_acks`` are acknowledged in all (counted from
        record 0); ``run.records_acked`` is then the highest acknowledged plus one."""
        a = self.pair[host]
        a.run(f"rm -f {ACK_LOG}; cat > /run/klab-writer.py", stdin=WRITER.encode())
        a.run(
            f"nohup python3 /run/klab-writer.py {max_records} 600 {start} </dev/null "
            ">/run/klab-writer.log 2>&1 &"
        )
        t0 = time.monotonic()
        acked = 0
        while acked < min_acks:
            if time.monotonic() - t0 > 900:
                log = a.run("cat /run/klab-writer.log", check=False).stdout
                raise LabError(self.pair.spec.lab_id, f"{acked} acks after 900 s: {log}")
            time.sleep(2.0)
            lines = a.run(f"tail -n 1 {ACK_LOG} 2>/dev/null || true").stdout.split()
            acked = int(lines[-1]) + 1 if lines else 0
        st = self.agents[ROLES[host]].status()
        self.run.tracker_verify = st.get("tracker_verify")
        self.run.epochs_committed = int(st.get("last_committed_epoch") or 0)
        self.run.checkpoints = int(st.get("checkpoints") or 0)
        # Read once more and kill at once: every record acknowledged up to this read
        # must survive; those acknowledged after it may or may not.
        lines = a.run(f"tail -n 1 {ACK_LOG} 2>/dev/null || true").stdout.split()
        self.run.records_acked = int(lines[-1]) + 1 if lines else acked
        self.step("records", f"{self.run.records_acked} records acknowledged")

    def power_loss(self, timeout: float = 600.0, *, victim: int = 0) -> None:
        """SIGKILL the QEMU of L1 ``victim`` (the guest's: l1a, or l1b after a failover
        and re-protection); wait for the guest to answer from the other L1."""
        a, b = self.pair[victim], self.pair[1 - victim]
        t_kill = time.monotonic()
        a.kill()
        self.agents.pop(ROLES[victim], None)
        b.run("cat > /run/klab-checker.py", stdin=CHECKER.encode())
        r = b.run(f"python3 /run/klab-checker.py {timeout:.0f}", timeout=timeout + 60)
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        # The first answer came ``after_s`` before the checker ended (an upper bound:
        # the agent's return trip is counted in).
        t_answer = time.monotonic() - float(answer["after_s"])
        self.run.failover_ms = round((t_answer - t_kill) * 1e3, 1)
        self.run.records_found = int(answer["last"]) + 1
        self.run.wrote_after_resume = bool(answer["wrote_next"])
        if self.spec is not None and self.spec.disk_backend == "drbd":
            role = b.run("cat /proc/drbd", check=False).stdout
            self.run.promoted = "ro:Primary/" in role
            fence = b.run(f"cat {FENCE_PEER_LOG} 2>/dev/null || true").stdout
            self.run.fence_peer_exits = fence_peer_calls(fence)
            self.run.fence_peer_calls = len(self.run.fence_peer_exits)
            kernel = b.run("dmesg | grep -i drbd", check=False).stdout
            self.run.drbd_peer_lost = peer_lost_by(kernel)
            self.run.drbd_refused = refused_state_changes(kernel)
            self.note(f"fence-peer in {b.spec.host}:\n{fence.rstrip()}")
        # With re-protection the survivor goes on in the primary role, unprotected.
        resumed = {"active", "unprotected", "held", "syncing", "protected"}
        st = self.agents[ROLES[1 - victim]].wait_state(resumed, 300)
        report = st.get("failover") or {}
        if report.get("failover_ms") is not None:
            self.run.engine_failover_ms = round(float(report["failover_ms"]), 1)
        self.run.resumed = True
        self.step(
            "failover",
            f"resumed in {b.spec.host}: {self.run.records_found} records on the guest's disk, "
            f"{self.run.failover_ms:.0f} ms after the kill",
        )

    def standby_loss(self, timeout: float = 600.0) -> None:
        """SIGKILL l1b's QEMU (the standby's host); the primary goes on alone: the guest
        in l1a still has every acknowledged record and takes the next one."""
        a, b = self.pair[0], self.pair[1]
        b.kill()
        self.agents.pop("secondary", None)
        st = self.agents["primary"].wait_state({"unprotected", "held"}, timeout, self.note)
        a.run("cat > /run/klab-checker.py", stdin=CHECKER.encode())
        r = a.run(f"python3 /run/klab-checker.py {timeout:.0f}", timeout=timeout + 60)
        answer = json.loads(r.stdout.strip().splitlines()[-1])
        self.run.records_found = int(answer["last"]) + 1
        self.run.wrote_after_resume = bool(answer["wrote_next"])
        # The guest never stopped: "resumed" is "still served".
        self.run.resumed = True
        self.step("standby lost", f"primary {st.get('state')}: {self.run.records_found} records")

    def offline_check(self, survivor: int) -> None:
        """Stop the survivor's agent (and with it its guest), then read the surviving
        copy of the guest's disk in its L1: the records valid from the start."""
        assert self.spec is not None
        host = self.pair[survivor]
        role = "primary" if survivor == 0 else "secondary"
        agent = self.agents.pop(role, None)
        if agent is not None:
            agent.stop()
        limit = self.run.records_found + 16
        if self.lun is not None:
            self.run.records_offline = self.lun.offline_records(limit)
            self.step("offline check", f"{self.run.records_offline} valid records on the LUN")
            return
        if self.spec.disk_backend == "drbd":
            path = self.spec.disk_device
        else:
            path = f"{self.spec.dir}/disk-{role}.img"
        script = (
            "import sys; from pathlib import Path; "
            "from kemari_suite.klab.kvmrecords import valid_records; "
            "print(valid_records(Path(sys.argv[1]), int(sys.argv[2])))"
        )
        cmd = f"cd / && env {python_env(self.spec.tree)} python3 -c {shlex.quote(script)}"
        r = host.run(f"{cmd} {shlex.quote(path)} {limit}", timeout=300)
        self.run.records_offline = int(r.stdout.split()[-1])
        self.step("offline check", f"{self.run.records_offline} valid records on {path}")

    def report_logs(self) -> None:
        """Send the tails of the agents' output in the L1s still up to ``progress``
        (with DRBD, also the survivor's DRBD kernel messages and fence-peer log)."""
        for role, agent in self.agents.items():
            try:
                self.note(f"--- {role} output\n{agent.output()}")
                self.note(f"--- {role} events\n{agent.events()}")
            except Exception:  # a report on a failure must not hide the failure
                pass
        if self.spec is not None and self.spec.disk_backend == "drbd":
            try:
                cmd = f"dmesg | grep -i drbd | tail -n 40; cat {FENCE_PEER_LOG} 2>/dev/null"
                self.note(f"--- l1b drbd\n{self.pair[1].run(cmd, check=False).stdout}")
            except Exception:  # as above
                pass

    def close(self) -> None:
        """Stop the agents still running (by PID) and the witness."""
        for agent in list(self.agents.values()):
            try:
                agent.stop()
            except Exception:  # the L1 may be gone already; the pair stops it anyway
                pass
        self.agents.clear()
        if self.witness is not None:
            self.witness.stop()


def run_protect_demo(
    pair: HostPair,
    guest: GuestImage,
    *,
    tree: str,
    work: Path,
    host_paths: PathsConfig,
    accel: str = "auto",
    disk_backend: str = "builtin",
    min_acks: int = 30,
    tracker_verify: bool = False,
    victim: str = "primary",
    offline_check: bool = False,
    progress: Callable[[str], None] | None = None,
    run: ProtectRun | None = None,
    lun: SharedLun | None = None,
) -> ProtectRun:
    """Run the scenario on a started pair (built with ``share=tree`` and ``lan=True``;
    with ``disk_backend="drbd"`` also with a data disk, DRBD's backing device; with
    ``disk_backend="iscsi"`` two hosts that see ``lun``, see ``klab/iscsidemo.py``).

    ``victim`` "secondary" kills the standby's L1 instead (the primary goes on alone);
    ``offline_check`` then stops the survivor and reads its copy of the disk. ``run``
    (optional) is filled in as the steps go, so that a caller keeps what was measured
    when a step raises (``records_acked > 0``: the kill came).

    The agents and the witness are stopped at the end; the L1s are the caller's.

    Raises:
        LabError: an agent exited, a state or an answer did not come in time.
        AgentError, VMError: an L1 did not answer.
        ConfigError: the suite refused a rendered config.
    """
    t0 = time.monotonic()
    sc = ProtectScenario(pair, work, host_paths, progress, run, lun=lun)
    sc.run.boot_s = {h.spec.host: round(h.boot_s or 0.0, 2) for h in pair.hosts}
    try:
        if disk_backend == "drbd":
            sc.drbd_up()
        sc.prepare(
            guest, tree, accel=accel, disk_backend=disk_backend, tracker_verify=tracker_verify
        )
        sc.protect()
        sc.write_records(min_acks)
        sc.run.victim = victim
        if victim == "secondary":
            sc.standby_loss()
        else:
            sc.power_loss()
        sc.check_fencing()
        if offline_check:
            sc.offline_check(0 if victim == "secondary" else 1)
    except Exception:
        sc.report_logs()
        raise
    finally:
        sc.close()
    sc.run.total_s = round(time.monotonic() - t0, 2)
    return sc.run


__all__ = ["ProtectRun", "ProtectScenario", "SharedLun", "run_protect_demo"]
