"""A DRBD resource watched while the backend is attached: split brain, refused and alerted.

::

    DrbdBackend.attach()
      └─ EventsWatch (one thread) ── drbdsetup events2 RES --statistics --timestamps
            line ─> parse_events2_line ─> DrbdMonitor ─> notices
                                                          └─ SplitBrain ─> SplitBrainGuard
    SplitBrainGuard.notice()   records it once: status() shows it, the marker file keeps it
                               for the next backend on this host, on_split_brain(record)
                               is called (the engine's alert)
    DrbdBackend.promote()      SplitBrainGuard.check(status): refused with SplitBrainError

A split brain is never resolved here: DRBD keeps both sides' writes (every ``after-sb-*``
policy is ``disconnect``), and choosing whose writes are discarded is an operator's
decision (:data:`RUNBOOK`). The record goes away only once the operator resolved it: the
resource is connected again with both disks UpToDate (:meth:`SplitBrainGuard.resolved`).

Seen in the kernel lab (DRBD 8.4.11, drbd-utils 9.22): at the reconnect of two sides that
both wrote, both report ``call helper name:R ... helper:initial-split-brain`` and then
``call helper ... helper:split-brain`` in events2 (the kernel runs the helpers through
drbdadm whether or not a handler is configured), and go StandAlone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kemari_suite.disk.drbdevents import (
    DrbdEvent,
    DrbdMonitor,
    Notice,
    SplitBrain,
    parse_events2_line,
)
from kemari_suite.disk.drbdstatus import ResourceStatus
from kemari_suite.errors import DiskError

if TYPE_CHECKING:
    from kemari_suite.alerts import Alerter
    from kemari_suite.disk.base import DiskBackend

log = logging.getLogger(__name__)

#: Where the operator finds what to do (named by every refusal and alert).
RUNBOOK = 'docs/operations.md, section "DRBD split brain"'
#: Where a detected split brain is kept for the next backend on this host (a tmpfs: after
#: a reboot DRBD detects the split brain again at its first connection).
DEFAULT_STATE_DIR = Path("/run/kemari/drbd")
#: Pause before drbdsetup events2 is started again after it exited.
RESTART_S = 1.0


@dataclass(frozen=True)
class SplitBrainRecord:
    """A split brain DRBD detected on this host: with which peer, and when.

    ``detected_at`` is this host's clock (seconds since the epoch); ``timestamp`` the
    events2 line's own, when it had one; ``unresolved`` True once DRBD ran the
    ``split-brain`` helper (no after-sb policy resolved it).
    """

    resource: str
    peer: str | None
    detected_at: float
    timestamp: str | None = None
    unresolved: bool = False

    @property
    def reason(self) -> str:
        peer = f" with peer {self.peer}" if self.peer else ""
        return f"DRBD resource {self.resource}: split brain{peer}, both sides wrote"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitBrainRecord:
        """Raises KeyError, TypeError or ValueError for a malformed record."""
        return cls(
            resource=str(d["resource"]),
            peer=None if d.get("peer") is None else str(d["peer"]),
            detected_at=float(d["detected_at"]),
            timestamp=None if d.get("timestamp") is None else str(d["timestamp"]),
            unresolved=bool(d.get("unresolved", False)),
        )


class SplitBrainError(DiskError):
    """A promotion refused because this host saw a split brain that is not resolved."""

    def __init__(self, record: SplitBrainRecord) -> None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.detected_at))
        super().__init__(
            "drbd",
            f"{record.reason} (detected {when}); not promoting: resolve it by hand, "
            f"choosing whose writes to discard (see {RUNBOOK})",
        )
        self.record = record


def resolved(status: ResourceStatus | None) -> bool:
    """The resource is connected again with our disk and every peer's UpToDate: DRBD
    reconnects after a split brain only once an operator discarded one side's writes."""
    return status is not None and status.connected and status.up_to_date and status.peers_up_to_date


