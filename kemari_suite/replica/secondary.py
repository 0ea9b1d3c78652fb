"""The secondary agent: holds the replica and takes over when the primary is gone.

Life of the secondary::

    WAITING -> RECEIVING (initial synchronization) -> STANDBY (a committed checkpoint held)
    STANDBY --primary lost, tiebreaker won (or `kemari failover`)--> FAILING_OVER -> ACTIVE
    STANDBY --primary lost, tiebreaker lost--> STANDBY (says why; the primary lives on)

The replica is the RAM file QEMU will map on failover. Received pages are written into
it at once, with the old contents of those pages kept in an undo log; an epoch commits
when its end-of-epoch digest verifies (and the previous epoch committed), which drops
the undo log and acknowledges it. A primary that dies mid-epoch leaves an uncommitted
epoch, which is rolled back from the undo log, so the replica is always exactly the last
committed checkpoint when a failover starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kemari_suite.alerts import Alerter
from kemari_suite.config import KemariConfig
from kemari_suite.disk.base import FileDisk
from kemari_suite.errors import (
    ConnectError,
    FailoverError,
    ProtocolError,
    ReplicationError,
)
from kemari_suite.ha.tiebreak import Tiebreaker, make_tiebreaker
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import parse_pages
from kemari_suite.protocol.link import Link, serve
from kemari_suite.replica import compat
from kemari_suite.service.control import ControlServer
from kemari_suite.service.metrics import Artifacts
from kemari_suite.tap import TapMode, replay
from kemari_suite.tap.epochs import ops_to_writes, parse
from kemari_suite.tap.guestio import (
    GuestIO,
    disk_state_path,
    open_disk,
    read_disk_state,
    write_disk_state,
)
from kemari_suite.testing import faults
from kemari_suite.vm.devstate import restore
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.qemu import AsyncVM, VMSpec

log = logging.getLogger(__name__)

PAGE = 4096


class SecondaryState(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"
    STANDBY = "standby"
    FAILING_OVER = "failing-over"
    ACTIVE = "active"
    STOPPED = "stopped"


@dataclass
class OpenEpoch:
    epoch: int
    kind: wire.EpochKind
    digest: wire.EpochDigest
    undo: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    pages: int = 0
    devstate: bytes | None = None
    iologs: list[bytes] = field(default_factory=list)
    #: FULL epoch with the built-in disk: the new copy, renamed over the old at commit.
    next_disk: FileDisk | None = None
    #: FULL epoch resynchronising only dirty blocks: written into the copy in place.
    inplace: bool = False
    lineage: str = ""


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
    #: heartbeat-timeout expiry (or command) -> guest running
    failover_ms: float = 0.0
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
    ) -> None:
        self.cfg = cfg
        self.rcfg = cfg.replication
        if not self.rcfg.key:
            raise ReplicationError("replication.key is empty: refusing an unauthenticated link")
        self.key = self.rcfg.key.encode()
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
        self.state = SecondaryState.WAITING
        self.state_since = time.time()
        self.reason = ""
        self.n_pages = spec.memory_mib * 1024 * 1024 // PAGE
        self.replica: GuestRAM | None = None
        self.committed_epoch = -1
        self.committed_devstate: bytes | None = None
        self.committed_iologs: list[tuple[int, bytes]] = []
        #: The built-in replicated disk: this host's copy, kept at the last committed epoch.
        self.disk: FileDisk | None = None
        self.io: GuestIO | None = None
        self.durable_epoch = -1
        self.open: OpenEpoch | None = None
        self.link: Link | None = None
        self.last_rx = time.monotonic()
        self.report: FailoverReport | None = None
        self.guest_events: list[str] = []
        self._stop = asyncio.Event()
        self._failover_now = asyncio.Event()
        self._failover_reason = ""
        self._server: asyncio.AbstractServer | None = None
        self.control: ControlServer | None = None
        self.witness: Tiebreaker | None = None
        self._apply_lock = asyncio.Lock()
        self.epochs_committed = 0
        #: Result of the protect-time compatibility check (profile, then trial restore).
        self.compat: dict[str, Any] = {}
        self._trial_task: asyncio.Task[None] | None = None
        self._trial_pending = False
        #: A planned switchover in progress: the link to answer on, and its request.
        self._switch: tuple[Link, dict[str, Any]] | None = None
        #: Set after a successful switchover: the node runs the primary role on it.
        self.handover: Handover | None = None

    def _set_state(self, state: SecondaryState, reason: str = "") -> None:
        if state is self.state:
            return
        log.info("secondary: %s -> %s %s", self.state.value, state.value, reason)
        self.state = state
        self.state_since = time.time()
        self.reason = reason
        self.artifacts.event("state", state=state.value, reason=reason)
        self.artifacts.status(self.status_dict())

    def status_dict(self) -> dict[str, Any]:
        return {
            "role": "secondary",
            "vm": self.spec.name,
            "state": self.state.value,
            "protected": self.state is SecondaryState.STANDBY,
            "since": self.state_since,
            "reason": self.reason,
            "last_committed_epoch": self.committed_epoch,
            "epochs_committed": self.epochs_committed,
            "qemu_pid": self.vm.pid,
            "failover": None if self.report is None else self.report.__dict__,
            "guest_events": self.guest_events[-10:],
            "compat": self.compat,
            "alerts": self.artifacts.alert_history(),
        }

    # ---- lifecycle ---------------------------------------------------------------------

    def _prepare_replica(self) -> None:
        path = self.vm.paths.ram
        path.parent.mkdir(parents=True, exist_ok=True)
        size = self.n_pages * PAGE
        with open(path, "wb") as f:
            f.truncate(size)
        self.replica = GuestRAM(path, writable=True)

    async def run(self) -> None:
        """Serve the primary until stopped or failed over (then keep the VM running)."""
        self.vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_replica()
        if self.cfg.disk.path and self.cfg.disk.backend == "builtin":
            self.disk = open_disk(self.cfg)
        self.control = ControlServer(
            self.vm.paths.run_dir / "control.sock",
            {
                "status": self._h_status,
                "failover": self._h_failover,
                "stop": self._h_stop,
                "switchover": self._h_switchover,
                **({"fault": _h_fault} if faults.enabled() else {}),
            },
        )
        await self.control.start()
        self.witness = make_tiebreaker(self.cfg, self.node_id, format_lease=False)
        host, _, port = self.rcfg.listen.rpartition(":")
        self._server = await serve(
            host or "0.0.0.0", int(port), key=self.key, node_id=self.node_id, on_link=self._on_link
        )
        monitor = asyncio.create_task(self._monitor())
        try:
            await self._stop.wait()
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.link is not None:
            self.link.close()
        for task in (self._trial_task, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.replica is not None:
            self.replica.close()
            self.replica = None
        if self.handover is None:
            # After a switchover the VM and its taps live on, in the primary role.
            if self.vm.state.value != "new":
                self.vm.keep_ram = False
                await self.vm.shutdown()
            if self.io is not None:
                await self.io.close()
        if self.disk is not None:
            self.disk.close()
        elif self.handover is None:
            with contextlib.suppress(FileNotFoundError):
                self.vm.paths.ram.unlink()
        if self.control is not None:
            await self.control.close()
        if self.state is not SecondaryState.ACTIVE:
            self._set_state(SecondaryState.STOPPED)
        self.artifacts.status(self.status_dict())
        self.artifacts.close()

    async def _h_status(self, req: dict[str, Any]) -> Any:
        return self.status_dict()

    async def _h_failover(self, req: dict[str, Any]) -> Any:
        if self.state is SecondaryState.ACTIVE:
            return {"already": True, "report": self.report.__dict__ if self.report else None}
        if self.committed_epoch < 0:
            raise FailoverError("no committed checkpoint yet: nothing to fail over to")
        self._failover_reason = "operator command"
        self._failover_now.set()
        # Wait for it to finish so the operator sees the result.
        while self.state is not SecondaryState.ACTIVE:
            if self.state is SecondaryState.STOPPED:
                raise FailoverError(self.reason)
            await asyncio.sleep(0.05)
        return self.report.__dict__ if self.report else {}

    _renewer: asyncio.Task[None] | None = None

    async def _h_switchover(self, req: dict[str, Any]) -> Any:
        raise ReplicationError(
            f"this host is the {self.state.value} standby: run `kemari switchover` on the "
            "host that runs the VM"
        )

    async def _h_stop(self, req: dict[str, Any]) -> Any:
        self._stop.set()
        return {"stopping": True}

    # ---- receiving ---------------------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        """One primary connection; a new one replaces (and rolls back) the previous."""
        if self.state in (SecondaryState.FAILING_OVER, SecondaryState.ACTIVE):
            with contextlib.suppress(Exception):
                await link.send(wire.Bye(reason=f"secondary is {self.state.value}"))
            link.close()
            return
        if self.link is not None:
            self.link.close()
        async with self._apply_lock:
            self._rollback("a new primary connection")
        self.link = link
        self.last_rx = time.monotonic()
        self.artifacts.event("primary-connected", peer=link.peer)
        state = read_disk_state(self.cfg) if self.disk is not None else {}
        with contextlib.suppress(ConnectionError, ProtocolError):
            await link.send(wire.Command(name="disk-state", args=json.dumps(state)))
        hb = asyncio.create_task(self._heartbeat_sender(link))
        try:
            while True:
                msg = await link.recv()
                self.last_rx = time.monotonic()
                await self._handle(link, msg)
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
            async with self._apply_lock:
                self._rollback("the primary connection ended mid-epoch")
            if self.committed_epoch < 0 and self.state is SecondaryState.RECEIVING:
                self._set_state(
                    SecondaryState.WAITING,
                    "the primary was lost during the initial synchronization: "
                    "no committed checkpoint to resume",
                )

    async def _handle(self, link: Link, msg: wire.Message) -> None:
        if isinstance(msg, wire.Heartbeat):
            return
        if isinstance(msg, wire.GuestEvent):
            self.guest_events.append(msg.name)
            self.artifacts.event("guest", name=msg.name, data=msg.data)
            if msg.name in ("SHUTDOWN", "GUEST_PANICKED"):
                # The guest stopped itself on the primary: never resume it here.
                self._set_state(
                    SecondaryState.STOPPED,
                    f"the guest reported {msg.name} on the primary: not failing over",
                )
            return
        if isinstance(msg, wire.Bye):
            raise ConnectionError(f"primary said goodbye: {msg.reason}")
        if isinstance(msg, wire.Command) and msg.name == "disk-copy":
            async with self._apply_lock:
                self._disk_copy(msg.args)
            return
        if isinstance(msg, wire.Command) and msg.name == "vm-profile":
            await self._check_profile(link, msg.args)
            return
        if isinstance(msg, wire.Command) and msg.name == "switchover":
            await self._switchover_request(link, msg.args)
            return
        if isinstance(msg, wire.Command) and msg.name == "durable":
            # The primary's disk holds every write through this epoch: drop those logs.
            with contextlib.suppress(ValueError):
                self.durable_epoch = max(self.durable_epoch, int(msg.args))
                self.committed_iologs = [
                    (e, d) for e, d in self.committed_iologs if e > self.durable_epoch
                ]
            return
        async with self._apply_lock:
            if isinstance(msg, wire.EpochBegin):
                self._begin(msg)
            elif isinstance(msg, wire.Pages):
                ep = self._expect_open(msg.epoch)
                ep.digest.update(msg)
                batch = await asyncio.to_thread(parse_pages, msg.encoded, self.n_pages)
                assert self.replica is not None
                rows = self.replica.pages[batch.indices.astype(np.intp)]
                ep.undo.append((batch.indices.astype(np.intp), rows))
                faults.hit("secondary-apply")
                batch.apply_to(self.replica.pages)
                ep.pages += len(batch.indices)
            elif isinstance(msg, wire.DeviceState):
                ep = self._expect_open(msg.epoch)
                ep.digest.update(msg)
                ep.devstate = bytes(msg.data)
            elif isinstance(msg, wire.IOLog):
                ep = self._expect_open(msg.epoch)
                ep.digest.update(msg)
                data = bytes(msg.data)
                if data:
                    ep.iologs.append(data)
                    target = ep.next_disk or (self.disk if ep.inplace else None)
                    if target is not None:
                        # A disk copy goes straight into its file as it arrives.
                        await asyncio.to_thread(replay_nosync, target, data)
            elif isinstance(msg, wire.EpochEnd):
                self._commit(msg)
                if self._trial_pending:
                    # Copy the replica now, inside the lock, so the copy is exactly
                    # this committed checkpoint; the trial itself runs beside the link.
                    self._trial_pending = False
                    await self._start_trial(link)
                await link.send(wire.Ack(epoch=msg.epoch))
            else:
                raise ProtocolError(f"unexpected message {type(msg).__name__}")

    # ---- compatibility check -------------------------------------------------------

    async def _check_profile(self, link: Link, args: str) -> None:
        """Compare the primary's VM with ours; refuse with the differing fields."""
        try:
            theirs = json.loads(args)
            if not isinstance(theirs, dict):
                raise ValueError("not an object")
        except ValueError as err:
            raise ProtocolError(f"bad vm-profile command: {err}") from err
        cmp = compat.compare(theirs, compat.vm_profile(self.cfg, self.spec))
        self.compat = {"profile": "ok" if cmp.ok else "refused", "differences": cmp.differences}
        if cmp.notes:
            self.compat["notes"] = cmp.notes
        if not cmp.ok:
            reason = "; ".join(cmp.differences)
            self.artifacts.event("compat-refused", stage="profile", reason=reason)
            self.reason = f"cannot run the primary's VM: {reason}"
            await link.send(
                wire.Command(
                    name="compat",
                    args=json.dumps({"ok": False, "stage": "profile", "reason": reason}),
                )
            )
            raise ConnectionError(f"VM mismatch: {reason}")
        await link.send(
            wire.Command(
                name="compat",
                args=json.dumps({"ok": True, "stage": "profile", "notes": cmp.notes}),
            )
        )
        self._trial_pending = True

    async def _start_trial(self, link: Link) -> None:
        assert self.committed_devstate is not None
        copy = compat.trial_ram_path(self.cfg, self.spec)
        devstate = self.committed_devstate
        # The replica is a shared mapping of this file: the copy sees every applied page.
        # Off the event loop (heartbeats go on); the caller's apply lock keeps it still.
        await asyncio.to_thread(compat.copy_replica, self.vm.paths.ram, copy)

        async def trial() -> None:
            try:
                verdict = await compat.run_trial(self.cfg, self.spec, devstate)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    copy.unlink()
            self.compat["restore"] = verdict
            self.artifacts.event("compat", **verdict)
            if not verdict["ok"]:
                self.reason = f"trial restore failed: {verdict['reason']}"
            with contextlib.suppress(Exception):
                await link.send(wire.Command(name="compat", args=json.dumps(verdict)))

        self._trial_task = asyncio.create_task(trial())

    # ---- planned switchover ----------------------------------------------------------

    async def _switchover_request(self, link: Link, args: str) -> None:
        """The primary stopped its VM at a committed checkpoint and hands it over."""
        try:
            req = json.loads(args)
            epoch = int(req["epoch"])
        except (ValueError, KeyError, TypeError) as err:
            raise ProtocolError(f"bad switchover command: {err}") from err
        problem = ""
        if self.state is not SecondaryState.STANDBY:
            problem = f"this host is {self.state.value}, not standby"
        elif self.committed_epoch != epoch:
            problem = f"this host committed epoch {self.committed_epoch}, not {epoch}"
        elif not self.rcfg.peer:
            problem = (
                "replication.peer is not set on this host: it could not protect the VM "
                "after the switch"
            )
        elif self.compat.get("restore", {}).get("ok") is False:
            problem = f"the trial restore failed here: {self.compat['restore'].get('reason')}"
        if problem:
            self.artifacts.event("switchover-refused", reason=problem)
            await link.send(
                wire.Command(name="switched", args=json.dumps({"ok": False, "reason": problem}))
            )
            return
        self._switch = (link, req)
        self._failover_reason = "planned switchover"
        self._failover_now.set()

    async def _answer_switch(self, ok: bool, **info: Any) -> None:
        if self._switch is None:
            return
        link, _req = self._switch
        with contextlib.suppress(Exception):
            await link.send(wire.Command(name="switched", args=json.dumps({"ok": ok, **info})))

    def _begin(self, msg: wire.EpochBegin) -> None:
        if msg.page_size != PAGE or msg.ram_size != self.n_pages * PAGE:
            raise ReplicationError(
                f"primary's RAM is {msg.ram_size} bytes in {msg.page_size}-byte pages, "
                f"this secondary expects {self.n_pages * PAGE} in {PAGE}: configs differ",
                msg.epoch,
            )
        if self.open is not None:
            raise ProtocolError(f"epoch {msg.epoch} begun while {self.open.epoch} is open")
        if msg.kind is not wire.EpochKind.FULL and msg.epoch != self.committed_epoch + 1:
            raise ReplicationError(
                f"delta epoch {msg.epoch} does not follow committed {self.committed_epoch}",
                msg.epoch,
            )
        if msg.kind is wire.EpochKind.FULL:
            self._set_state(SecondaryState.RECEIVING, f"full synchronization, epoch {msg.epoch}")
        self.open = OpenEpoch(msg.epoch, msg.kind, wire.EpochDigest(msg.epoch))

    def _disk_copy(self, args: str) -> None:
        """The primary starts copying the disk in the open FULL epoch."""
        try:
            req = json.loads(args)
            mode, lineage = str(req["mode"]), str(req["lineage"])
        except (ValueError, KeyError, TypeError) as err:
            raise ProtocolError(f"bad disk-copy command: {err}") from err
        ep = self.open
        if ep is None or ep.kind is not wire.EpochKind.FULL:
            raise ProtocolError("disk copy outside a FULL epoch")
        if self.disk is None:
            raise ReplicationError("the primary copies a disk, this secondary has none", ep.epoch)
        ep.lineage = lineage
        if mode == "incremental":
            # Written in place: until this epoch commits the copy is neither old nor
            # new, so it must not count as anybody's copy.
            self._write_disk_state("", -1)
            ep.inplace = True
        else:
            nxt = self._next_disk_path()
            with open(nxt, "wb") as f:
                f.truncate(self.disk.size)
            ep.next_disk = FileDisk(nxt)
            ep.next_disk.attach()
        self.artifacts.event("disk-copy", mode=mode, epoch=ep.epoch)

    def _expect_open(self, epoch: int) -> OpenEpoch:
        if self.open is None or self.open.epoch != epoch:
            have = None if self.open is None else self.open.epoch
            raise ProtocolError(f"data for epoch {epoch} while epoch {have} is open")
        return self.open

    def _commit(self, msg: wire.EpochEnd) -> None:
        ep = self._expect_open(msg.epoch)
        if ep.devstate is None:
            raise ReplicationError("epoch ended without device state", msg.epoch)
        # Raises ProtocolError on a mismatch: the epoch is rolled back, never applied.
        ep.digest.verify(msg)
        # n_pages counts the stop-time pages; pre-copied ones come on top.
        if ep.pages < msg.n_pages:
            raise ReplicationError(
                f"epoch claims {msg.n_pages} pages, {ep.pages} arrived", msg.epoch
            )
        # Committed: the undo log is no longer needed.
        self.committed_epoch = ep.epoch
        self.committed_devstate = ep.devstate
        if ep.next_disk is not None and self.disk is not None:
            # The new full copy replaces the old one in one rename.
            ep.next_disk.flush()
            ep.next_disk.close()
            self.disk.close()
            os.replace(self._next_disk_path(), self.cfg.disk.path)
            self.disk = FileDisk(self.cfg.disk.path)
            self.disk.attach()
        elif self.disk is not None and ep.iologs and not ep.inplace:
            # Applied before the acknowledgement: the copy is always at the last
            # committed epoch (the page cache survives an agent crash).
            for data in ep.iologs:
                replay_nosync(self.disk, data)
        elif ep.iologs and self.disk is None:
            self.committed_iologs.extend((ep.epoch, d) for d in ep.iologs)
        if self.disk is not None:
            self._write_disk_state(ep.lineage or self._disk_lineage, ep.epoch)
        self.open = None
        self.epochs_committed += 1
        if self._commit_probe is not None:
            self._record_commit_probe(ep.epoch)
        self._persist_devstate(ep.devstate)
        if self.state is not SecondaryState.STANDBY:
            self._set_state(SecondaryState.STANDBY, f"committed epoch {ep.epoch}")

    #: With KEMARI_COMMIT_PROBES=stream (tests), every commit records the wall time and
    #: the guest's stream probe as read from the replica: independent evidence of what
    #: the committed state may have sent.
    _commit_probe: bytes | None = (
        b"KEMARI-STREAM!!!" if os.environ.get("KEMARI_COMMIT_PROBES") == "stream" else None
    )
    _probe_offset: int | None = None
    _probe_file: Any = None

    def _record_commit_probe(self, epoch: int) -> None:
        from kemari_suite.vm import guestmem

        assert self.replica is not None and self._commit_probe is not None
        pages = self.replica.pages
        value = None
        if self._probe_offset is not None:
            value = guestmem.read_value(pages, self._probe_offset, self._commit_probe)
        if value is None:
            hits = guestmem.locate_probes(pages, self._commit_probe)
            if hits:
                best = max(hits, key=lambda h: h.value)
                self._probe_offset, value = best.offset, best.value
        if self._probe_file is None:
            self._probe_file = (self.artifacts.root / "commits.jsonl").open("a", buffering=1)
        self._probe_file.write(
            json.dumps({"epoch": epoch, "t": time.time(), "probe": value}) + "\n"
        )

    def _next_disk_path(self) -> str:
        return self.cfg.disk.path + ".next"

    _disk_lineage = ""

    def _write_disk_state(self, lineage: str, epoch: int) -> None:
        """Which copy this disk is (lineage) and through which epoch (applied)."""
        self._disk_lineage = lineage
        write_disk_state(self.cfg, lineage, epoch)

    def _persist_devstate(self, data: bytes) -> None:
        path = self.vm.paths.run_dir / "devstate.committed"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _rollback(self, why: str) -> None:
        ep = self.open
        if ep is None:
            return
        assert self.replica is not None
        for idx, rows in reversed(ep.undo):
            self.replica.pages[idx] = rows
        if ep.next_disk is not None:
            ep.next_disk.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._next_disk_path())
        self.artifacts.event("rollback", epoch=ep.epoch, pages=ep.pages, reason=why)
        self.open = None

    async def _heartbeat_sender(self, link: Link) -> None:
        seq = 0
        interval = self.rcfg.heartbeat_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            seq += 1
            try:
                await link.send(
                    wire.Heartbeat(seq=seq, sent_ns=time.time_ns(), role_state=self.state.value)
                )
            except (ConnectionError, OSError):
                return

    # ---- failover ----------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Watch the heartbeat; decide and run the failover."""
        timeout = self.rcfg.heartbeat_timeout_ms / 1000
        interval = self.rcfg.heartbeat_interval_ms / 1000
        refused_logged = ""
        while True:
            try:
                await asyncio.wait_for(self._failover_now.wait(), interval / 2)
                detected = time.time()
                reason = self._failover_reason
                await self._failover(reason, detected, operator=True)
                if self.state is SecondaryState.STANDBY:
                    continue  # a switchover the tiebreaker refused: still the standby
                return
            except TimeoutError:
                pass
            if self.state is not SecondaryState.STANDBY:
                continue
            silent = time.monotonic() - self.last_rx
            if silent < timeout:
                refused_logged = ""
                continue
            detected = time.time() - (silent - timeout)
            reason = f"no frame from the primary for {silent:.1f} s (timeout {timeout:.1f} s)"
            if self.rcfg.tiebreaker == "none":
                if not refused_logged:
                    refused_logged = "none"
                    self.reason = f"{reason}; no tiebreaker: waiting for `kemari failover`"
                    self.artifacts.event("failover-refused", reason=self.reason)
                continue
            if self.witness is None:
                continue
            t0 = time.monotonic()
            try:
                d = await self.witness.ask("takeover")
            except ConnectError as err:
                why = f"witness unreachable: {err}"
                if refused_logged != why:
                    refused_logged = why
                    self.reason = f"{reason}; {why}: not failing over"
                    self.artifacts.event("failover-refused", reason=self.reason)
                continue
            if not d.granted:
                if refused_logged != d.reason:
                    refused_logged = d.reason
                    self.reason = f"{reason}; tiebreaker refused: {d.reason}"
                    self.artifacts.event("failover-refused", reason=self.reason)
                continue
            # The loser stops its guest before its lease view runs out; give it one more
            # heartbeat interval of margin on top of the witness's own expiry.
            await asyncio.sleep(interval)
            tiebreak_ms = (time.monotonic() - t0) * 1e3
            await self._failover(reason, detected, tiebreak_ms=tiebreak_ms)
            return

    async def _failover(
        self, reason: str, detected: float, *, tiebreak_ms: float = 0.0, operator: bool = False
    ) -> None:
        """Resume the VM here from the last committed checkpoint.

        Raises:
            FailoverError: no committed checkpoint, or QEMU could not resume it.
        """
        switching = self._switch is not None
        if switching and self.witness is not None:
            # The primary released the lease before asking: take it, or refuse.
            try:
                d = await self.witness.ask("takeover")
                granted, why = d.granted, d.reason
            except ConnectError as err:
                granted, why = False, f"tiebreaker unreachable: {err}"
            if not granted:
                self.artifacts.event("switchover-refused", reason=why)
                await self._answer_switch(False, reason=f"tiebreaker refused: {why}")
                self._switch = None
                self._failover_now.clear()
                return
        self._set_state(SecondaryState.FAILING_OVER, reason)
        if self._server is not None:
            self._server.close()
        if self.link is not None and not switching:
            self.link.close()
        async with self._apply_lock:
            self._rollback("failover")
            if self.committed_devstate is None:
                self._set_state(SecondaryState.STOPPED, "no committed checkpoint to resume")
                raise FailoverError("no committed checkpoint to resume")
            epoch = self.committed_epoch
            devstate = self.committed_devstate
            report = FailoverReport(reason=reason, epoch=epoch, detected_at=detected)
            report.tiebreak_ms = tiebreak_ms
            assert self.replica is not None
            if self.probe is not None:
                with contextlib.suppress(Exception):
                    report.probes = self.probe(self.replica.pages)
            self.replica.close()
            self.replica = None
        t0 = time.monotonic()
        try:
            await self._disk_for_failover()
            self.io = GuestIO(
                self.cfg,
                self.vm.paths,
                epoch_source=lambda: 0,
                on_event=None,
                mode=TapMode.UNPROTECTED,
            )
            self.vm.spec = await self.io.start(self.spec)
            await self.vm.start()
            t1 = time.monotonic()
            report.start_ms = (t1 - t0) * 1e3
            report.restore_ms = (
                await restore(self.vm, devstate, self.vm.paths.run_dir / "in.sock") * 1e3
            )
            t2 = time.monotonic()
            await self.vm.execute("cont")
            report.cont_ms = (time.monotonic() - t2) * 1e3
            report.failover_ms = (time.time() - detected) * 1e3
            with contextlib.suppress(Exception):
                await self.vm.execute(
                    "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
                )
        except Exception as err:
            self._set_state(SecondaryState.STOPPED, f"failover failed: {err}")
            self.artifacts.event("failover-failed", reason=str(err))
            if switching:
                # Give the lease back so the old primary can resume its stopped VM.
                if self.witness is not None:
                    with contextlib.suppress(Exception):
                        await self.witness.ask("release")
                await self._answer_switch(False, reason=f"resume failed here: {err}")
                if self.link is not None:
                    self.link.close()
            raise FailoverError(f"could not resume epoch {epoch}: {err}") from err
        self.report = report
        self.vm.keep_ram = False
        self.artifacts.event("failover", **report.__dict__)
        self._set_state(SecondaryState.ACTIVE, f"resumed epoch {epoch}: {reason}")
        if switching:
            assert self._switch is not None
            lineage = str(self._switch[1].get("lineage", ""))
            await self._answer_switch(True, epoch=epoch, resume_ms=report.failover_ms)
            if self.link is not None:
                self.link.close()
            if self.io is not None and self.io.disk is not None:
                # Both copies hold epoch ``epoch``: what this host writes from now on is
                # what the old primary, as the next standby, will need.
                self.io.lineage = lineage
                self.io.acked_at_loss = epoch
                self.io.disk.tracking = True
            self.handover = Handover(vm=self.vm, io=self.io, epoch=epoch, lineage=lineage)
            self._stop.set()
            return
        if self.rcfg.reprotect and self.rcfg.peer:
            # Protect it again from here: the node runs the primary role on this VM,
            # which renews the lease and waits for a standby at ``peer``.
            self.handover = Handover(vm=self.vm, io=self.io, epoch=epoch, lineage="", report=report)
            self._stop.set()
            return
        if self.witness is not None and not operator:
            self._renewer = asyncio.create_task(self._renew_forever())

    async def _disk_for_failover(self) -> None:
        """Bring the disk to the last committed epoch before the guest resumes."""
        if self.disk is not None:
            state = read_disk_state(self.cfg)
            if state.get("epoch") != self.committed_epoch or not state.get("lineage"):
                # Memory at one checkpoint and the disk at another: resuming would show
                # the guest a disk it never wrote. Refuse, loudly.
                raise FailoverError(
                    f"the disk copy {self.cfg.disk.path} is at epoch {state.get('epoch')} "
                    f"(lineage {state.get('lineage') or 'none'}), memory at epoch "
                    f"{self.committed_epoch}: diverged copies, not resuming"
                )
            # From here on this copy diverges from any primary's: it is nobody's replica.
            with contextlib.suppress(FileNotFoundError):
                disk_state_path(self.cfg).unlink()
            await asyncio.to_thread(self.disk.flush)
            self.disk.close()
            self.disk = None
        elif self.cfg.disk.path and self.committed_iologs:
            # Shared storage: replay what was committed but maybe not yet applied by the
            # primary (writes are idempotent).
            disk = open_disk(self.cfg)
            assert disk is not None
            try:
                await asyncio.to_thread(replay, disk, [d for _e, d in self.committed_iologs])
            finally:
                disk.close()
            self.artifacts.event("disk-replayed", epochs=len(self.committed_iologs))

    async def _renew_forever(self) -> None:
        assert self.witness is not None
        while True:
            with contextlib.suppress(ConnectError):
                await self.witness.ask("renew")
            await asyncio.sleep(self.rcfg.heartbeat_interval_ms / 1000)


async def _h_fault(req: dict[str, Any]) -> Any:
    """Arm a fault-injection point (only with KEMARI_FAULTS=1)."""
    try:
        faults.arm(str(req["point"]), int(req.get("count", 1)), str(req.get("target", "")))
    except (KeyError, ValueError) as err:
        raise ReplicationError(f"bad fault request: {err}") from err
    return {"armed": req["point"]}


def replay_nosync(disk: FileDisk, data: bytes) -> None:
    """Apply one I/O log to ``disk`` without flushing (the caller flushes when it must)."""
    writes = ops_to_writes(parse(data).ops)
    if writes:
        disk.apply(writes)
