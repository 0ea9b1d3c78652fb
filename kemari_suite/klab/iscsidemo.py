"""Kemari protecting a guest whose disk is a real iSCSI LUN, through a power loss.

::

    l1s      exports the LUN (LIO, configfs; :func:`~.iscsi.export_lun`)
    l1a, l1b log in (open-iscsi): both see the LUN (/dev/sdX)
             the protect demo (:mod:`.protectdemo`) with ``disk_backend="iscsi"``: the
             engine's shared backend on the LUN, ``fencing = "scsi-pr"``, the witness as
             tiebreaker (no lease). The primary registers its key and reserves the LUN
             ("write exclusive, registrants only") when it opens the guest's disk; the
             standby keeps only the committed I/O logs (it never writes the LUN while it
             is a standby: the engine opens no copy for a disk that ``replays_log``).
    l1b      reads the reservation: l1a's key alone, holding it. The standby is not
             registered (it registers when it takes over), so under type 5 the target
             itself would refuse a write from it.
    host     SIGKILLs l1a's QEMU (or l1b's: the primary goes on alone)
    l1b      wins the witness, replays the committed logs onto the LUN after its promote
             preempted-and-aborted l1a's key, resumes the guest: the records are there
    l1b      reads the reservation: l1b's key alone, holding it
    host     restarts l1a's L1 (the old primary back from its power loss), logs it in
             again with its own initiator name (the one its key was registered for):
             its O_DIRECT write is refused (RESERVATION CONFLICT in its kernel log), and
             so is a reservation with its old key (sg_persist exit 24: not registered)
    l1s      (``offline_check``) with the survivor's agent stopped, the LUN's backing
             file read where it lives: every acknowledged record is there

Why restart the old primary rather than write from it: its L1 lost power, so it cannot
write any more; "fenced" means that when it comes back, with whatever it still believes,
the target refuses it. The reservation read from the survivor shows the same from the
other side (its key is gone), and the refused write shows the target enforces it. The
write goes to the LUN's reserved first MiB (the shared backend's head, no guest data),
so that even a wrongly accepted write could not harm the guest.
"""

from __future__ import annotations

import base64
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.disk.scsipr import (
    SG_RESERVATION_CONFLICT,
    PrKeys,
    PrReservation,
    ScsiPr,
    format_key,
    host_key,
)
from kemari_suite.disk.shared import SHARED_RESERVED_BYTES
from kemari_suite.errors import LabError
from kemari_suite.klab.host import L1Host
from kemari_suite.klab.iscsi import (
    LUN_FILE,
    GuestSgPersist,
    IscsiLab,
    PrFencingScenario,
    login,
)
from kemari_suite.klab.kvmrecords import RECORD_SIZE, record_valid
from kemari_suite.klab.l2 import NESTED_PACKAGES, NESTED_SIZE_MIB
from kemari_suite.klab.protectdemo import ProtectRun, run_protect_demo
from kemari_suite.vm.image import GuestImage

#: The image of this demo: the nested image (QEMU for the L2 guest) plus the initiator
#: and sg3-utils (the target is the kernel's LIO): one image for all three L1s.
ISCSI_NESTED_PACKAGES: tuple[str, ...] = (*NESTED_PACKAGES, "open-iscsi", "sg3-utils")
ISCSI_NESTED_SIZE_MIB = NESTED_SIZE_MIB
#: The L1s' memory: the hosts run the engine and the L2 guest, the storage L1 only LIO.
HOST_MEMORY_MIB = 1024
STORAGE_MEMORY_MIB = 512
#: Where the restarted old primary tries to write: inside the shared backend's reserved
#: head (the guest's disk starts at SHARED_RESERVED_BYTES), 64 KiB.
PROBE_OFFSET = 512 << 10
PROBE_BYTES = 64 << 10
#: Records read from the storage L1 per agent call (base64: about 1.4 MB of output).
CHUNK_RECORDS = 256


