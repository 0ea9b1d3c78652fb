"""The secondary agent: holds the replica and takes over when the primary is gone.

Life of the secondary (every edge: :data:`~kemari_suite.replica.states.SECONDARY_TRANSITIONS`)::

    WAITING -> RECEIVING (initial synchronization) -> STANDBY (a committed checkpoint held)
    WAITING (a kept switchover checkpoint) -> RECEIVING (its DELTA) -> STANDBY
    STANDBY --primary lost, tiebreaker won (or `kemari failover`)--> FAILING_OVER -> ACTIVE
    STANDBY --primary lost, tiebreaker lost--> STANDBY (says why; the primary lives on)

The agent is a coordinator; each concern lives in its own module:

- :mod:`~kemari_suite.replica.receiver`: the replica's pages, the open epoch, its undo
  log, commit and rollback (the replica is always exactly the last committed
  checkpoint when no epoch is open); no I/O;
- :mod:`~kemari_suite.replica.store`: the replica RAM file, the receiver over it and
  the apply lock;
- :mod:`~kemari_suite.replica.replicadisk`: every disk operation (the built-in copy,
  shared-storage replay);
- :mod:`~kemari_suite.replica.verbs`: the typed control messages (profile, disk copy,
  durable marks, switchover) mapped to this agent's handlers, and the answers;
- :mod:`~kemari_suite.replica.compat`: the protect-time compatibility check;
- :mod:`~kemari_suite.replica.monitor`: heartbeat timeout -> tiebreaker -> failover;
- :mod:`~kemari_suite.replica.rejects`: what the log says of refused connections;
- :mod:`~kemari_suite.replica.failover`: the failover itself (and the standby's half of
  a planned switchover);
- :mod:`~kemari_suite.replica.states`: the lifecycle's transition table.

The agent owns the lifecycle, the sockets (replication link, control socket) and the
dispatch of wire messages to those pieces, by message type (``_handlers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from kemari_suite.alerts import Alerter
from kemari_suite.config import KemariConfig
from kemari_suite.errors import (
    ConnectError,
    FailoverError,
    ProtocolError,
    ReplicationError,
)
from kemari_suite.ha.tiebreak import make_tiebreaker
from kemari_suite.protocol import tls, wire
from kemari_suite.protocol.keys import load_replication_key
from kemari_suite.protocol.link import Link, parse_listen, serve
from kemari_suite.replica import commands, verbs
from kemari_suite.replica.compat import CompatCheck
from kemari_suite.replica.failover import (
    BeforeCont,
    Failover,
    FailoverReport,
    Handover,
    PendingSwitch,
    renew_lease,
    switch_refusal,
)
from kemari_suite.replica.generation import GenerationWatch
from kemari_suite.replica.guestwatch import GuestWatch
from kemari_suite.replica.monitor import FailoverRequest, PrimaryWatch, send_heartbeats
from kemari_suite.replica.receiver import OpenEpoch
from kemari_suite.replica.rejects import RejectLogger
from kemari_suite.replica.replay import ReplayBuffer
from kemari_suite.replica.replicadisk import replay_nosync
from kemari_suite.replica.states import SECONDARY_TRANSITIONS, SecondaryState
from kemari_suite.replica.store import KeptRAM, ReplicaStore
from kemari_suite.replica.verbs import SwitchRequest
from kemari_suite.service.control import ControlServer
from kemari_suite.service.lifecycle import Lifecycle, Transition
from kemari_suite.service.metrics import Artifacts
from kemari_suite.tap.guestio import GuestIO
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.qemu import AsyncVM, VMSpec

log = logging.getLogger(__name__)

PAGE = 4096

S = SecondaryState
#: A wire-message handler: the link it came on and the message (of the handler's type).
MessageHandler = Callable[[Link, Any], Awaitable[None]]


class SecondaryAgent:
    """Receives epochs into the replica and fails over on demand or on primary loss."""

    def __init__(
        self,
        cfg: KemariConfig,
        spec: VMSpec,
        *,
        node_id: str = "secondary",
        artifacts: Path | None = None,
        probe: Callable[[np.ndarray], dict[str, Any]] | None = None,
        kept: KeptRAM | None = None,
        before_cont: BeforeCont | None = None,
    ) -> None:
        self.cfg = cfg
        self.rcfg = cfg.replication
        self.key = load_replication_key(cfg)
        # Checked before anything starts: an explicit address, a known TLS mode.
        self.listen = parse_listen(self.rcfg.listen)
        self.tls = tls.enabled(self.rcfg.tls)
        # The failover start uses the very same command line, on the replica, incoming.
        self.spec = spec.replace(incoming=True)
        self.node_id = node_id
        self.vm = AsyncVM(
            self.spec, run_root=cfg.paths.run_dir, shm_dir=cfg.paths.shm_dir, keep_ram=True
        )
        self.artifacts = Artifacts(
            artifacts or (self.vm.paths.run_dir.parent / f"{spec.name}-artifacts")
        )
        # Raises ConfigError for a hook that does not exist: before anything starts.
        self.artifacts.alerter = Alerter(cfg.alerts, vm=spec.name, node=node_id)
        self.probe = probe
        self.life: Lifecycle[SecondaryState] = Lifecycle(
            "secondary", S.WAITING, SECONDARY_TRANSITIONS, on_change=self._on_transition
        )
        #: Why the agent is in its state, or why it did not fail over (for status).
        self.reason = ""
        self.n_pages = spec.memory_mib * 1024 * 1024 // PAGE
        #: The replica RAM file, its epoch receiver and the disk copy.
        #: ``kept``: this host's RAM as of the switchover that made it the standby.
        self.store = ReplicaStore(
            cfg, self.vm.paths.ram, self.vm.paths.run_dir, self.n_pages, self.artifacts, kept
        )
        #: Arms the primary role's dirty tracking on a switchover's resumed VM.
        self._before_cont = before_cont
        #: The taps of the VM resumed here (after a failover).
        self.io: GuestIO | None = None
        #: Guest-bound frames the committed checkpoint may lack, for replay at failover.
        self.replay = ReplayBuffer()
        self.link: Link | None = None
        #: What the guest did: forwarded by the primary, or seen here once active.
        self.guest = GuestWatch(self)
        self.compat_check = CompatCheck(
            cfg, self.spec, self.vm.paths.ram, self.artifacts, on_problem=self._note
        )
        self.watch = PrimaryWatch(
            self.rcfg,
            None,
            standby=lambda: self.life.state is S.STANDBY,
            fail_over=self._fail_over,
            refused=self._failover_refused,
            copy_generation=self.store.copy_generation,
        )
        #: The tiebreaker generation of the primary streaming to us (for the disk copy).
        self.generation = GenerationWatch(retry_s=self.rcfg.heartbeat_interval_ms / 1000)
        self._learning: asyncio.Task[None] | None = None
        self.control: ControlServer | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stop = asyncio.Event()
        self._failover: Failover | None = None
        #: A planned switchover in progress: the link to answer on, and its request.
        self._switch: PendingSwitch | None = None
        #: Set after a failover or switchover: the node runs the primary role on it.
        self.handover: Handover | None = None
        self._renewer: asyncio.Task[None] | None = None
        #: The listener's refusals: a bad Hello is an error line, a stream of them one
        #: summary per interval; scans and timeouts go to debug.
        self.rejects = RejectLogger(log)
        self._handlers: dict[type[wire.Message], MessageHandler] = {
            wire.Heartbeat: _ignore,
            wire.GuestEvent: self.guest.forwarded,
            wire.GuestFrames: self.replay.on_message,
            wire.Bye: self._on_bye,
            **verbs.handlers(self),
            wire.EpochBegin: self._on_begin,
            wire.Pages: lambda _link, msg: self.store.pages(msg),
            wire.DeviceState: lambda _link, msg: self.store.device_state(msg),
            wire.DeviceStateDelta: lambda _link, msg: self.store.device_state_delta(msg),
            wire.IOLog: lambda _link, msg: self.store.io_log(msg),
            wire.EpochEnd: self._on_end,
        }

    # ---- state and status ----------------------------------------------------------

    @property
    def state(self) -> SecondaryState:
        return self.life.state

    @property
    def replica(self) -> GuestRAM | None:
        """The mapped replica RAM file (None once a failover handed it to QEMU)."""
        return self.store.ram

    @property
    def committed_epoch(self) -> int:
        return self.store.committed_epoch

    @property
    def open(self) -> OpenEpoch | None:
        """The epoch being received, if any."""
        return self.store.open_epoch

    @property
    def compat(self) -> dict[str, Any]:
        """Result of the protect-time compatibility check (profile, then trial restore)."""
        return self.compat_check.results

    @property
    def report(self) -> FailoverReport | None:
        """The failover that resumed the VM here, once it succeeded."""
        return self._failover.report if self._failover is not None else None

    def _note(self, reason: str) -> None:
        """Say why (in status) without a change of state."""
        self.reason = reason

    def _on_transition(self, t: Transition[SecondaryState]) -> None:
        self.reason = t.reason
        self.artifacts.event(
            "state", role="secondary", old=t.old.value, state=t.new.value, reason=t.reason
        )
        self.artifacts.status(self.status_dict())

    def status_dict(self) -> dict[str, Any]:
        """What ``kemari status`` shows (see :func:`.commands.status`)."""
        return commands.status(self)

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the primary until stopped or failed over (then keep the VM running)."""
        self.vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.store.open()
        self.control = ControlServer(
            self.vm.paths.run_dir / "control.sock",
            commands.handlers(self),
        )
        await self.control.start()
        self.watch.witness = make_tiebreaker(self.cfg, self.node_id, format_lease=False)
        host, port = self.listen
        self._server = await serve(
            host,
            port,
            key=self.key,
            node_id=self.node_id,
            on_link=self._on_link,
            tls=self.tls,
            on_reject=self.rejects,
        )
        monitor = asyncio.create_task(self.watch.run())
        try:
            await self._stop.wait()
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
            await self.shutdown()

    def request_stop(self) -> None:
        """End :meth:`run` (the node decides what comes next)."""
        self._stop.set()

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self.rejects.close()
        if self._learning is not None:
            self._learning.cancel()
        if self.link is not None:
            self.link.close()
        await self.compat_check.close()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
        self.store.unmap()
        if self.handover is None:
            # After a switchover the VM and its taps live on, in the primary role.
            if self.vm.state.value != "new":
                self.vm.keep_ram = False
                await self.vm.shutdown()
            if self.io is not None:
                await self.io.close()
        # After a switchover the RAM file is the running VM's.
        self.store.close(keep_file=self.handover is not None)
        if self.control is not None:
            await self.control.close()
        if self.state is not S.ACTIVE:
            self.life.set(S.STOPPED, "agent stopped")
        self.artifacts.status(self.status_dict())
        self.artifacts.close()

    # ---- control socket ------------------------------------------------------------

    # ---- the replication link ------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        """One primary connection; a new one replaces (and rolls back) the previous."""
        if self.state in (S.FAILING_OVER, S.ACTIVE):
            with contextlib.suppress(Exception):
                await link.send(wire.Bye(reason=f"secondary is {self.state.value}"))
            link.close()
            return
        if self.link is not None:
            self.link.close()
        await self.store.roll_back("a new primary connection")
        self.replay.clear()
        self.link = link
        self.watch.heard()
        self.artifacts.event("primary-connected", peer=link.peer)
        peer = link.session.peer
        self.generation.new_link(peer.node_id if peer is not None else "")
        if self.store.disk is not None:
            self.store.disk.new_primary()
        with contextlib.suppress(ConnectionError, ProtocolError):
            await verbs.send_disk_state(link, self.store.disk_state())
            await verbs.send_ram_state(link, *self.store.ram_state())
        hb = asyncio.create_task(
            send_heartbeats(link, self.watch.interval_s, lambda: self.state.value)
        )
        try:
            while True:
                msg = await link.recv()
                self.watch.heard()
                handler = self._handlers.get(type(msg))
                if handler is None:
                    raise ProtocolError(f"unexpected message {type(msg).__name__}")
                await handler(link, msg)
        except (ProtocolError, ReplicationError) as err:
            # A forged or corrupt frame: drop the epoch, keep the last checkpoint.
            self.artifacts.event("rejected", reason=str(err))
            log.error("secondary: %s", err)
            with contextlib.suppress(Exception):
                await link.send(wire.Resync(reason=str(err)))
        except (ConnectionError, ConnectError, asyncio.IncompleteReadError, EOFError) as err:
            self.artifacts.event("primary-disconnected", reason=str(err))
        finally:
            hb.cancel()
            link.close()
            if self.link is link:
                self.link = None
            await self.store.roll_back("the primary connection ended mid-epoch")
            if not self.store.resumable and self.state is S.RECEIVING:
                self.life.set(
                    S.WAITING,
                    "the primary was lost during the initial synchronization: "
                    "no committed checkpoint to resume",
                )

    # ---- wire messages, by type ----------------------------------------------------

    async def _on_bye(self, link: Link, msg: wire.Bye) -> None:
        raise ConnectionError(f"primary said goodbye: {msg.reason}")

    async def _on_begin(self, link: Link, msg: wire.EpochBegin) -> None:
        # A FULL epoch, or the first DELTA on a kept switchover checkpoint: a synchronization.
        sync = self.store.synchronization(msg)
        if sync and not self.life.can(S.RECEIVING):
            raise ProtocolError(f"{msg.kind.name} epoch {msg.epoch} while {self.state.value}")
        await self.store.begin(msg)
        if sync and self.state is not S.RECEIVING:
            self.life.set(S.RECEIVING, sync)

    async def _on_end(self, link: Link, msg: wire.EpochEnd) -> None:
        acked = False

        async def committed(epoch: int, devstate: bytes) -> None:
            nonlocal acked
            self.replay.committed(epoch)
            if self.state is S.RECEIVING:
                self.life.set(S.STANDBY, f"committed epoch {epoch}")
            if self.compat_check.trial_pending:
                # Acknowledged first: the primary's held output need not wait for the
                # trial, which copies the replica now (the lock keeps it this checkpoint).
                await link.send(wire.Ack(epoch=epoch))
                acked = True
                await self.compat_check.start_trial(link, devstate)

        epoch = await self.store.end(msg, committed)
        if not acked:
            await link.send(wire.Ack(epoch=epoch))
        # Off the acknowledgement's path: a switchover then hashes only the last epochs.
        self.store.refresh_digests()
        _learn_generation(self)

    # ---- control messages (mapped by verbs.py) ----------------------------------------

    async def on_disk_copy(self, lineage: str, *, incremental: bool) -> None:
        """The primary starts copying the disk in the open FULL epoch."""
        await self.store.disk_copy(lineage, incremental=incremental)

    def on_durable(self, epoch: int) -> None:
        """The primary's disk holds every write through ``epoch``: drop those logs."""
        self.store.durable(epoch)

    async def on_vm_profile(self, link: Link, theirs: dict[str, Any]) -> None:
        """Compare the primary's VM with ours; refuse with the differing fields.

        Raises:
            ConnectionError: the VMs differ (the link ends).
        """
        await self.compat_check.answer_profile(link, theirs)

    async def on_switchover(self, link: Link, req: SwitchRequest) -> None:
        """The primary stopped its VM at a committed checkpoint and hands it over."""
        problem = switch_refusal(
            self.state, self.committed_epoch, req, self.rcfg, self.compat_check.restore_failure
        )
        if problem:
            self.artifacts.event("switchover-refused", reason=problem)
            await verbs.send_switched(link, False, reason=problem)
            return
        self._switch = PendingSwitch(link, req)
        self.watch.request("planned switchover")

    # ---- failover ------------------------------------------------------------------

    def _failover_refused(self, reason: str) -> None:
        self._note(reason)
        self.artifacts.event("failover-refused", reason=reason)

    def _detach(self, *, keep_link: bool) -> None:
        """Take no more primaries (and drop the link, unless a switchover answers on it)."""
        if self._server is not None:
            self._server.close()
        if self.link is not None and not keep_link:
            self.link.close()

    async def _fail_over(self, req: FailoverRequest) -> None:
        """Resume the VM here from the last committed checkpoint (see failover.py).

        Raises:
            FailoverError: no committed checkpoint, or QEMU could not resume it.
        """
        switch, self._switch = self._switch, None
        if not self.life.can(S.FAILING_OVER):
            why = f"cannot fail over from {self.state.value}: {self.reason}"
            if switch is not None:
                await switch.answer(False, reason=why)
            raise FailoverError(why)
        self._failover = Failover(
            self.cfg,
            self.vm,
            self.spec,
            life=self.life,
            artifacts=self.artifacts,
            store=self.store,
            witness=self.watch.witness,
            probe=self.probe,
            before_cont=self._before_cont,
            replay=self.replay,
        )
        took = await self._failover.run(
            req.reason,
            req.detected,
            tiebreak_ms=req.tiebreak_ms,
            switch=switch,
            detach=lambda: self._detach(keep_link=switch is not None),
            generation=req.generation,
        )
        if took is None:
            return  # a switchover the tiebreaker refused: still the standby
        self.io = took.io
        self.handover = took.handover
        if self.handover is not None:
            # Switchover or re-protection: the node runs the primary role on this VM.
            self.handover.guest_events = self.guest.log
            self._stop.set()
            return
        # Running it alone: this host now sees what the guest does.
        self.vm.on_event(self.guest.on_qemu_event)
        if self.watch.witness is not None and not req.operator:
            interval = self.rcfg.heartbeat_interval_ms / 1000
            self._renewer = asyncio.create_task(renew_lease(self.watch.witness, interval))


def _learn_generation(agent: SecondaryAgent) -> None:
    """While the primary's generation is unknown, ask the tiebreaker for it (in the
    background: never in the way of an acknowledgement)."""
    witness = agent.watch.witness
    if witness is None or agent.store.disk is None or agent._learning is not None:
        return
    if not agent.generation.due(agent.generation.clock()):
        return

    async def learn() -> None:
        try:
            gen = await agent.generation.learn(witness)
            if gen is not None and agent.store.disk is not None:
                agent.store.disk.learn_generation(gen)
                agent.artifacts.event("primary-generation", generation=gen)
        finally:
            agent._learning = None

    agent._learning = asyncio.create_task(learn())


async def _ignore(link: Link, msg: wire.Message) -> None:
    """Heartbeats: their arrival is what counts (the watch hears every frame)."""


__all__ = [
    "FailoverReport",
    "Handover",
    "KeptRAM",
    "SecondaryAgent",
    "SecondaryState",
    "replay_nosync",
]
