"""The primary agent: runs the protected VM and replicates it at every sync point.

A thin coordinator. The parts it wires together each own their state:

- :class:`~.window.StoppedWindow`: stop, capture, scan, stage, epoch switch, ``cont``;
- :class:`~.sender.EpochSender`: frames, encoding, digests, pre-copy, initial sync;
- :class:`~.peer.PeerSession` and :class:`~.peer.AckTracker`: the link to the
  secondary, its frames dispatched by type, heartbeats, acknowledgements;
- :class:`~.arbiter.LeaseKeeper`: the lease, and what losing the secondary means;
- :func:`~.switchover.run_switchover`, :mod:`.diskcopy` and :mod:`.baseline` (the
  first epoch after a switchover, a delta when safe): procedures of their own;
- :class:`~kemari_suite.service.lifecycle.Lifecycle` with
  :data:`~.states.PRIMARY_TRANSITIONS`: the states, checked.

A sync point: ``stop`` -> capture device state -> find dirty pages and stage them ->
switch the epoch -> ``cont`` (speculative mode; classic mode stays stopped until the
acknowledgement). Encoding and sending happen after the resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kemari_suite.alerts import Alerter
from kemari_suite.checkpoint import commands, diskcopy, loss
from kemari_suite.checkpoint.arbiter import LeaseKeeper
from kemari_suite.checkpoint.baseline import SwitchBaseline, build_tracker
from kemari_suite.checkpoint.guestevents import GuestEvents
from kemari_suite.checkpoint.held import HeldBound
from kemari_suite.checkpoint.peer import AckTracker, PeerSession
from kemari_suite.checkpoint.peerstate import PeerState
from kemari_suite.checkpoint.sender import Buffers, EpochSender
from kemari_suite.checkpoint.states import PRIMARY_TRANSITIONS, PrimaryState
from kemari_suite.checkpoint.switchover import run_switchover
from kemari_suite.checkpoint.syncpoint import SyncPoints
from kemari_suite.checkpoint.tracker import DirtyTracker
from kemari_suite.checkpoint.triggers import Triggers
from kemari_suite.checkpoint.window import StoppedWindow
from kemari_suite.config import KemariConfig
from kemari_suite.disk import guest_disk_size
from kemari_suite.disk.drbdwatch import alert_on_split_brain
from kemari_suite.errors import ConnectError, FailoverError, ProtocolError, ReplicationError
from kemari_suite.ha.tiebreak import make_tiebreaker
from kemari_suite.protocol import tls, wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.keys import load_replication_key
from kemari_suite.protocol.link import connect
from kemari_suite.service.control import ControlServer
from kemari_suite.service.lifecycle import Lifecycle, Transition
from kemari_suite.service.metrics import Artifacts
from kemari_suite.tap import TapMode
from kemari_suite.tap.events import IOEvent
from kemari_suite.tap.guestio import GuestIO, make_scheduler
from kemari_suite.testing import faults
from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared
from kemari_suite.vm.guestevents import GuestEventLog
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.profile import vm_profile
from kemari_suite.vm.qemu import AsyncVM, VMSpec

log = logging.getLogger(__name__)

PAGE = 4096
#: How long the secondary may take to report its trial restore before protection.
COMPAT_TIMEOUT_S = 120.0


class PrimaryAgent:
    """Owns QEMU, the guest RAM mapping and the parts that replicate it."""

    def __init__(
        self,
        cfg: KemariConfig,
        spec: VMSpec,
        *,
        node_id: str = "primary",
        artifacts: Path | None = None,
        on_state: Callable[[PrimaryState, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rcfg = cfg.replication
        self.key = load_replication_key(cfg)
        self.spec = spec
        self.node_id = node_id
        self.vm = AsyncVM(spec, run_root=cfg.paths.run_dir, shm_dir=cfg.paths.shm_dir)
        self.artifacts = Artifacts(
            artifacts or (self.vm.paths.run_dir.parent / f"{spec.name}-artifacts")
        )
        # Raises ConfigError for a hook that does not exist: before anything starts.
        self.artifacts.alerter = Alerter(cfg.alerts, vm=spec.name, node=node_id)
        self.life: Lifecycle[PrimaryState] = Lifecycle(
            "primary", PrimaryState.STARTING, PRIMARY_TRANSITIONS, on_change=self._on_transition
        )
        self.on_state = on_state
        self.epoch = 0
        self.last_committed_epoch = -1
        self.checkpoints = 0
        self.ram: GuestRAM | None = None
        self.tracker: DirtyTracker | None = None
        self.capturer: DeviceStateCapturer | None = None
        self.window: StoppedWindow | None = None
        self.buffers: Buffers | None = None
        self.encoder = PageEncoder(self.rcfg.compression)
        self.sender: EpochSender | None = None
        self.session: PeerSession | None = None
        self.acks = AckTracker()
        self.sched = make_scheduler(cfg)
        self.triggers = Triggers(self.sched)
        self.syncs = SyncPoints(self)
        self.guest = GuestEvents(self)
        #: Output held with no secondary (HELD) is bounded; see :mod:`.held`.
        self.held = HeldBound(self, self.rcfg.held_limit_mib << 20)
        self.lease = LeaseKeeper(
            None,
            interval_s=self.rcfg.heartbeat_interval_ms / 1000,
            lease_s=self.rcfg.heartbeat_timeout_ms / 1000,
            tiebreaker_name=self.rcfg.tiebreaker,
            secondary_silent=self._secondary_silent,
            on_fenced=lambda why: loss.stop_fenced(self, why),
            on_unreachable=lambda why: self.artifacts.event("witness-unreachable", reason=why),
        )
        self.io: GuestIO | None = None
        self.control: ControlServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        #: What the secondary said on the current connection.
        self.peer = PeerState(self.artifacts)
        #: Our last disk resync towards the secondary.
        self.resync: dict[str, Any] = {}
        #: Our last initial synchronization: its mode (full, delta), why, pages, time.
        self.initial_sync: dict[str, Any] = {}
        #: The checkpoint a switchover resumed here, while the first epoch may be a
        #: delta on it (taken by the first initial synchronization, whatever it decides).
        self.baseline: SwitchBaseline | None = None
        #: A tracker armed before the resume's ``cont`` (used by :meth:`_attach`).
        self._armed: DirtyTracker | None = None
        #: A switchover the operator asked for.
        self.switch_req: asyncio.Future[dict[str, Any]] | None = None
        self.switched_epoch = -1
        #: The lineage the switchover request named (with the epoch: our kept checkpoint).
        self.switched_lineage = ""
        #: "stopped", or "standby" after a switchover (the node then runs the standby).
        self.outcome = "stopped"
        self.failover_report: dict[str, Any] | None = None
        self._handlers: dict[type[wire.Message], Callable[[Any], None]] = {
            wire.Ack: lambda m: self.on_ack(m.epoch),
            **self.peer.handlers(),
        }

    # ---- state -------------------------------------------------------------------------

    @property
    def state(self) -> PrimaryState:
        return self.life.state

    def set_state(self, state: PrimaryState, reason: str = "") -> None:
        self.life.set(state, reason)

    def _on_transition(self, t: Transition[PrimaryState]) -> None:
        self.artifacts.event(
            "state", role="primary", old=t.old.value, state=t.new.value, reason=t.reason
        )
        if self.on_state is not None:
            self.on_state(t.new, t.reason)

    def status_dict(self) -> dict[str, Any]:
        """What ``kemari status`` shows (see :func:`.commands.status`)."""
        return commands.status(self)

    def request_stop(self) -> None:
        """End the agent's run (the node decides what comes next)."""
        self._stop.set()
        self.triggers.request("stop")

    async def fence(self, reason: str) -> None:
        """Stop the guest for good (another host may run it now); see :mod:`.loss`.
        Raises FailoverError, always: the agent's run ends with it."""
        await loss.fence(self, reason)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- lifecycle ---------------------------------------------------------------------

    async def start_vm(self) -> None:
        """Boot the VM and map its RAM (before protection starts)."""
        self.io = GuestIO(
            self.cfg,
            self.vm.paths,
            epoch=self.epoch,
            on_event=self._on_io,
            mode=TapMode.UNPROTECTED,
            on_durable=self._on_durable,
        )
        self.vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.vm.spec = await self.io.start(self.spec)
        self.spec = self.vm.spec
        await self.vm.start()
        await self._attach()

    async def adopt(
        self,
        vm: AsyncVM,
        io: GuestIO | None,
        epoch: int,
        failover: dict[str, Any] | None = None,
        guest_events: GuestEventLog | None = None,
        *,
        tracker: DirtyTracker | None = None,
        baseline: SwitchBaseline | None = None,
    ) -> None:
        """Take over a VM this host already runs (a standby's, after a switchover or,
        with ``replication.reprotect``, after a failover: ``failover`` is its report),
        with the guest's events so far. After a switchover, ``tracker`` was armed before
        the guest resumed ``baseline``: the first epoch may then be a delta on it."""
        self.failover_report = failover
        self._armed = tracker
        self.baseline = baseline if tracker is not None else None
        if guest_events is not None:
            self.guest.log = guest_events
        self.vm = vm
        self.spec = vm.spec
        self.io = io
        self.epoch = epoch
        if io is not None:
            io.rebind(on_event=self._on_io, on_durable=self._on_durable, epoch=epoch)
        self.last_committed_epoch = epoch
        await self._attach()

    async def _attach(self) -> None:
        """Map the running VM's RAM and set up the tracker, capturer and window."""
        # A split brain the disk sees from now on (DRBD's events2) is alerted.
        alert_on_split_brain(self.io.disk if self.io is not None else None, self.artifacts.alerter)
        await enable_ignore_shared(self.vm)
        n_pages = self.spec.memory_mib * 1024 * 1024 // PAGE
        self.ram = GuestRAM(self.vm.paths.ram, populate=False).populate_in_background()
        armed, self._armed = self._armed, None
        self.tracker = armed if armed is not None else await build_tracker(self.cfg, self.vm)
        log.info("dirty-page tracker %s: %s", self.tracker.name, self.tracker.reason)
        self.artifacts.event(
            "tracker",
            name=self.tracker.name,
            reason=self.tracker.reason,
            armed_at_resume=armed is not None,
        )
        self.buffers = Buffers.allocate(n_pages, self.tracker.caps)
        self.capturer = DeviceStateCapturer(self.vm, self.vm.paths.migration_socket)
        self.window = StoppedWindow(
            self.vm,
            self.capturer,
            self.tracker,
            self.ram.pages,
            staging=self.buffers.staging,
            index=self.buffers.index,
            overlap_scan=self.rcfg.overlap_scan,
            stage_during_capture=self.rcfg.stage_during_capture,
            qmp_timeout_s=self.cfg.vm.qmp_timeout_ms / 1000,
        )
        self.vm.on_event(self.guest.on_qemu_event)
        commands.announce_unprotected(self)

    async def run(self) -> None:
        """Protect the VM until stopped. Raises FailoverError when fenced."""
        self.control = ControlServer(
            self.vm.paths.run_dir / "control.sock",
            commands.handlers(self),
        )
        await self.control.start()
        self.lease.witness = make_tiebreaker(self.cfg, self.node_id, format_lease=True)
        self.lease.start()
        delay = faults.random_delay()
        if delay is not None:
            self._tasks.append(asyncio.create_task(self._random_fault(delay)))
        try:
            while not self._stop.is_set():
                try:
                    await self._protect_once()
                except (ConnectError, ProtocolError, ReplicationError, ConnectionError) as err:
                    if self._stop.is_set():
                        break
                    lost = self.session.lost_reason if self.session is not None else ""
                    await loss.secondary_lost(self, lost or str(err))
                    # Reconnect (re-protect) when a secondary comes back; a secondary
                    # that cannot run this VM will not change its mind every second.
                    await self._sleep_or_stop(15.0 if self.peer.refused else 1.0)
        finally:
            await self.shutdown()
        if self.state is PrimaryState.FENCED:
            raise FailoverError(f"this host stopped its VM: {self.life.reason}")

    async def _random_fault(self, delay: float) -> None:
        while self.state is not PrimaryState.PROTECTED:
            await asyncio.sleep(0.05)
        await asyncio.sleep(delay)
        faults.die("random")

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def shutdown(self) -> None:
        self._stop.set()
        await self.lease.pause()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.acks.fail("agent stopping")
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.link.send(wire.Bye(reason="primary stopping"))
            await self.session.close()
            self.session.link.close()
        if self.capturer is not None:
            self.capturer.close()
        if self.window is not None:
            self.window.close()
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        if self.outcome == "standby":
            # The stopped guest's RAM is the switchover checkpoint: kept, the standby's
            # replica from here on (see :mod:`.baseline`).
            self.vm.keep_ram = True
        await self.vm.shutdown()
        if self.io is not None:
            await self.io.close()
        if self.outcome == "standby":
            # This copy is the peer's as of the switchover: the next protection sends
            # only what the peer wrote since.
            diskcopy.remember_switchover(self, self.switched_epoch)
        if self.control is not None:
            await self.control.close()
        if self.state not in (PrimaryState.FENCED, PrimaryState.SWITCHED):
            self.set_state(PrimaryState.STOPPED)
        self.artifacts.status(self.status_dict())
        self.artifacts.close()

    # ---- protection --------------------------------------------------------------------

    async def _protect_once(self) -> None:
        """Connect, run the initial synchronization, then sync points until the link fails."""
        link = await connect(
            self.rcfg.peer,
            key=self.key,
            node_id=self.node_id,
            timeout=self.rcfg.heartbeat_timeout_ms / 1000,
            tls=tls.enabled(self.rcfg.tls),
        )
        if self._stop.is_set():
            # Fenced (or stopped) while connecting: FENCED is final, never SYNCING.
            link.close()
            return
        self.session = session = PeerSession(
            link,
            self._handlers,
            heartbeat_interval_s=self.rcfg.heartbeat_interval_ms / 1000,
            heartbeat_timeout_s=self.rcfg.heartbeat_timeout_ms / 1000,
            role_state=lambda: self.state.value,
            on_lost=self._on_session_lost,
        )
        assert self.ram is not None
        self.sender = EpochSender(link.send, self.encoder, n_pages=self.ram.n_pages)
        self.peer.reset(session)
        self.set_state(PrimaryState.SYNCING, f"secondary {self.rcfg.peer} connected")
        session.start()
        try:
            # Before a single page: can the secondary run this very VM?
            await link.send(
                wire.VmProfile(
                    profile=vm_profile(self.cfg, self.spec, disk_size=guest_disk_size(self.cfg))
                )
            )
            await self.peer.wait(
                self.peer.profile_ok, "our VM profile", self.rcfg.heartbeat_timeout_ms / 500
            )
            await self.syncs.initial_sync()
            await self._protected_loop(session)
            if session.lost.is_set():
                raise ConnectError(self.rcfg.peer, session.lost_reason)
        finally:
            await session.close()
            if self._stop.is_set() or session.lost.is_set():
                link.close()

    async def _protected_loop(self, session: PeerSession) -> None:
        verdict_due = time.monotonic() + COMPAT_TIMEOUT_S
        protected = False
        while not self._stop.is_set():
            if not protected and self.peer.restore_ok.is_set():
                # The secondary loaded our first checkpoint into its own QEMU.
                protected = True
                await self.lease.paired()
                self.set_state(
                    PrimaryState.PROTECTED,
                    f"epoch {self.last_committed_epoch}; the secondary restored "
                    f"a checkpoint in {self.peer.compat.get('ms', '?')} ms",
                )
            elif not protected and time.monotonic() > verdict_due:
                session.lose("the secondary never reported its trial restore")
            trigger = await self.syncs.wait_trigger(session)
            if self._stop.is_set() or session.lost.is_set():
                return
            if self.guest.stopped:
                await self.guest.final_checkpoint()
                return
            if self.switch_req is not None and protected:
                if await run_switchover(self, self.switch_req):
                    return
                continue
            await self.sync_point(trigger)

    async def sync_point(self, trigger: str, *, resume: bool = True) -> None:
        await self.syncs.sync_point(trigger, resume=resume)

    async def request_sync(self, reason: str = "api", *, wait: bool = True) -> int:
        """Ask for a sync point; with ``wait``, return once its epoch is acknowledged.

        Events that arrive while a sync is in flight are coalesced into the next one.

        Raises:
            ReplicationError: the epoch was lost (link failure) or the VM is not protected.
        """
        if self.state is not PrimaryState.PROTECTED:
            raise ReplicationError(f"not protected ({self.state.value})")
        target = self.epoch
        fut = self.acks.future(target)
        self.triggers.request(reason)
        self.sched.demand()
        if not wait:
            return target
        return await fut

    # ---- frames from the secondary -----------------------------------------------------

    def _on_io(self, kind: IOEvent, epoch: int) -> None:
        """The taps' event sink: the sync policy, and the bound on held output."""
        logged = self.io.logged_bytes(epoch) if kind is IOEvent.WRITE and self.io else 0
        self.sched.notify(kind, epoch, logged)
        self.held.on_io(kind, epoch)

    def _on_durable(self, epoch: int) -> None:
        """Every write through ``epoch`` is on our disk: the secondary may drop its logs."""
        session = self.session
        if session is not None and not session.link.closed:
            task = asyncio.ensure_future(session.link.send(wire.Durable(epoch=epoch)))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def on_ack(self, epoch: int) -> None:
        self.last_committed_epoch = epoch
        diskcopy.on_ack(self, epoch)
        if self.io is not None:
            self.io.committed(epoch)
        self.sched.finished()
        faults.hit("after-ack")
        self.acks.acked(epoch)

    def _on_session_lost(self, reason: str) -> None:
        self.triggers.request("link lost")
        self.sched.finished()

    def _secondary_silent(self) -> bool:
        interval = self.rcfg.heartbeat_interval_ms / 1000
        return self.session is None or self.session.silent_for() > 2 * interval


__all__ = ["PrimaryAgent", "PrimaryState"]
