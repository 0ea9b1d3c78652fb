"""Failover: the VM resumes on this host from the last committed checkpoint.

One :class:`Failover` runs once, for a lost primary, an operator's ``kemari failover``,
or the standby's half of a planned switchover. Its steps, in order::

    (switchover) take the lease from the tiebreaker     take_lease(); refused: stay standby
    FAILING_OVER; stop taking primaries                  run() from here
    roll the open epoch back, close the receiver         replica = last committed checkpoint
    read the probes, unmap the replica
    bring the disk to the committed epoch                built-in copy checked (diverged
                                                         copies refused), the grant's
                                                         generation recorded; shared
                                                         storage: committed logs replayed
    start QEMU on the replica RAM file, -incoming        taps unprotected
    (switchover) arm the primary role's dirty tracking   before_cont; the replica's
                                                         digest, hashed meanwhile
    restore the device state, cont
    replay the kept guest-bound frames                   ReplayBuffer.take(epoch)
    announce-self
    ACTIVE                                               FailoverReport, Handover

A planned switchover hands the primary role a VM whose every change since the resumed
checkpoint is tracked (the tracker is armed while the guest is still stopped, so no write
escapes it), with the digest of that checkpoint (:func:`~kemari_suite.vm.guestram.ram_digest`
of the replica, hashed on a thread while QEMU starts: only the pieces the last epochs
wrote, the standby keeps the others' digests, :class:`~kemari_suite.vm.guestram.RamDigests`,
so the resume does not wait for it): the old primary, now the standby,
keeps the same bytes, and when its digest matches, the first epoch is a delta
(:mod:`kemari_suite.checkpoint.baseline`). Neither step can fail the switchover: without
them the new primary makes a full copy, as after a failover.

Any failure after FAILING_OVER ends in STOPPED and raises
:class:`~kemari_suite.errors.FailoverError`; for a switchover the lease is given back
first, so the old primary can resume its stopped VM. Answering the primary is the
caller's (the wire is the agent's).

A copy is *stale* when the primary ran without a secondary after this standby's last
commit: the tiebreaker says so (the holder went solo, or its generation is newer than
the one this copy's sidecar records, :mod:`~kemari_suite.replica.generation`). An
automatic failover never gets there (the tiebreaker refuses a stale takeover, and the
watch does not ask for one with a copy older than the holder); an operator's goes through
:func:`operator_failover_check` first, which refuses a stale copy unless the operator
accepts the data loss (an alert is raised). Storage both hosts write (shared, DRBD)
never replays a stale copy's logs: they would overwrite newer data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kemari_suite.alerts import AlertKind
from kemari_suite.config import KemariConfig, ReplicationConfig
from kemari_suite.errors import ConnectError, FailoverError
from kemari_suite.ha.tiebreak import Tiebreaker
from kemari_suite.protocol.link import Link
from kemari_suite.replica import verbs
from kemari_suite.replica.generation import copy_staleness
from kemari_suite.replica.replay import ReplayBuffer
from kemari_suite.replica.replicadisk import replay_committed
from kemari_suite.replica.states import SecondaryState
from kemari_suite.replica.store import ReplicaStore
from kemari_suite.replica.verbs import SwitchRequest
from kemari_suite.service.lifecycle import Lifecycle
from kemari_suite.service.metrics import Artifacts
from kemari_suite.tap import TapMode
from kemari_suite.tap.guestio import GuestIO
from kemari_suite.vm.devstate import restore
from kemari_suite.vm.guestevents import GuestEventLog
from kemari_suite.vm.qemu import AsyncVM, VMSpec

log = logging.getLogger(__name__)

#: Reads the workloads' progress probes from the replica (for the report).
ProbeFn = Callable[[np.ndarray], dict[str, Any]]

#: ``announce-self`` arguments: the network learns where the guest lives now.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


class ResumeTracking(Protocol):
    """The primary role's dirty tracking, armed on a resumed VM (opaque here)."""

    def close(self) -> None: ...


#: Arms the primary role's dirty tracking on the started, still stopped QEMU of a
#: switchover (given by the node, which knows both roles).
BeforeCont = Callable[[AsyncVM], Awaitable[ResumeTracking]]