class SplitBrainGuard:
    """What this host knows of a split brain of ``resource``; thread-safe.

    ``marker`` (None: none) is the file that keeps the record across backends and agent
    restarts on this host. ``on_split_brain`` is called once per record, from the thread
    that saw it (or at once when set while a record is held).
    """

    def __init__(
        self,
        resource: str,
        marker: Path | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resource = resource
        self.marker = marker
        self._clock = clock
        self._lock = threading.Lock()
        self._record: SplitBrainRecord | None = self._load()
        self._alerted = False
        self._on_split_brain: Callable[[SplitBrainRecord], None] | None = None

    @property
    def record(self) -> SplitBrainRecord | None:
        with self._lock:
            return self._record

    @property
    def on_split_brain(self) -> Callable[[SplitBrainRecord], None] | None:
        return self._on_split_brain

    @on_split_brain.setter
    def on_split_brain(self, callback: Callable[[SplitBrainRecord], None] | None) -> None:
        self._on_split_brain = callback
        self._alert()

    def _load(self) -> SplitBrainRecord | None:
        if self.marker is None:
            return None
        try:
            return SplitBrainRecord.from_dict(json.loads(self.marker.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Unreadable is not "none": keep refusing, the operator removes the file.
            log.warning("%s: unreadable split-brain marker (%s): kept as one", self.marker, err)
            return SplitBrainRecord(self.resource, None, self._clock(), unresolved=True)

    def _save(self, record: SplitBrainRecord | None) -> None:
        if self.marker is None:
            return
        try:
            if record is None:
                self.marker.unlink(missing_ok=True)
                return
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(record.to_dict()) + "\n")
            os.replace(tmp, self.marker)
        except OSError as err:
            log.warning("%s: split-brain marker not written: %s", self.marker, err)

    def notice(self, sb: SplitBrain, timestamp: str | None = None) -> SplitBrainRecord:
        """Record a split brain DRBD reported; the record (the first one, marked
        unresolved once DRBD ran the ``split-brain`` helper)."""
        with self._lock:
            rec = self._record
            if rec is None:
                rec = SplitBrainRecord(
                    self.resource, sb.peer, self._clock(), timestamp, sb.unresolved
                )
            elif sb.unresolved and not rec.unresolved:
                rec = SplitBrainRecord(
                    rec.resource, rec.peer or sb.peer, rec.detected_at, rec.timestamp, True
                )
            changed = rec != self._record
            self._record = rec
        if changed:
            self._save(rec)
            log.error("%s (see %s)", rec.reason, RUNBOOK)
        self._alert()
        return rec

    def _alert(self) -> None:
        with self._lock:
            rec, callback = self._record, self._on_split_brain
            if rec is None or callback is None or self._alerted:
                return
            self._alerted = True
        try:
            callback(rec)
        except Exception:
            log.exception("split brain of %s: the alert failed", self.resource)

    def clear_if_resolved(self, status: ResourceStatus | None) -> bool:
        """Forget the record when ``status`` shows it resolved; whether one is held."""
        with self._lock:
            if self._record is None:
                return False
            if not resolved(status):
                return True
            rec, self._record, self._alerted = self._record, None, False
        self._save(None)
        log.warning("%s: resolved (connected, both disks UpToDate)", rec.reason)
        return False

    def check(self, status: ResourceStatus | None) -> None:
        """Raise when a split brain is held and ``status`` does not show it resolved.

        Raises:
            SplitBrainError: a split brain not resolved (naming the runbook).
        """
        if self.clear_if_resolved(status):
            rec = self.record
            if rec is not None:
                raise SplitBrainError(rec)


class EventsWatch:
    """Follows ``argv`` (``drbdsetup events2 RES ...``) on a thread and hands every
    notice of ``resource`` to ``on_notice`` (with the event that caused it).

    drbdsetup is started again when it exits (the resource went down and up); each run
    starts from its own initial state, which raises no notices. :meth:`stop` ends it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        resource: str,
        on_notice: Callable[[Notice, DrbdEvent], None],
        *,
        env: dict[str, str] | None = None,
        restart_s: float = RESTART_S,
    ) -> None:
        self.argv = tuple(argv)
        self.resource = resource
        self.on_notice = on_notice
        self.env = env
        self.restart_s = restart_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._settled = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: How many times drbdsetup was started.
        self.runs = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._loop, name=f"drbd-events2-{self.resource}", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until drbdsetup printed the initial state (``exists -``) or its first run
        ended without it (no drbdsetup, no module); whether it printed it."""
        self._settled.wait(timeout)
        return self._ready.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_once()
            except Exception:
                log.exception("drbd events2 of %s failed", self.resource)
            self._settled.set()
            if self._stop.wait(self.restart_s):
                break

    def _run_once(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            try:
                proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,
                )
            except OSError as err:
                log.warning("drbd events2 of %s: %s", self.resource, err)
                return
            self._proc = proc
            self.runs += 1
        monitor = DrbdMonitor(self.resource)
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                self._line(monitor, raw.decode("utf-8", "replace"))
        finally:
            with contextlib.suppress(OSError):
                proc.terminate()
            proc.wait()
            proc.stdout.close()
            with self._lock:
                self._proc = None

    def _line(self, monitor: DrbdMonitor, line: str) -> None:
        try:
            ev = parse_events2_line(line)
            if ev is None:
                return
            notices = monitor.feed(ev)
        except DiskError as err:
            # One odd line must not blind the watch to the next split brain.
            log.warning("drbd events2 of %s: %s", self.resource, err)
            return
        if ev.initial_state_done:
            self._ready.set()
            self._settled.set()
        for n in notices:
            self.on_notice(n, ev)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop drbdsetup and the thread (waits up to ``timeout``)."""
        self._stop.set()
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def split_brain_alert(alerter: Alerter) -> Callable[[SplitBrainRecord], None]:
    """The callback that raises a ``split-brain`` alert for a record."""
    from kemari_suite.alerts import AlertKind

    def emit(record: SplitBrainRecord) -> None:
        alerter.emit(
            AlertKind.SPLIT_BRAIN,
            f"{record.reason}: promotion refused until resolved by hand",
            runbook=RUNBOOK,
            **record.to_dict(),
        )

    return emit


def alert_on_split_brain(disk: DiskBackend | None, alerter: Alerter | None) -> None:
    """Make ``disk`` raise a ``split-brain`` alert through ``alerter`` when it detects
    one (at once when it already holds one); nothing for a backend that cannot detect
    a split brain, or without an alerter."""
    guard = getattr(disk, "split_brain_guard", None)
    if alerter is not None and isinstance(guard, SplitBrainGuard):
        guard.on_split_brain = split_brain_alert(alerter)


__all__ = [
    "DEFAULT_STATE_DIR",
    "RUNBOOK",
    "EventsWatch",
    "SplitBrainError",
    "SplitBrainGuard",
    "SplitBrainRecord",
    "alert_on_split_brain",
    "resolved",
    "split_brain_alert",
]
