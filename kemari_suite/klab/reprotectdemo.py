"""A power loss, re-protection onto the repaired host, and a second power loss the other
way: the whole cycle an operator goes through when a host dies, under Kemari's engine in
two L1s.

::

    both     as protectdemo: the guest (nested KVM) protected from l1a to l1b, records
             acknowledged; both configs with ``replication.reprotect = true``
    host     SIGKILL l1a's QEMU: l1b wins the witness, (DRBD) promotes, resumes the
             guest and goes on in the primary role, unprotected (first failover)
    host     l1a started again from its own data disk (DRBD: ``drbdadm up``, l1a comes
             back Secondary and DRBD resyncs it from its bitmap and activity log)
    l1a      ``kemari standby`` with l1a's own config (its address, its node id "l1a":
             the witness tells it from l1b, which also once ran ``kemari standby``)
    l1b      protected again: its engine syncs the guest to l1a's standby
    l1b      more records acknowledged, numbered on from the first run's
    host     SIGKILL l1b's QEMU: l1a's standby wins the witness, (DRBD) promotes (its
             fence-peer handler, with l1a's node id, is granted) and resumes the guest;
             every record acknowledged in either run must be on its disk

Before the agents' node ids named the host, the restarted standby in l1a and the
primary in l1b were both "secondary" to the witness (see docs/arbitration.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.config import PathsConfig
from kemari_suite.errors import LabError
from kemari_suite.klab.drbd import proc_drbd
from kemari_suite.klab.engine import EngineProcess
from kemari_suite.klab.pair import L1Pair
from kemari_suite.klab.protectdemo import ROLES, ProtectRun, ProtectScenario
from kemari_suite.vm.image import GuestImage

#: States of an agent that stands by.
STANDBY_STATES = {"waiting", "receiving", "standby"}


@dataclass
class ReprotectRun:
    """Both power losses (``first``: l1a killed, ``second``: l1b killed after the
    re-protection) and the re-protection between them."""

    first: ProtectRun = field(default_factory=ProtectRun)
    second: ProtectRun = field(default_factory=ProtectRun)
    #: l1b protected again, with l1a as its standby (and DRBD UpToDate on both).
    reprotected: bool = False
    #: From l1a's restart to l1b protected again.
    reprotect_s: float | None = None
    #: DRBD: KiB resynced to the restarted l1a ("will sync N KB"; -1 if none was logged),
    #: and each L1's state once re-protected.
    resync_kib: int | None = None
    drbd: dict[str, str] | None = None
    total_s: float = 0.0

    @property
    def records_lost(self) -> int:
        return max(self.first.records_lost, self.second.records_lost)

    @property
    def ok(self) -> bool:
        return (
            self.first.ok
            and self.reprotected
            and self.second.ok
            # The second run's records are numbered on from the first's.
            and self.second.records_acked > self.first.records_found
        )

    def as_dict(self) -> dict[str, Any]:
        s = self.second
        return {
            "resumed": s.resumed,
            "accel": self.first.accel,
            "disk_backend": self.first.disk_backend,
            "records_acked": s.records_acked,
            "records_lost": self.records_lost,
            "failover_ms": s.failover_ms,
            "promoted": s.promoted,
            "reprotected": self.reprotected,
            "reprotect_s": self.reprotect_s,
            "resync_kib": self.resync_kib,
            "drbd": self.drbd,
            "total_s": self.total_s,
            "first": self.first.as_dict(),
            "second": s.as_dict(),
            "ok": self.ok,
        }


class ReprotectScenario:
    """The steps of :func:`run_reprotect_demo`; the pair already runs. The engine, DRBD
    and records steps are :class:`ProtectScenario`'s, whose ``run`` is the first
    :class:`ProtectRun` and then the second."""

    def __init__(
        self,
        pair: L1Pair,
        work: Path,
        host_paths: PathsConfig,
        progress: Callable[[str], None] | None = None,
        run: ReprotectRun | None = None,
    ) -> None:
        self.pair = pair
        self.run = run if run is not None else ReprotectRun()
        self.base = ProtectScenario(pair, work, host_paths, progress, self.run.first)

    def first_loss(
        self, guest: GuestImage, tree: str, *, accel: str, disk_backend: str, min_acks: int
    ) -> None:
        """Protect from l1a with re-protection on, records, l1a's power loss."""
        b = self.base
        if disk_backend == "drbd":
            b.drbd_up()
        b.prepare(guest, tree, accel=accel, disk_backend=disk_backend, reprotect=True)
        b.protect()
        b.write_records(min_acks)
        b.power_loss(victim=0)

    def reprotect(self, timeout: float = 900.0) -> None:
        """l1a back from its own disk as the standby; l1b protected again."""
        b, run = self.base, self.run
        assert b.spec is not None
        t0 = time.monotonic()
        if b.drbd is not None:
            # Starts l1a again, ``drbdadm up`` there, waits until DRBD is in sync.
            run.resync_kib = b.drbd.reprotect()
        else:
            self.pair[0].start(fresh_data=False)
            self.pair[0].wait_ready()
        b.step("restart l1a", "l1a started again from its own disk")
        b.rejoin(0)
        # l1a's own config (its address, its node id), the standby's command.
        b.agents[ROLES[0]] = sb = EngineProcess(self.pair[0], b.spec, ROLES[0], "standby")
        sb.start()
        st = b.agents[ROLES[1]].wait_state({"protected"}, timeout, b.note)
        if st.get("role") != "primary":
            raise LabError(self.pair.spec.lab_id, f"l1b protected, but as {st.get('role')}")
        sb.wait_state(STANDBY_STATES, 120, b.note)
        run.reprotect_s = round(time.monotonic() - t0, 2)
        in_sync = True
        if b.drbd is not None:
            minors = {h.spec.host: proc_drbd(h).minors[0] for h in self.pair.hosts}
            run.drbd = {h: m.summary() for h, m in minors.items()}
            in_sync = all(m.in_sync for m in minors.values())
        run.reprotected = in_sync
        b.step("reprotect", f"l1b protected again, l1a its standby (DRBD {run.drbd})")

    def second_loss(self, more_acks: int) -> None:
        """Records on from the first run's, from l1b; l1b's power loss."""
        b, first = self.base, self.run.first
        second = self.run.second
        second.accel, second.disk_backend = first.accel, first.disk_backend
        second.tracker, second.protected = first.tracker, self.run.reprotected
        second.boot_s = first.boot_s
        b.run = second
        # The checker wrote record ``records_found`` after the first failover.
        start = first.records_found + 1
        b.write_records(start + more_acks, host=1, start=start)
        b.power_loss(victim=1)

    def close(self) -> None:
        self.base.close()