@dataclass
class FailoverReport:
    """What a failover did and how long each part took (host clock)."""

    reason: str
    epoch: int
    detected_at: float  # wall time the heartbeat timeout expired (or the command arrived)
    tiebreak_ms: float = 0.0
    start_ms: float = 0.0
    restore_ms: float = 0.0
    cont_ms: float = 0.0
    #: A switchover: arming the primary role's tracking, then waiting for the digest.
    arm_ms: float = 0.0
    digest_wait_ms: float = 0.0
    #: heartbeat-timeout expiry (or command) -> guest running
    failover_ms: float = 0.0
    #: Each step in order, ms (host clock): ``lease`` (a switchover's takeover),
    #: ``checkpoint`` (roll back, probes, unmap), ``disk``, ``qemu`` (taps and start),
    #: ``arm``, ``restore``, ``digest`` (its wait), ``cont``; after the guest runs:
    #: ``replay``, ``announce``. Operators read where a slow failover spent its time.
    spans_ms: dict[str, float] = field(default_factory=dict)
    #: Guest-bound frames the checkpoint may lack, injected after ``cont``
    #: (:mod:`.replay`): those that reached QEMU, those that found no guest, and those
    #: the bound dropped before (each of the last two costs a client a retransmission).
    replayed_frames: int = 0
    replay_dropped: int = 0
    replay_overflow_frames: int = 0
    probes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Handover:
    """A running VM a standby resumed in a planned switchover, handed to the primary role."""

    vm: AsyncVM
    io: GuestIO | None
    #: The switchover's final epoch: both disk copies hold exactly this.
    epoch: int
    #: Identity of the disk copy the old primary keeps (for an incremental failback).
    lineage: str
    #: The failover that resumed it (None for a planned switchover).
    report: FailoverReport | None = None
    #: What the guest did so far (forwarded by the old primary, or seen here).
    guest_events: GuestEventLog | None = None
    #: Digest of the resumed checkpoint's RAM (b"": unknown, the first epoch is FULL).
    ram_digest: bytes = b""
    #: Dirty tracking armed before ``cont`` (None: none, the first epoch is FULL).
    tracking: ResumeTracking | None = None


@dataclass(frozen=True)
class PendingSwitch:
    """A planned switchover this standby accepted: the link to answer on, the request."""

    link: Link
    req: SwitchRequest

    async def answer(self, ok: bool, **info: Any) -> None:
        """Tell the old primary the outcome; the link ends with it."""
        with contextlib.suppress(Exception):
            await verbs.send_switched(self.link, ok, **info)
        self.link.close()


@dataclass
class Takeover:
    """A successful failover: the VM runs here."""

    report: FailoverReport
    io: GuestIO
    #: Set when the node goes on in the primary role (switchover, or re-protection).
    handover: Handover | None = None


