"""The primary agent: runs the protected VM and replicates it at every sync point.

Life of the primary::

    STARTING -> SYNCING (initial pre-copy, first checkpoint) -> PROTECTED
    PROTECTED --secondary lost, tiebreaker won--> UNPROTECTED --secondary back--> SYNCING
    PROTECTED --secondary lost, no tiebreaker--> HELD (output held; operator decides)
    any --tiebreaker lost--> FENCED (QEMU stopped)      any --> STOPPED

A sync point, inside the stopped window: ``stop`` -> capture device state -> find dirty
pages and copy them into the preallocated staging buffer -> ``cont`` (speculative mode;
classic mode stays stopped until the acknowledgement). Encoding and sending happen after
the resume, on a worker thread. The epoch number switches only while the VM is stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from kemari_suite.checkpoint.tracker import CompareTracker, DirtyTracker, make_tracker
from kemari_suite.config import KemariConfig
from kemari_suite.errors import (
    ConnectError,
    FailoverError,
    ProtocolError,
    ReplicationError,
)
from kemari_suite.ha.tiebreak import Tiebreaker, make_tiebreaker
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.link import Link, connect
from kemari_suite.replica import compat
from kemari_suite.service.control import ControlServer
from kemari_suite.service.metrics import Artifacts, CheckpointMetrics, qemu_pause
from kemari_suite.tap import TapMode
from kemari_suite.tap import epochs as iolog
from kemari_suite.tap.guestio import GuestIO, make_scheduler, write_disk_state
from kemari_suite.testing import faults
from kemari_suite.vm.devstate import DeviceStateCapturer, enable_ignore_shared
from kemari_suite.vm.guestram import GuestRAM
from kemari_suite.vm.qemu import AsyncVM, VMSpec

log = logging.getLogger(__name__)

PAGE = 4096
#: Pages per Pages frame; bounds frame size and lets heartbeats interleave.
BATCH_PAGES = 4096
#: Pre-copy stops iterating when a round finds fewer dirty pages than this.
PRECOPY_CONVERGED = 2048
PRECOPY_MAX_ROUNDS = 8
#: Pipelining pre-copies between sync points only when the last epoch was this dirty.
PRECOPY_MIN_PAGES = 256
#: How long the secondary may take to report its trial restore before protection.
COMPAT_TIMEOUT_S = 120.0
#: Scan guest RAM while QEMU captures the device state (compare tracker). The switch is
#: for A/B measurements (KEMARI_OVERLAP_SCAN=0).
OVERLAP_SCAN = os.environ.get("KEMARI_OVERLAP_SCAN", "1") != "0"


class PrimaryState(enum.Enum):
    STARTING = "starting"
    SYNCING = "syncing"
    PROTECTED = "protected"
    UNPROTECTED = "unprotected"
    HELD = "held"
    FENCED = "fenced"
    #: A planned switchover handed the VM to the peer; this host becomes its standby.
    SWITCHED = "switched-over"
    STOPPED = "stopped"


@dataclass
class EpochWaiter:
    """Resolved when the epoch is acknowledged (or fails with ReplicationError)."""

    epoch: int
    future: asyncio.Future[int]


@dataclass
class PrimaryStatus:
    state: PrimaryState = PrimaryState.STARTING
    state_since: float = field(default_factory=time.time)
    epoch: int = 0
    last_committed_epoch: int = -1
    checkpoints: int = 0
    peer: str = ""
    reason: str = ""


class PrimaryAgent:
    """Owns QEMU, the guest RAM mapping, the tracker and the link to the secondary."""

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
        if not self.rcfg.key:
            raise ReplicationError("replication.key is empty: refusing an unauthenticated link")
        self.key = self.rcfg.key.encode()
        self.spec = spec
        self.node_id = node_id
        self.vm = AsyncVM(spec, run_root=cfg.paths.run_dir, shm_dir=cfg.paths.shm_dir)
        self.artifacts = Artifacts(
            artifacts or (self.vm.paths.run_dir.parent / f"{spec.name}-artifacts")
        )
        # Raises ConfigError for a hook that does not exist: before anything starts.
        self.artifacts.alerter = Alerter(cfg.alerts, vm=spec.name, node=node_id)
        self.status = PrimaryStatus()
        self.on_state = on_state
        self.ram: GuestRAM | None = None
        self.tracker: DirtyTracker | None = None
        self.capturer: DeviceStateCapturer | None = None
        self.link: Link | None = None
        self.encoder = PageEncoder(
            self.rcfg.compression if self.rcfg.compression != "none" else "none"
        )
        self._sync_lock = asyncio.Lock()
        self._waiters: dict[int, EpochWaiter] = {}
        self._sync_requested = asyncio.Event()
        self._stop = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._last_sync = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self.witness: Tiebreaker | None = None
        self.io_log_provider: Callable[[int], bytes] | None = None
        self.sched = make_scheduler(cfg)
        self._peer_disk: dict[str, Any] = {}
        self._peer_disk_event = asyncio.Event()
        self._resync: dict[str, Any] = {}
        self.io: GuestIO | None = None
        self.control: ControlServer | None = None
        self._last_rx = time.monotonic()
        #: The secondary's verdict on running this VM (profile check, trial restore).
        self.compat: dict[str, Any] = {}
        self._compat_event = asyncio.Event()
        self._profile_event = asyncio.Event()
        self._compat_refused = ""
        #: A switchover the operator asked for, and the secondary's answer to it.
        self._switch_req: asyncio.Future[dict[str, Any]] | None = None
        self._switch_reply: asyncio.Future[dict[str, Any]] | None = None
        #: "stopped", or "standby" after a switchover (the node then runs the standby).
        self.outcome = "stopped"
        self._witness_task: asyncio.Task[None] | None = None
        #: The stop-time scan's own thread (never queued behind other executor work).
        self._scan_exec = concurrent.futures.ThreadPoolExecutor(1, "kemari-stopscan")

    # ---- state -------------------------------------------------------------------------

    def _set_state(self, state: PrimaryState, reason: str = "") -> None:
        if state is self.status.state:
            return
        log.info("primary: %s -> %s %s", self.status.state.value, state.value, reason)
        self.status.state = state
        self.status.state_since = time.time()
        self.status.reason = reason
        self.artifacts.event("state", state=state.value, reason=reason)
        if self.on_state is not None:
            self.on_state(state, reason)

    def status_dict(self) -> dict[str, Any]:
        s = self.status
        return {
            "role": "primary",
            "vm": self.spec.name,
            "state": s.state.value,
            "protected": s.state is PrimaryState.PROTECTED,
            "since": s.state_since,
            "reason": s.reason,
            "epoch": s.epoch,
            "last_committed_epoch": s.last_committed_epoch,
            "checkpoints": s.checkpoints,
            "peer": self.rcfg.peer,
            "qemu_pid": self.vm.pid,
            "mode": self.rcfg.mode,
            "tracker": self.tracker.name if self.tracker else None,
            "disk_resync": self._resync,
            "io": self.io.status() if self.io is not None else None,
            "compat": self.compat,
            "alerts": self.artifacts.alert_history(),
            "failover": self.failover_report,
        }

    # ---- lifecycle ---------------------------------------------------------------------

    async def start_vm(self) -> None:
        """Boot the VM and map its RAM (before protection starts)."""
        self.io = GuestIO(
            self.cfg,
            self.vm.paths,
            epoch_source=lambda: self.status.epoch,
            on_event=self.sched.notify,
            mode=TapMode.UNPROTECTED,
            on_durable=self._on_durable,
        )
        self.vm.paths.run_dir.mkdir(parents=True, exist_ok=True)
        self.vm.spec = await self.io.start(self.spec)
        self.spec = self.vm.spec
        await self.vm.start()
        await self._attach()

    async def adopt(
        self, vm: AsyncVM, io: GuestIO | None, epoch: int, failover: dict[str, Any] | None = None
    ) -> None:
        """Take over a VM this host already runs (a standby's, after a switchover or,
        with ``replication.reprotect``, after a failover: ``failover`` is its report)."""
        self.failover_report = failover
        self.vm = vm
        self.spec = vm.spec
        self.io = io
        if io is not None:
            io.rebind(
                epoch_source=lambda: self.status.epoch,
                on_event=self.sched.notify,
                on_durable=self._on_durable,
            )
        self.status.epoch = epoch
        self.status.last_committed_epoch = epoch
        await self._attach()

    async def _attach(self) -> None:
        """Map the running VM's RAM and set up the tracker and the capturer."""
        self.io_log_provider = self.io.io_log if self.io is not None else None
        await enable_ignore_shared(self.vm)
        n_pages = self.spec.memory_mib * 1024 * 1024 // PAGE
        self.ram = GuestRAM(self.vm.paths.ram)
        self.tracker = make_tracker(
            self.rcfg.tracker,
            n_pages=n_pages,
            qemu_pid=self.vm.pid,
            ram_path=self.vm.paths.ram,
            # Two threads for the stop-time scan: the vCPUs are idle then.
            threads=2,
        )
        # Preallocated and touched once: no fresh allocation inside the stopped window.
        self._staging = np.ones((n_pages, PAGE), dtype=np.uint8)
        self._prev = np.ones((n_pages, PAGE), dtype=np.uint8)
        self._idx = np.zeros(n_pages, dtype=np.int64)
        self.capturer = DeviceStateCapturer(self.vm, self.vm.paths.migration_socket)
        self.vm.on_event(self._on_qemu_event)

    async def run(self) -> None:
        """Protect the VM until stopped. Raises FailoverError when fenced."""
        self.control = ControlServer(
            self.vm.paths.run_dir / "control.sock",
            {
                "status": self._h_status,
                "checkpoint": self._h_checkpoint,
                "stop": self._h_stop,
                "switchover": self._h_switchover,
                **({"fault": _h_fault} if faults.enabled() else {}),
            },
        )
        await self.control.start()
        self.witness = make_tiebreaker(self.cfg, self.node_id, format_lease=True)
        if self.witness is not None:
            self._witness_task = asyncio.create_task(self._witness_loop())
            self._tasks.append(self._witness_task)
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
                    lost = self._lost_reason if self._link_lost.is_set() else ""
                    await self._secondary_lost(lost or str(err))
                    # Reconnect (re-protect) when a secondary comes back; a secondary
                    # that cannot run this VM will not change its mind every second.
                    await self._sleep_or_stop(15.0 if self._compat_refused else 1.0)
        finally:
            await self.shutdown()
        if self.status.state is PrimaryState.FENCED:
            raise FailoverError(f"this host stopped its VM: {self.status.reason}")

    async def _random_fault(self, delay: float) -> None:
        while self.status.state is not PrimaryState.PROTECTED:
            await asyncio.sleep(0.05)
        await asyncio.sleep(delay)
        faults.die("random")

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def shutdown(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._fail_waiters("agent stopping")
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.send(wire.Bye(reason="primary stopping"))
            self.link.close()
        if self.capturer is not None:
            self.capturer.close()
        self._scan_exec.shutdown(wait=False)
        if self.ram is not None:
            self.ram.close()
            self.ram = None
        await self.vm.shutdown()
        if self.io is not None:
            await self.io.close()
        if (
            self.outcome == "standby"
            and self.io is not None
            and self.io.disk is not None
            and self.cfg.disk.backend == "builtin"
            and self.io.lineage
        ):
            # This copy is the peer's as of the switchover: the next protection sends
            # only what the peer wrote since.
            write_disk_state(self.cfg, self.io.lineage, self._switched_epoch)
        if self.control is not None:
            await self.control.close()
        if self.status.state not in (PrimaryState.FENCED, PrimaryState.SWITCHED):
            self._set_state(PrimaryState.STOPPED)
        self.artifacts.status(self.status_dict())
        self.artifacts.close()

    # ---- control handlers --------------------------------------------------------------

    async def _h_status(self, req: dict[str, Any]) -> Any:
        return self.status_dict()

    async def _h_checkpoint(self, req: dict[str, Any]) -> Any:
        epoch = await self.request_sync("command", wait=True)
        return {"epoch": epoch}

    async def _h_stop(self, req: dict[str, Any]) -> Any:
        self._stop.set()
        return {"stopping": True}

    async def _h_switchover(self, req: dict[str, Any]) -> Any:
        """Hand the VM to the secondary at a checkpoint; this host becomes the standby."""
        if self.status.state is not PrimaryState.PROTECTED:
            raise ReplicationError(
                f"not protected ({self.status.state.value}): a switchover needs a standby "
                "holding a current checkpoint"
            )
        if self._switch_req is not None:
            raise ReplicationError("a switchover is already in progress")
        self._switch_req = asyncio.get_running_loop().create_future()
        self._pending_reason = "switchover"
        self._sync_requested.set()
        try:
            return await self._switch_req
        finally:
            self._switch_req = None

    async def _switchover(self) -> bool:
        """Run the switchover asked for; True if the VM now runs on the peer.

        The VM stops at a sync point and is never resumed here once the secondary has
        it: the secondary resumes exactly the checkpoint this host stopped at, so
        nothing the guest did is lost, and the guest pauses for about one sync point
        plus the secondary's resume.
        """
        assert self._switch_req is not None and self.link is not None
        result = self._switch_req
        t0 = time.monotonic()
        epoch = self.status.epoch
        try:
            await self._sync_point("switchover", resume=False)
            # The final epoch's writes are on our disk and its output is out.
            if self.io is not None:
                await asyncio.wait_for(self.io.released(epoch), 30)
                if self.io.disk is not None:
                    await asyncio.to_thread(self.io.disk.flush)
        except (ReplicationError, TimeoutError) as err:
            await self.vm.execute("cont")
            if not result.done():
                result.set_exception(ReplicationError(f"switchover aborted: {err}"))
            raise ReplicationError(f"switchover aborted: {err}") from err
        t_stopped = time.monotonic()
        # Let the peer take the lease at once: stop renewing it, then release it.
        if self._witness_task is not None:
            self._witness_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._witness_task
        if self.witness is not None:
            with contextlib.suppress(ConnectError):
                await self.witness.ask("release")
        self._switch_reply = asyncio.get_running_loop().create_future()
        lineage = self.io.lineage if self.io is not None else ""
        reply: dict[str, Any]
        try:
            await self.link.send(
                wire.Command(
                    name="switchover", args=json.dumps({"epoch": epoch, "lineage": lineage})
                )
            )
            reply = await asyncio.wait_for(self._switch_reply, 60)
        except (TimeoutError, ConnectionError, OSError) as err:
            reply = {"ok": None, "reason": f"no answer from the secondary: {err or 'timeout'}"}
        finally:
            self._switch_reply = None
        if reply.get("ok"):
            info = {
                "switched": True,
                "epoch": epoch,
                "stop_ms": round((t_stopped - t0) * 1e3, 1),
                "pause_ms": round((time.monotonic() - t0) * 1e3, 1),
                "peer_resume_ms": reply.get("resume_ms"),
            }
            self.artifacts.event("switchover", **info)
            self.outcome = "standby"
            self._switched_epoch = epoch
            self._set_state(PrimaryState.SWITCHED, f"the VM runs on {self.rcfg.peer} now")
            self._stop.set()
            if not result.done():
                result.set_result(info)
            return True
        why = str(reply.get("reason", "refused"))
        if reply.get("ok") is None and self.witness is None:
            # Unknown outcome and nobody to ask: the peer may be running the guest.
            self._set_state(
                PrimaryState.HELD, f"switchover outcome unknown ({why}): the VM stays stopped"
            )
            failure = ReplicationError(f"switchover outcome unknown: {why}; the VM stays stopped")
        else:
            if self.witness is not None:
                d = await self.witness.ask("renew")
                if not d.granted:
                    await self._fence(f"switchover: the peer holds the lease ({d.reason})")
                self._witness_task = asyncio.create_task(self._witness_loop())
                self._tasks.append(self._witness_task)
            await self.vm.execute("cont")
            failure = ReplicationError(f"switchover refused: {why}; the VM runs on here")
        self.artifacts.event("switchover-failed", reason=why)
        if not result.done():
            result.set_exception(failure)
        return False

    _switched_epoch = -1
    failover_report: dict[str, Any] | None = None

    async def _on_qemu_event(self, ev: dict[str, Any]) -> None:
        name = ev.get("event", "")
        if name not in ("SHUTDOWN", "GUEST_PANICKED"):
            return
        data = ev.get("data") or {}
        # A reset (reboot) also raises SHUTDOWN in some versions; only a real stop counts.
        if name == "SHUTDOWN" and data.get("reason") == "guest-reset":
            return
        self.artifacts.event("guest", name=name, data=data)
        self._guest_stopped = name
        self._guest_data = data
        if self.status.state is PrimaryState.PROTECTED and self.link is not None:
            # The protect loop takes a last checkpoint first: what the guest wrote on
            # its way down (its final sync, the read-only remount) reaches both disks.
            self._pending_reason = f"guest {name}"
            self._sync_requested.set()
            return
        await self._forward_guest_event()

    async def _forward_guest_event(self) -> None:
        """Tell the secondary the guest stopped itself, then stop.

        Forwarded, never a failover trigger: the guest itself chose to stop. The
        secondary records it and will not resume a guest that shut itself down.
        """
        name = self._guest_stopped
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.send(wire.GuestEvent(name=name, data=json.dumps(self._guest_data)))
                await self.link.send(wire.Bye(reason=f"guest event {name}"))
        self._stop.set()
        self._sync_requested.set()

    async def _final_checkpoint(self) -> None:
        """The guest is down (not running): commit what it last did, on both hosts."""
        epoch = self.status.epoch
        try:
            await self._sync_point(f"guest {self._guest_stopped}", resume=False)
            if self.io is not None:
                await asyncio.wait_for(self.io.released(epoch), 30)
        except (ReplicationError, TimeoutError) as err:
            self.artifacts.event("final-checkpoint-failed", reason=str(err))
        await self._forward_guest_event()

    _guest_data: dict[str, Any] = {}

    # ---- protection --------------------------------------------------------------------

    async def _protect_once(self) -> None:
        """Connect, run the initial synchronization, then sync points until the link fails."""
        self._peer_disk = {}
        self._peer_disk_event.clear()
        self.link = await connect(
            self.rcfg.peer,
            key=self.key,
            node_id=self.node_id,
            timeout=self.rcfg.heartbeat_timeout_ms / 1000,
        )
        self._link_lost.clear()
        self._last_rx = time.monotonic()
        self._compat_event.clear()
        self._profile_event.clear()
        self._compat_refused = ""
        self._lost_reason = ""
        self.compat = {}
        self._set_state(PrimaryState.SYNCING, f"secondary {self.rcfg.peer} connected")
        rx = asyncio.create_task(self._receiver())
        hb = asyncio.create_task(self._heartbeat_sender())
        try:
            # Before a single page: can the secondary run this very VM?
            await self.link.send(
                wire.Command(
                    name="vm-profile", args=json.dumps(compat.vm_profile(self.cfg, self.spec))
                )
            )
            await self._await_profile_verdict()
            await self._initial_sync()
            verdict_due = time.monotonic() + COMPAT_TIMEOUT_S
            protected = False
            while not self._stop.is_set():
                if not protected and self._compat_event.is_set():
                    # The secondary loaded our first checkpoint into its own QEMU.
                    protected = True
                    if self.witness is not None:
                        with contextlib.suppress(ConnectError):
                            await self.witness.ask("paired")
                    self._set_state(
                        PrimaryState.PROTECTED,
                        f"epoch {self.status.last_committed_epoch}; the secondary restored "
                        f"a checkpoint in {self.compat.get('ms', '?')} ms",
                    )
                elif not protected and time.monotonic() > verdict_due:
                    self._lose("the secondary never reported its trial restore")
                await self._wait_trigger()
                if self._stop.is_set() or self._link_lost.is_set():
                    break
                if self._guest_stopped:
                    await self._final_checkpoint()
                    break
                if self._switch_req is not None and protected:
                    if await self._switchover():
                        return
                    continue
                await self._sync_point(self._trigger_reason)
            if self._link_lost.is_set():
                raise ConnectError(self.rcfg.peer, self._lost_reason)
        finally:
            rx.cancel()
            hb.cancel()
            for t in (rx, hb):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if self._stop.is_set() or self._link_lost.is_set():
                self.link.close()

    _trigger_reason = "interval"
    _guest_stopped = ""
    _lost_reason = ""
    _last_dirty = 0
    _precopied = 0
    _precopy_bytes = 0

    async def _wait_trigger(self) -> None:
        """Wait for a sync trigger; meanwhile pre-copy dirty pages (pipelining)."""
        interval = self.rcfg.max_interval_ms / 1000
        deadline = self._last_sync + interval
        if self.rcfg.pipelining and self._last_dirty >= PRECOPY_MIN_PAGES:
            # Half-way through the interval, send what changed so far: the stop then
            # carries only what changes after this.
            precopy_at = self._last_sync + interval / 2
            if await self._wait_event_until(precopy_at):
                return
            if not self._link_lost.is_set() and not self._stop.is_set():
                await self._precopy_pass()
        if not await self._wait_event_until(deadline):
            self._trigger_reason = "interval"
        self._sync_requested.clear()

    async def _wait_event_until(self, when: float) -> bool:
        """Wait until ``when`` for a sync trigger: the taps' policy (an I/O event, its
        interval) or a request (API, command, stop). True if one came."""
        if self._sync_requested.is_set():
            self._trigger_reason = self._pending_reason
            self._sync_requested.clear()
            return True
        timeout = max(0.0, when - time.monotonic())
        due = asyncio.ensure_future(self.sched.wait_due(timeout=timeout))
        req = asyncio.ensure_future(self._sync_requested.wait())
        try:
            done, _ = await asyncio.wait(
                {due, req}, timeout=timeout + 0.05, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (due, req):
                t.cancel()
        if req in done:
            self._trigger_reason = self._pending_reason
            self._sync_requested.clear()
            return True
        if due in done and not due.cancelled() and due.result() is not None:
            self._trigger_reason = f"policy:{due.result()}"
            return True
        return False

    async def _precopy_pass(self) -> None:
        """Send the pages dirtied so far into the open epoch, with the guest running."""
        assert self.ram is not None and self.tracker is not None
        async with self._sync_lock:
            k = await asyncio.to_thread(self._scan_one_thread)
            if k == 0:
                return
            idx = self._idx[:k].copy()
            staged = self.tracker.stage(self.ram.pages, idx, self._staging)
            prev = self.tracker.previous(idx, self._prev)
            self.tracker.commit(idx, staged)
            sent, _ = await self._send_epoch_pages(
                self.status.epoch, idx, staged, prev, self._open_digest
            )
            self._precopied += k
            self._precopy_bytes += sent

    _pending_reason = "api"

    def _timed_scan(self) -> tuple[int, float]:
        assert self.ram is not None and self.tracker is not None
        t = time.perf_counter()
        k = self.tracker.scan(self.ram.pages, out=self._idx)
        return k, time.perf_counter() - t

    @property
    def _overlap_scan(self) -> bool:
        # Only for the compare tracker: soft-dirty must read its bits after the capture.
        return isinstance(self.tracker, CompareTracker) and OVERLAP_SCAN

    def _scan_one_thread(self) -> int:
        """A pre-copy scan while the guest runs: one thread, leave the vCPU its core."""
        assert self.ram is not None and self.tracker is not None
        if isinstance(self.tracker, CompareTracker):
            return self.tracker.scan(self.ram.pages, out=self._idx, threads=1)
        return self.tracker.scan(self.ram.pages, out=self._idx)

    async def request_sync(self, reason: str = "api", *, wait: bool = True) -> int:
        """Ask for a sync point; with ``wait``, return once its epoch is acknowledged.

        Events that arrive while a sync is in flight are coalesced into the next one.

        Raises:
            ReplicationError: the epoch was lost (link failure) or the VM is not protected.
        """
        if self.status.state is not PrimaryState.PROTECTED:
            raise ReplicationError(f"not protected ({self.status.state.value})")
        target = self.status.epoch
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(target, EpochWaiter(target, fut))
        waiter = self._waiters[target]
        self._pending_reason = reason
        self._sync_requested.set()
        self.sched.demand()
        if not wait:
            return target
        return await waiter.future

    def _fail_waiters(self, reason: str) -> None:
        for w in self._waiters.values():
            if not w.future.done():
                w.future.set_exception(ReplicationError(reason, w.epoch))
        self._waiters.clear()

    async def _send_epoch_pages(
        self,
        epoch: int,
        idx: np.ndarray,
        staged: np.ndarray,
        prev: np.ndarray | None,
        digest: wire.EpochDigest,
        *,
        precopy: bool = False,
    ) -> tuple[int, float]:
        """Encode and send pages in batches; returns (bytes sent, encode seconds)."""
        assert self.link is not None
        sent = 0
        enc_s = 0.0
        for start in range(0, len(idx), BATCH_PAGES):
            sl = slice(start, start + BATCH_PAGES)
            t0 = time.perf_counter()
            blob = await asyncio.to_thread(
                self.encoder.encode, idx[sl], staged[sl], None if prev is None else prev[sl]
            )
            enc_s += time.perf_counter() - t0
            msg = wire.Pages(epoch=epoch, encoded=blob)
            digest.update(msg)
            sent += await self.link.send(msg)
            faults.hit("precopy" if precopy else "mid-transfer")
        return sent, enc_s

    async def _initial_sync(self) -> None:
        """Iterative pre-copy of all RAM while the VM runs, then the first checkpoint."""
        assert self.ram is not None and self.tracker is not None and self.link is not None
        epoch = self.status.epoch + 1
        n = self.ram.n_pages
        if self.io is not None:
            # From here on writes are logged (in this epoch) and output is held.
            await self.io.protect()
        await self.link.send(
            wire.EpochBegin(
                epoch=epoch, kind=wire.EpochKind.FULL, ram_size=n * PAGE, page_size=PAGE
            )
        )
        digest = wire.EpochDigest(epoch)
        # Round 0: every page, copied into the staging buffer while the guest runs; the
        # staged bytes (exactly what is sent) become the tracker's baseline.
        all_idx = np.arange(n, dtype=np.int64)
        soft = self.tracker.name == "soft-dirty"
        if soft:
            # Soft-dirty bits are cleared by reset(): copy with the guest stopped so no
            # write can fall between the copy and the clear.
            await self.vm.execute("stop")
        staged_all = self.tracker.stage(self.ram.pages, all_idx, self._staging)
        self.tracker.reset(self._staging)
        if soft:
            await self.vm.execute("cont")
        for start in range(0, n, BATCH_PAGES * 4):
            sl = slice(start, start + BATCH_PAGES * 4)
            await self._send_epoch_pages(
                epoch, all_idx[sl], staged_all[sl], None, digest, precopy=True
            )
        # The built-in replicated disk: a full copy, or only the blocks written while no
        # secondary received them when this secondary still holds our copy. Either is
        # taken while no committed write can reach the disk (the tap logs them in this
        # epoch; they follow in its I/O log).
        if self.io is not None and self.io.disk is not None and self.cfg.disk.backend == "builtin":
            await self._copy_disk(epoch, digest)
        # Further rounds: only what changed since it was sent.
        for _ in range(PRECOPY_MAX_ROUNDS):
            k = await asyncio.to_thread(self.tracker.scan, self.ram.pages, out=self._idx)
            if k < PRECOPY_CONVERGED:
                break
            idx = self._idx[:k].copy()
            staged = self.tracker.stage(self.ram.pages, idx, self._staging)
            prev = self.tracker.previous(idx, self._prev)
            self.tracker.commit(idx, staged)
            await self._send_epoch_pages(epoch, idx, staged, prev, digest, precopy=True)
        self.status.epoch = epoch
        await self._sync_point("initial", digest=digest, begun=True)

    async def _copy_disk(self, epoch: int, digest: wire.EpochDigest) -> None:
        assert self.io is not None and self.io.disk is not None and self.link is not None
        peer = await self._peer_disk_state()
        incremental = (
            bool(self.io.lineage)
            and peer.get("lineage") == self.io.lineage
            and int(peer.get("epoch", -1)) >= self.io.acked_at_loss
        )
        if incremental:
            chunks = self.io.dirty_chunks()
        else:
            self.io.lineage = os.urandom(8).hex()
            chunks = self.io.disk_chunks()
        mode = "incremental" if incremental else "full"
        await self.link.send(
            wire.Command(
                name="disk-copy",
                args=json.dumps({"mode": mode, "lineage": self.io.lineage, "epoch": epoch}),
            )
        )
        sent = 0
        skipped = 0
        for offset, length in chunks:
            data = await asyncio.to_thread(self.io.disk.read, offset, length)
            if not incremental and data.count(0) == len(data):
                # A full copy lands in a fresh sparse file: zeros need not travel.
                skipped += length
                continue
            rec = iolog.encode(epoch, [iolog.IOOp(iolog.OpKind.WRITE, offset, length, data)])
            msg = wire.IOLog(epoch=epoch, data=rec)
            digest.update(msg)
            await self.link.send(msg)
            sent += length
            faults.hit("precopy")
        self._resync = {
            "mode": mode,
            "blocks": len(chunks),
            "bytes": sent,
            "zero_bytes_skipped": skipped,
            "epoch": epoch,
        }
        self.artifacts.event("disk-resync", **self._resync)

    async def _peer_disk_state(self) -> dict[str, Any]:
        """What the secondary says it holds (sent first thing on a new link)."""
        try:
            await asyncio.wait_for(self._peer_disk_event.wait(), 5.0)
        except TimeoutError:
            return {}
        return self._peer_disk

    async def _sync_point(
        self,
        trigger: str,
        *,
        digest: wire.EpochDigest | None = None,
        begun: bool = False,
        resume: bool = True,
    ) -> None:
        assert self.ram is not None and self.tracker is not None and self.link is not None
        assert self.capturer is not None
        async with self._sync_lock:
            epoch = self.status.epoch
            if not begun:
                # The epoch was opened (EpochBegin sent) right after the previous one closed.
                digest = self._open_digest
            assert digest is not None
            t0 = time.perf_counter()
            t0_wall = time.time()
            await self.vm.execute("stop")
            t_stop = time.perf_counter()
            if self._overlap_scan:
                # The compare scan needs no device state and QEMU's capture no guest RAM
                # (x-ignore-shared): run them side by side, the scan on its own thread.
                # Each slows the other on two cores, but the pause still came out about
                # 7% shorter (12.1-12.4 ms against 13.1-13.3 ms for 128 MiB, A/B in the
                # lab with KEMARI_OVERLAP_SCAN=0).
                scan = asyncio.get_running_loop().run_in_executor(self._scan_exec, self._timed_scan)
                try:
                    devstate = await self.capturer.capture()
                finally:
                    k, scan_s = await scan
                t_dev = time.perf_counter()
                t_scan = t_dev
                dev_s = t_dev - t_stop
            else:
                devstate = await self.capturer.capture()
                t_dev = time.perf_counter()
                self.tracker.rearm()
                k = self.tracker.scan(self.ram.pages, out=self._idx)
                t_scan = time.perf_counter()
                scan_s, dev_s = t_scan - t_dev, t_dev - t_stop
            idx = self._idx[:k]
            staged = self.tracker.stage(self.ram.pages, idx, self._staging)
            t_stage = time.perf_counter()
            # The epoch switches here, while the VM is stopped: every write from now on
            # belongs to the next epoch.
            self.status.epoch = epoch + 1
            self.sched.started(epoch)
            faults.hit("stopped")
            # Without ``resume`` (a switchover) the VM stays stopped after the ack.
            classic = self.rcfg.mode == "classic" or not resume
            if not classic:
                await self.vm.execute("cont")
            t_resume = time.perf_counter()
            # The epoch switched while stopped, so writes from now on are logged in the
            # next one: serializing this epoch's log need not keep the guest stopped.
            io_log = self.io_log_provider(epoch) if self.io_log_provider else b""
            # --- after the resume: encode and send. The shadow (the XOR base) changes
            # only at commit, so reading it now is as good as inside the window.
            idx = idx.copy()
            prev = self.tracker.previous(idx, self._prev)
            sent, enc_s = await self._send_epoch_pages(epoch, idx, staged, prev, digest)
            self.tracker.commit(idx, staged)
            for part in (
                wire.DeviceState(epoch=epoch, data=devstate),
                wire.IOLog(epoch=epoch, data=io_log),
            ):
                digest.update(part)
                sent += await self.link.send(part)
            sent += await self.link.send(
                wire.EpochEnd(epoch=epoch, n_pages=int(k), digest=digest.digest())
            )
            t_sent = time.perf_counter()
            faults.hit("before-ack")
            # Open the next epoch at once so pre-copied pages have somewhere to go.
            await self.link.send(
                wire.EpochBegin(
                    epoch=epoch + 1,
                    kind=wire.EpochKind.DELTA,
                    ram_size=self.ram.n_pages * PAGE,
                    page_size=PAGE,
                )
            )
            self._open_digest = wire.EpochDigest(epoch + 1)
            self._last_sync = time.monotonic()
            ack_fut = self._ack_future(epoch)
            if classic:
                await self._await_ack(ack_fut, epoch)
                if resume:
                    await self.vm.execute("cont")
                t_resume = time.perf_counter()
        m = CheckpointMetrics(
            epoch=epoch,
            trigger=trigger,
            pause_ms=(t_resume - t0) * 1e3,
            stop_ms=(t_stop - t0) * 1e3,
            devstate_ms=dev_s * 1e3,
            scan_ms=scan_s * 1e3,
            stage_ms=(t_stage - t_scan) * 1e3,
            dirty_pages=int(k),
            devstate_bytes=len(devstate),
            bytes_sent=sent,
            encode_ms=enc_s * 1e3,
            transfer_ms=(t_sent - t_resume) * 1e3 if not classic else 0.0,
            t_wall=time.time(),
            precopied_pages=self._precopied,
            precopy_bytes=self._precopy_bytes,
        )
        qp = qemu_pause(self.vm.events, t0_wall - 0.01)
        if qp is not None:
            m.stopped_at, m.guest_pause_ms = qp[0], qp[1] * 1e3
        self._last_dirty = int(k) + self._precopied
        self._precopied = 0
        self._precopy_bytes = 0
        if not classic:
            await self._await_ack(ack_fut, epoch)
        m.ack_ms = (time.perf_counter() - t_sent) * 1e3
        self.status.checkpoints += 1
        self.artifacts.checkpoint(m)

    _open_digest: wire.EpochDigest

    def _ack_future(self, epoch: int) -> asyncio.Future[int]:
        w = self._waiters.get(epoch)
        if w is None:
            w = EpochWaiter(epoch, asyncio.get_running_loop().create_future())
            self._waiters[epoch] = w
        return w.future

    async def _await_ack(self, fut: asyncio.Future[int], epoch: int) -> None:
        timeout = self.rcfg.heartbeat_timeout_ms / 1000
        lost: asyncio.Future[bool] = asyncio.ensure_future(self._link_lost.wait())
        try:
            waitables: set[asyncio.Future[Any]] = {fut, lost}
            done, _ = await asyncio.wait(
                waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if fut in done:
            fut.result()
            return
        raise ReplicationError(self._lost_reason or "no acknowledgement in time", epoch)

    async def _receiver(self) -> None:
        assert self.link is not None
        try:
            while True:
                msg = await self.link.recv()
                self._last_rx = time.monotonic()
                if isinstance(msg, wire.Ack):
                    self._on_ack(msg.epoch)
                elif isinstance(msg, wire.Nack):
                    self._lose(f"secondary refused epoch {msg.epoch}: {msg.reason}")
                    return
                elif isinstance(msg, wire.Resync):
                    self._lose(f"secondary asks for a full resync: {msg.reason}")
                    return
                elif isinstance(msg, wire.Bye):
                    self._lose(f"secondary left: {msg.reason}")
                    return
                elif isinstance(msg, wire.Command) and msg.name == "compat":
                    self._on_compat(msg.args)
                elif isinstance(msg, wire.Command) and msg.name == "switched":
                    reply = _json_object(msg.args)
                    if self._switch_reply is not None and not self._switch_reply.done():
                        self._switch_reply.set_result(reply)
                elif isinstance(msg, wire.Command) and msg.name == "disk-state":
                    with contextlib.suppress(ValueError):
                        state = json.loads(msg.args)
                        if isinstance(state, dict):
                            self._peer_disk = state
                    self._peer_disk_event.set()
        except (ProtocolError, ConnectError, ConnectionError, asyncio.IncompleteReadError) as err:
            self._lose(f"link failed: {err}")

    async def _await_profile_verdict(self) -> None:
        """Wait for the secondary to accept our VM's profile (or refuse it)."""
        timeout = self.rcfg.heartbeat_timeout_ms / 1000 * 2
        lost = asyncio.ensure_future(self._link_lost.wait())
        ok = asyncio.ensure_future(self._profile_event.wait())
        try:
            await asyncio.wait({lost, ok}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            ok.cancel()
        if self._link_lost.is_set():
            raise ReplicationError(self._lost_reason)
        if not self._profile_event.is_set():
            raise ReplicationError(f"the secondary did not answer our VM profile in {timeout} s")

    def _on_compat(self, args: str) -> None:
        verdict = _json_object(args)
        self.compat = verdict
        self.artifacts.event("compat", **verdict)
        if verdict.get("ok"):
            if verdict.get("stage") == "profile":
                self._profile_event.set()
            else:
                self._compat_event.set()
            return
        self._compat_refused = str(verdict.get("reason", "no reason given"))
        self._lose(
            f"the secondary cannot run this VM ({verdict.get('stage', '?')}): "
            f"{self._compat_refused}"
        )

    def _on_durable(self, epoch: int) -> None:
        """Every write through ``epoch`` is on our disk: the secondary may drop its logs."""
        link = self.link
        if link is not None and not link.closed:
            task = asyncio.ensure_future(link.send(wire.Command(name="durable", args=str(epoch))))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _on_ack(self, epoch: int) -> None:
        self.status.last_committed_epoch = epoch
        if self._resync and self._resync.get("epoch") == epoch and self.io is not None:
            # The secondary's copy now matches ours: nothing is dirty any more.
            if self.io.disk is not None:
                self.io.disk.clear(self.io.disk.dirty_blocks())
            self._resync["committed"] = True
        if self.io is not None:
            self.io.committed(epoch)
        self.sched.finished()
        faults.hit("after-ack")
        for e in sorted(self._waiters):
            if e <= epoch:
                w = self._waiters.pop(e)
                if not w.future.done():
                    w.future.set_result(epoch)

    def _lose(self, reason: str) -> None:
        if not self._link_lost.is_set():
            self._lost_reason = reason
            self._link_lost.set()
            self._sync_requested.set()
            self.sched.finished()

    async def _heartbeat_sender(self) -> None:
        assert self.link is not None
        interval = self.rcfg.heartbeat_interval_ms / 1000
        timeout = self.rcfg.heartbeat_timeout_ms / 1000
        seq = 0
        while True:
            await asyncio.sleep(interval)
            seq += 1
            try:
                await self.link.send(
                    wire.Heartbeat(
                        seq=seq, sent_ns=time.time_ns(), role_state=self.status.state.value
                    )
                )
            except (ConnectionError, OSError) as err:
                self._lose(f"heartbeat send failed: {err}")
                return
            if time.monotonic() - self._last_rx > timeout:
                self._lose(f"no frame from the secondary for {timeout:.1f} s")
                return

    # ---- losing the secondary ----------------------------------------------------------

    async def _secondary_lost(self, reason: str) -> None:
        """Decide, through the tiebreaker, whether to go on unprotected or to fence."""
        self._fail_waiters(f"secondary lost: {reason}")
        if self.io is not None and self.status.state is PrimaryState.PROTECTED:
            self.io.acked_at_loss = self.status.last_committed_epoch
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.status.state in (PrimaryState.UNPROTECTED, PrimaryState.HELD):
            return
        self.artifacts.event("secondary-lost", reason=reason)
        if self.witness is not None:
            try:
                # "solo": from now on the standby's copy is stale; the witness will not
                # let it take over until we are protected again.
                d = await self.witness.ask("solo")
            except ConnectError as err:
                d = None
                why = str(err)
            if d is not None and d.granted:
                if self.io is not None:
                    await self.io.unprotect()
                self._set_state(
                    PrimaryState.UNPROTECTED,
                    f"{reason}; the {self.rcfg.tiebreaker} confirmed our lease",
                )
                return
            why = d.reason if d is not None else why
            await self._fence(f"{reason}; tiebreaker lost: {why}")
            return
        self._set_state(
            PrimaryState.HELD,
            f"{reason}; no tiebreaker configured: output stays held until the secondary "
            "returns or an operator decides",
        )

    async def _fence(self, reason: str) -> None:
        log.error("primary fenced: %s", reason)
        self._set_state(PrimaryState.FENCED, reason)
        self.artifacts.event("fenced", reason=reason)
        with contextlib.suppress(Exception):
            await self.vm.kill()
        self._stop.set()
        raise FailoverError(f"this host stopped its VM: {reason}")

    async def _witness_loop(self) -> None:
        """Renew our lease; stop the guest before our own view of it runs out."""
        assert self.witness is not None
        interval = self.rcfg.heartbeat_interval_ms / 1000
        lease_s = self.rcfg.heartbeat_timeout_ms / 1000
        while True:
            try:
                d = await self.witness.ask("renew")
                if not d.granted:
                    self._stop_fenced(f"witness refused our lease: {d.reason}")
                    return
            except ConnectError as err:
                self.artifacts.event("witness-unreachable", reason=str(err))
            # Our own, conservative view of the lease: counted from when we *sent* the
            # last granted renewal. If it is about to run out while the secondary is
            # silent, the secondary may take the lease over: stop first.
            secondary_silent = self.link is None or time.monotonic() - self._last_rx > 2 * interval
            if (
                secondary_silent
                and self.witness.last_granted_sent is not None
                and not self.witness.lease_valid(lease_s, margin_s=interval)
            ):
                self._stop_fenced(
                    "lease about to expire with neither the secondary nor the witness reachable"
                )
                return
            await asyncio.sleep(interval)

    def _stop_fenced(self, reason: str) -> None:
        log.error("primary fenced: %s", reason)
        self._set_state(PrimaryState.FENCED, reason)
        self.artifacts.event("fenced", reason=reason)
        if self.vm.proc is not None and self.vm.proc.poll() is None:
            self.vm.proc.kill()
        self._stop.set()
        self._sync_requested.set()


__all__ = ["PrimaryAgent", "PrimaryState"]


def _json_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


async def _h_fault(req: dict[str, Any]) -> Any:
    """Arm a fault-injection point (only with KEMARI_FAULTS=1)."""
    try:
        faults.arm(str(req["point"]), int(req.get("count", 1)), str(req.get("target", "")))
    except (KeyError, ValueError) as err:
        raise ReplicationError(f"bad fault request: {err}") from err
    return {"armed": req["point"]}