def run_reprotect_demo(
    pair: L1Pair,
    guest: GuestImage,
    *,
    tree: str,
    work: Path,
    host_paths: PathsConfig,
    accel: str = "auto",
    disk_backend: str = "drbd",
    min_acks: int = 30,
    progress: Callable[[str], None] | None = None,
    run: ReprotectRun | None = None,
) -> ReprotectRun:
    """Run the scenario on a started pair (as :func:`run_protect_demo`: ``share=tree``,
    ``lan=True``, with DRBD a data disk). ``min_acks`` records are acknowledged before
    each power loss. ``run`` (optional) is filled in as the steps go.

    The agents and the witness are stopped at the end; the L1s are the caller's.

    Raises:
        LabError: an agent exited, a state or an answer did not come in time.
        DrbdError: DRBD did not come back in sync.
        AgentError, VMError: an L1 did not answer.
        ConfigError: the suite refused a rendered config.
    """
    if disk_backend not in ("builtin", "drbd"):
        raise LabError(
            pair.spec.lab_id, f"re-protection runs on builtin or drbd, not {disk_backend}"
        )
    t0 = time.monotonic()
    sc = ReprotectScenario(pair, work, host_paths, progress, run)
    sc.run.first.boot_s = {h.spec.host: round(h.boot_s or 0.0, 2) for h in pair.hosts}
    try:
        sc.first_loss(guest, tree, accel=accel, disk_backend=disk_backend, min_acks=min_acks)
        sc.reprotect()
        sc.second_loss(min_acks)
    except Exception:
        sc.base.report_logs()
        raise
    finally:
        sc.close()
    sc.run.total_s = round(time.monotonic() - t0, 2)
    return sc.run


__all__ = ["ReprotectRun", "ReprotectScenario", "run_reprotect_demo"]