class Failover:
    """One failover of the VM onto this host; see the module docstring."""

    def __init__(
        self,
        cfg: KemariConfig,
        vm: AsyncVM,
        spec: VMSpec,
        *,
        life: Lifecycle[SecondaryState],
        artifacts: Artifacts,
        store: ReplicaStore,
        witness: Tiebreaker | None,
        probe: ProbeFn | None,
        before_cont: BeforeCont | None = None,
        replay: ReplayBuffer | None = None,
    ) -> None:
        self.cfg = cfg
        self.vm = vm
        #: The command line QEMU runs on the replica (``incoming`` set).
        self.spec = spec
        self.life = life
        self.artifacts = artifacts
        self.store = store
        self.witness = witness
        self.probe = probe
        #: Set once the VM runs here (before ACTIVE, so status at ACTIVE shows it).
        self.report: FailoverReport | None = None
        #: The generation of the takeover the tiebreaker granted (None: none asked).
        self.generation: int | None = None
        self.before_cont = before_cont
        #: A switchover's tracking and checkpoint digest, for the handover.
        self.tracking: ResumeTracking | None = None
        self.ram_digest = b""
        #: The guest-bound frames to replay after ``cont`` (None: none kept).
        self.replay = replay

    async def take_lease(self) -> str:
        """A switchover: the primary released the lease before asking; take it.
        Returns "" when taken (or without a tiebreaker), else why not."""
        if self.witness is None:
            return ""
        try:
            d = await self.witness.ask("takeover")
            granted, why = d.granted, d.reason
        except ConnectError as err:
            granted, why = False, f"tiebreaker unreachable: {err}"
        if granted:
            self.generation = d.generation
            return ""
        self.artifacts.event("switchover-refused", reason=why)
        return why or "refused"

    async def run(
        self,
        reason: str,
        detected: float,
        *,
        tiebreak_ms: float = 0.0,
        switch: PendingSwitch | None = None,
        detach: Callable[[], None] = lambda: None,
        generation: int | None = None,
    ) -> Takeover | None:
        """Resume the VM here from the last committed checkpoint. ``detach`` stops
        taking primaries (called once FAILING_OVER is set). A ``switch`` is answered
        here; None when the tiebreaker refused it (still the standby). ``generation``
        is the takeover the tiebreaker granted (a switchover asks for its own): the
        disk copy records it before the guest resumes.

        Raises:
            FailoverError: no committed checkpoint, a diverged disk copy, or QEMU could
                not resume it (the state is then STOPPED).
        """
        self.generation = generation
        t_lease = time.monotonic()
        if switch is not None:
            why = await self.take_lease()
            if why:
                await switch.answer(False, reason=f"tiebreaker refused: {why}")
                return None
        try:
            took = await self._take_over(reason, detected, tiebreak_ms, switch, detach, t_lease)
        except FailoverError as err:
            if switch is not None:
                await switch.answer(False, reason=f"resume failed here: {err.__cause__ or err}")
            raise
        if switch is not None:
            await switch.answer(True, epoch=took.report.epoch, resume_ms=took.report.failover_ms)
        return took

    async def _take_over(
        self,
        reason: str,
        detected: float,
        tiebreak_ms: float,
        switch: PendingSwitch | None,
        detach: Callable[[], None],
        t_lease: float,
    ) -> Takeover:
        t = time.monotonic()
        lease_ms = (t - t_lease) * 1e3
        self.life.set(SecondaryState.FAILING_OVER, reason)
        detach()
        store = self.store
        async with store.lock:
            store.roll_back_locked("failover")
            receiver = store.receiver
            devstate = receiver.committed_devstate if receiver is not None else None
            if receiver is None or devstate is None:
                self.life.set(SecondaryState.STOPPED, "no committed checkpoint to resume")
                raise FailoverError("no committed checkpoint to resume")
            epoch = receiver.committed_epoch
            logs = receiver.pending_iologs()
            report = FailoverReport(reason=reason, epoch=epoch, detected_at=detected)
            report.tiebreak_ms = tiebreak_ms
            if switch is not None:
                report.spans_ms["lease"] = round(lease_ms, 1)
            if self.probe is not None:
                with contextlib.suppress(Exception):
                    report.probes = self.probe(receiver.pages)
            store.unmap()
        io: GuestIO | None = None
        # The replica is the checkpoint until ``cont`` (nothing writes it: the receiver
        # is closed, QEMU not running): hash it while QEMU starts, only the pieces
        # written since the standby's last refresh (:meth:`ReplicaStore.refresh_digests`).
        digest = (
            asyncio.ensure_future(asyncio.to_thread(store.checkpoint_digest))
            if switch is not None
            else None
        )
        try:
            t0 = _span(report, "checkpoint", t)
            await self._disk_to(epoch, logs)
            _span(report, "disk", t0)
            io = GuestIO(
                self.cfg,
                self.vm.paths,
                epoch=0,
                on_event=None,
                mode=TapMode.UNPROTECTED,
            )
            await self._resume(io, devstate, report, t0, digest)
        except Exception as err:
            self.life.set(SecondaryState.STOPPED, f"failover failed: {err}")
            self.artifacts.event("failover-failed", reason=str(err))
            if digest is not None:
                digest.cancel()
                with contextlib.suppress(BaseException):
                    await digest
            if self.tracking is not None:
                with contextlib.suppress(Exception):
                    self.tracking.close()
                self.tracking = None
            if io is not None:
                with contextlib.suppress(Exception):
                    await io.close()
            if switch is not None and self.witness is not None:
                # Give the lease back so the old primary can resume its stopped VM.
                with contextlib.suppress(Exception):
                    await self.witness.ask("release")
            raise FailoverError(f"could not resume epoch {epoch}: {err}") from err
        self.vm.keep_ram = False
        self.report = report
        self.artifacts.event("failover", **report.__dict__)
        self.life.set(SecondaryState.ACTIVE, f"resumed epoch {epoch}: {reason}")
        req = switch.req if switch is not None else None
        return Takeover(report, io, self._handover(io, epoch, report, req))

    async def _disk_to(self, epoch: int, logs: list[bytes]) -> None:
        """Bring the disk to ``epoch`` before the guest resumes.

        Raises:
            FailoverError: the built-in copy is not at ``epoch``, or shared storage
                holds newer data than this stale copy (nothing is replayed).
        """
        if self.store.disk is not None:
            # The copy's data is the run of our grant from here on (as the lease block
            # of a shared disk names the generation of its writer).
            await asyncio.to_thread(
                self.store.disk.prepare_failover, epoch, generation=self.generation
            )
        elif self.cfg.disk.path:
            # Storage both hosts write: a stale copy's memory and logs are older than
            # what is on the disk; neither replaying nor resuming is safe, whatever
            # data loss the operator accepted.
            why = await copy_staleness(self.witness, None)
            if why:
                raise FailoverError(
                    f"not replaying {len(logs)} committed I/O logs onto {self.cfg.disk.path} "
                    f"nor resuming over it: {why}; the disk holds newer writes, boot the "
                    "guest from it instead"
                )
        if self.store.disk is None and self.cfg.disk.path and logs:
            # Shared storage: replay what was committed but maybe not yet applied by the
            # primary (writes are idempotent).
            await asyncio.to_thread(replay_committed, self.cfg, logs)
            self.artifacts.event("disk-replayed", epochs=len(logs))

    async def _resume(
        self,
        io: GuestIO,
        devstate: bytes,
        report: FailoverReport,
        t0: float,
        digest: asyncio.Future[bytes] | None,
    ) -> None:
        """Start QEMU on the replica, (a switchover) arm tracking, restore, cont,
        announce-self; times into ``report``."""
        t = time.monotonic()
        self.vm.spec = await io.start(self.spec)
        await self.vm.start()
        t1 = _span(report, "qemu", t)
        report.start_ms = (t1 - t0) * 1e3
        if digest is not None:
            await self._arm_tracking()
            report.arm_ms = (_span(report, "arm", t1) - t1) * 1e3
        t = time.monotonic()
        sock = self.vm.paths.run_dir / "in.sock"
        report.restore_ms = await restore(self.vm, devstate, sock) * 1e3
        t = _span(report, "restore", t)
        if digest is not None:
            try:
                self.ram_digest = await digest
            except Exception as err:
                self.artifacts.event("switchover-digest-failed", reason=str(err))
            report.digest_wait_ms = (_span(report, "digest", t) - t) * 1e3
        t = time.monotonic()
        await self.vm.execute("cont")
        report.cont_ms = (_span(report, "cont", t) - t) * 1e3
        report.failover_ms = (time.time() - report.detected_at) * 1e3
        t = time.monotonic()
        self._replay(io, report)
        t = _span(report, "replay", t)
        with contextlib.suppress(Exception):
            await self.vm.execute("announce-self", ANNOUNCE)
        _span(report, "announce", t)

    def _replay(self, io: GuestIO, report: FailoverReport) -> None:
        """Inject the kept guest-bound frames into the running guest, at once (no await
        since ``cont``, so they precede what the LAN sends it from now on), and the ones
        still arriving after them (a switchover's old primary forwards until it
        leaves)."""
        if self.replay is None:
            return
        frames = self.replay.take(report.epoch)
        report.replay_overflow_frames = self.replay.stats.overflow_frames

        def inject(frames: list[bytes]) -> int:
            n = io.inject(frames)
            report.replayed_frames += n
            report.replay_dropped += len(frames) - n
            return n

        inject(frames)
        self.replay.sink = inject

    async def _arm_tracking(self) -> None:
        """Arm the primary role's tracking (``before_cont``) with the guest stopped; a
        failure leaves it unarmed (the first epoch is then FULL), never the VM."""
        if self.before_cont is None:
            return
        try:
            self.tracking = await self.before_cont(self.vm)
        except Exception as err:
            log.warning("switchover: dirty tracking not armed at resume: %s", err)
            self.artifacts.event("switchover-tracking-failed", reason=str(err))

    def _handover(
        self, io: GuestIO, epoch: int, report: FailoverReport, switch: SwitchRequest | None
    ) -> Handover | None:
        """The VM for the primary role: after a switchover, or to protect it again."""
        if switch is not None:
            if io.disk is not None:
                # Both copies hold epoch ``epoch``: what this host writes from now on is
                # what the old primary, as the next standby, will need.
                io.lineage = switch.lineage
                io.acked_at_loss = epoch
                io.disk.tracking = True
            tracking, self.tracking = self.tracking, None
            return Handover(
                vm=self.vm,
                io=io,
                epoch=epoch,
                lineage=switch.lineage,
                ram_digest=self.ram_digest if tracking is not None else b"",
                tracking=tracking,
            )
        rcfg = self.cfg.replication
        if rcfg.reprotect and rcfg.peer:
            # The node runs the primary role on this VM, which renews the lease and
            # waits for a standby at ``peer``.
            return Handover(vm=self.vm, io=io, epoch=epoch, lineage="", report=report)
        return None