@dataclass(frozen=True)
class FenceCheck:
    """What the old primary's L1, restarted after the failover, found on the LUN."""

    #: The old primary's key (it held the reservation before the kill).
    old_key: str
    #: The reservation as the survivor read it after the failover.
    keys_after: tuple[str, ...]
    holder_after: str
    #: Boot and login of the restarted L1 (seconds, host clock).
    restart_s: float
    device: str
    #: Its O_DIRECT write into the reserved head: dd's exit code and message.
    write_rc: int
    write_error: str
    #: "reservation conflict" lines its kernel logged during that write.
    conflicts_logged: int
    #: sg_persist --reserve with the old key: 24 (RESERVATION CONFLICT) when the key is
    #: not registered any more.
    old_key_reserve_rc: int

    @property
    def fenced(self) -> bool:
        """The old key is gone, another key holds the reservation, and the target
        refused the old primary's write and its reservation with the old key."""
        return (
            bool(self.old_key)
            and self.old_key not in self.keys_after
            and self.holder_after not in ("", self.old_key)
            and self.write_rc != 0
            and self.conflicts_logged > 0
            and self.old_key_reserve_rc == SG_RESERVATION_CONFLICT
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fenced": self.fenced}


def reservation_after(
    before: dict[str, Any], keys: PrKeys, res: PrReservation, survivor_key: int
) -> dict[str, Any]:
    """``before`` (:meth:`IscsiLun.reserved`'s) with the reservation read after the loss,
    the survivor's key and whether that key holds the reservation (pure)."""
    holder = format_key(res.key) if res.key else ""
    return {
        **before,
        "keys_after": [format_key(k) for k in keys.keys],
        "holder_after": holder,
        "type_after": res.type,
        "survivor_key": format_key(survivor_key),
        "held_by_survivor": holder == format_key(survivor_key),
    }


def count_valid(read: Callable[[int, int], bytes], limit: int, chunk: int = CHUNK_RECORDS) -> int:
    """How many records 0, 1, ... are valid (at most ``limit``), reading ``chunk``
    records at a time with ``read(first, count)`` (bytes; shorter at the end of the
    disk) (pure)."""
    count = 0
    while count < limit:
        n = min(chunk, limit - count)
        data = read(count, n)
        for i in range(n):
            rec = data[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]
            if not record_valid(rec, count):
                return count
            count += 1
    return count


def _dd_probe(dev: str) -> str:
    """The old primary's write: O_DIRECT, into the reserved head."""
    bs = 4096
    return (
        f"dd if=/dev/urandom of={shlex.quote(dev)} bs={bs} seek={PROBE_OFFSET // bs} "
        f"count={PROBE_BYTES // bs} oflag=direct conv=notrunc,fsync status=none"
    )


def _conflicts(h: L1Host) -> int:
    out = h.run("dmesg | grep -c 'reservation conflict' || true").stdout.strip()
    return int(out or 0)


class IscsiLun:
    """The iSCSI lab's LUN as the protect demo's disk (a :class:`~.protectdemo.SharedLun`)."""

    def __init__(self, lab: IscsiLab, progress: Callable[[str], None] | None = None) -> None:
        self.lab = lab
        self.progress = progress
        self.dev: dict[str, str] = {}
        self.steps: dict[str, float] = {}

    def setup(self) -> None:
        """Export the LUN from the storage L1 and log both hosts in (their devices).

        Raises:
            AgentError: a command failed in an L1.
            DiskError: the LUN did not appear on a host.
        """
        sc = PrFencingScenario(self.lab, self.progress)
        sc.setup()
        self.dev = dict(sc.dev)
        self.steps.update({f"iscsi {k}": v for k, v in sc.steps.items()})

    def devices(self) -> tuple[str, str]:
        a, b = self.lab.a.spec.host, self.lab.b.spec.host
        if a not in self.dev or b not in self.dev:
            raise LabError(self.lab.spec.lab_id, "the LUN is not set up (IscsiLun.setup)")
        return self.dev[a], self.dev[b]

    def _pr(self, h: L1Host) -> ScsiPr:
        """``h``'s view of the reservation (its key: the engine's, from the host name)."""
        return ScsiPr(self.dev[h.spec.host], h.spec.host, tools=GuestSgPersist(h))

    def reserved(self, run: ProtectRun) -> None:
        """The reservation as the standby (l1b) sees it while the primary runs."""
        pr = self._pr(self.lab.b)
        keys, res = pr.read_keys(), pr.read_reservation()
        run.reservation = {
            "keys_before": [format_key(k) for k in keys.keys],
            "holder_before": format_key(res.key) if res.key else "",
            "type_before": res.type,
            "primary_key": format_key(host_key(self.lab.a.spec.host)),
        }

    def after_loss(self, run: ProtectRun) -> None:
        """The reservation read from the survivor; a killed primary is checked fenced
        (:meth:`fence_old_primary`).

        Raises:
            AgentError, VMError: an L1 did not answer, or the old primary's did not boot.
            ScsiPrError: the survivor could not read the reservation.
            DiskError: the LUN did not appear on the restarted L1.
        """
        survivor = self.lab.b if run.victim == "primary" else self.lab.a
        pr = self._pr(survivor)
        keys, res = pr.read_keys(), pr.read_reservation()
        before = run.reservation or {}
        run.reservation = reservation_after(before, keys, res, host_key(survivor.spec.host))
        if run.victim != "primary":
            return
        check = self.fence_old_primary(
            str(before.get("holder_before") or ""),
            tuple(run.reservation["keys_after"]),
            run.reservation["holder_after"],
        )
        run.fence = check.as_dict()
        run.fenced = check.fenced

    def fence_old_primary(
        self, old_key: str, keys_after: tuple[str, ...], holder_after: str
    ) -> FenceCheck:
        """Restart l1a's L1 (it lost power), log it in again, and try to write to the LUN
        and to reserve it with its old key; see the module docstring.

        Raises:
            VMError: the L1 did not start or its agent did not answer.
            AgentError: a command failed.
            DiskError: the LUN did not appear.
        """
        a = self.lab.a
        t0 = time.monotonic()
        a.start()
        a.wait_ready()
        dev = login(a, a.spec.host, self.lab.spec.portal)
        restart_s = round(time.monotonic() - t0, 2)
        before = _conflicts(a)
        w = a.run(_dd_probe(dev), timeout=300, check=False)
        logged = _conflicts(a) - before
        args = (
            f"--no-inquiry --out --reserve --param-rk={shlex.quote(old_key or '0x0')} "
            "--prout-type=5"
        )
        r = a.run(f"LC_ALL=C sg_persist {args} {shlex.quote(dev)}", timeout=120, check=False)
        self.steps["iscsi restart the old primary, log in"] = restart_s
        return FenceCheck(
            old_key=old_key,
            keys_after=keys_after,
            holder_after=holder_after,
            restart_s=restart_s,
            device=dev,
            write_rc=w.exit_code,
            write_error=(w.stderr or w.stdout).strip()[-300:],
            conflicts_logged=logged,
            old_key_reserve_rc=r.exit_code,
        )

    def offline_records(self, limit: int) -> int:
        """The records valid on the LUN's backing file in the storage L1 (the guest's
        disk starts at the backend's reserved head), at most ``limit``.

        Raises:
            AgentError: the read failed.
        """
        storage = self.lab.storage
        head = SHARED_RESERVED_BYTES // RECORD_SIZE

        def read(first: int, count: int) -> bytes:
            r = storage.run(
                f"dd if={LUN_FILE} bs={RECORD_SIZE} skip={head + first} count={count} "
                "status=none | base64 -w0",
                timeout=300,
            )
            return base64.b64decode(r.stdout)

        return count_valid(read, limit)


def run_iscsi_protect_demo(
    lab: IscsiLab,
    guest: GuestImage,
    *,
    tree: str,
    work: Path,
    host_paths: PathsConfig,
    accel: str = "auto",
    min_acks: int = 30,
    tracker_verify: bool = False,
    victim: str = "primary",
    offline_check: bool = False,
    progress: Callable[[str], None] | None = None,
    run: ProtectRun | None = None,
) -> ProtectRun:
    """The protect demo on a started iSCSI lab (built with ``share=tree``, ``lan=True``
    and :data:`ISCSI_NESTED_PACKAGES`): the LUN exported and logged into, then
    :func:`~.protectdemo.run_protect_demo` with ``disk_backend="iscsi"`` on its two hosts
    (the storage L1 is never the victim). The L1s are the caller's.

    Raises:
        as :func:`~.protectdemo.run_protect_demo`; also DiskError: the LUN did not appear.
    """
    run = run if run is not None else ProtectRun()
    run.disk_backend = "iscsi"
    lun = IscsiLun(lab, progress)
    lun.setup()
    try:
        return run_protect_demo(
            lab.pair,
            guest,
            tree=tree,
            work=work,
            host_paths=host_paths,
            accel=accel,
            disk_backend="iscsi",
            min_acks=min_acks,
            tracker_verify=tracker_verify,
            victim=victim,
            offline_check=offline_check,
            progress=progress,
            run=run,
            lun=lun,
        )
    finally:
        run.steps.update(lun.steps)
        run.boot_s[lab.storage.spec.host] = round(lab.storage.boot_s or 0.0, 2)


__all__ = [
    "HOST_MEMORY_MIB",
    "ISCSI_NESTED_PACKAGES",
    "ISCSI_NESTED_SIZE_MIB",
    "STORAGE_MEMORY_MIB",
    "FenceCheck",
    "IscsiLun",
    "count_valid",
    "reservation_after",
    "run_iscsi_protect_demo",
]