def _span(report: FailoverReport, name: str, since: float) -> float:
    """Record step ``name`` of ``report`` as the time since ``since`` (monotonic); returns
    now, the next step's start."""
    now = time.monotonic()
    report.spans_ms[name] = round((now - since) * 1e3, 1)
    return now


def switch_refusal(
    state: SecondaryState,
    committed_epoch: int,
    req: SwitchRequest,
    rcfg: ReplicationConfig,
    restore_failure: str | None,
) -> str:
    """Why this standby cannot take a planned switchover now ("" when it can)."""
    if state is not SecondaryState.STANDBY:
        return f"this host is {state.value}, not standby"
    if committed_epoch != req.epoch:
        return f"this host committed epoch {committed_epoch}, not {req.epoch}"
    if not rcfg.peer:
        return (
            "replication.peer is not set on this host: it could not protect the VM after the switch"
        )
    if restore_failure is not None:
        return f"the trial restore failed here: {restore_failure}"
    return ""


async def operator_failover_check(
    witness: Tiebreaker | None,
    sidecar_generation: int | None,
    artifacts: Artifacts,
    *,
    accept_data_loss: bool,
) -> None:
    """Before an operator's failover (``kemari failover --yes``): refuse a copy known to
    be stale, unless ``accept_data_loss``, which raises an alert instead.

    Raises:
        FailoverError: the copy is stale and the data loss was not accepted.
    """
    why = await copy_staleness(witness, sidecar_generation)
    if not why:
        return
    if not accept_data_loss:
        artifacts.event("failover-refused", reason=why)
        raise FailoverError(
            f"{why}; resuming it loses what the primary acknowledged since. "
            "Add --accept-data-loss to resume it anyway"
        )
    reason = f"operator accepted data loss: resuming a stale copy ({why})"
    artifacts.event("failover-data-loss-accepted", reason=reason)
    if artifacts.alerter is not None:
        # Two histories of the guest from here on: the abandoned solo run and this one.
        artifacts.alerter.emit(AlertKind.DATA_LOSS, reason, event="failover-data-loss-accepted")


async def renew_lease(witness: Tiebreaker, interval_s: float) -> None:
    """Keep the lease after a failover with no primary role to renew it (until cancelled)."""
    while True:
        with contextlib.suppress(ConnectError):
            await witness.ask("renew")
        await asyncio.sleep(interval_s)


__all__ = [
    "BeforeCont",
    "Failover",
    "FailoverReport",
    "Handover",
    "PendingSwitch",
    "ProbeFn",
    "ResumeTracking",
    "Takeover",
    "copy_staleness",
    "operator_failover_check",
    "renew_lease",
    "switch_refusal",
]
