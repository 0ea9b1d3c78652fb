"""Per-checkpoint metrics and the run's artifact folder.

A run writes ``<artifacts>/checkpoints.jsonl`` (one object per checkpoint),
``events.jsonl`` (state changes, failovers, refusals) and ``status.json`` (the latest
status, rewritten atomically). The folder is 0700 and every file 0600: they tell what
the guest did. Each record also goes to the metrics sink, when one is attached (the
Prometheus exporter, :mod:`kemari_suite.service.prometheus`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kemari_suite.alerts import Alerter, AlertKind
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only, write_owner_only

log = logging.getLogger(__name__)


@dataclass
class CheckpointMetrics:
    """What one sync point cost."""

    epoch: int
    trigger: str
    #: Wall time the VM was stopped, on the host's clock.
    pause_ms: float
    stop_ms: float
    devstate_ms: float
    scan_ms: float
    stage_ms: float
    dirty_pages: int
    devstate_bytes: int
    bytes_sent: int
    encode_ms: float = 0.0
    transfer_ms: float = 0.0
    ack_ms: float = 0.0
    #: Pages (and bytes) of this epoch sent by pipelining before the stop.
    precopied_pages: int = 0
    precopy_bytes: int = 0
    t_wall: float = 0.0
    #: The pause as QEMU itself timestamped it (its STOP and RESUME events): without the
    #: QMP round trips that ``pause_ms`` includes. None when the events were not seen.
    guest_pause_ms: float | None = None
    #: Wall-clock time of QEMU's STOP event.
    stopped_at: float | None = None
    #: The dirty tracker whose scan this was (uffd-wp, soft-dirty, compare; "+verify"
    #: when checked against the compare tracker).
    tracker: str = ""


def _event_time(ev: dict[str, Any]) -> float | None:
    ts = ev.get("timestamp") or {}
    try:
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


def qemu_pause(events: Sequence[dict[str, Any]], since: float) -> tuple[float, float] | None:
    """(stop time, seconds stopped) of the last STOP→RESUME pair after ``since``, from
    QEMU's own event timestamps; None when that pair is not (yet) in ``events``.

    Walks back from the newest event and stops at the first one older than ``since``:
    a checkpoint looks at a handful of events, not the whole history.
    """
    resume: float | None = None
    for ev in reversed(events):
        t = _event_time(ev)
        if t is None:
            continue
        if t < since:
            break
        if ev.get("event") == "RESUME":
            resume = t
        elif ev.get("event") == "STOP" and resume is not None:
            return t, resume - t
    return None


class MetricsSink(Protocol):
    """Where the artifacts' records also go, as they are written (on the event loop)."""

    def checkpoint(self, m: CheckpointMetrics) -> None: ...

    def event(self, kind: str, fields: Mapping[str, Any]) -> None: ...

    def status(self, status: Mapping[str, Any]) -> None: ...


class Artifacts:
    """The artifact folder of one agent run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        mkdir_owner_only(root)
        self._ckpt = open_owner_only(root / "checkpoints.jsonl", "a", buffering=1)
        self._events = open_owner_only(root / "events.jsonl", "a", buffering=1)
        #: Where the events operators must hear about also go (hook, system log).
        self.alerter: Alerter | None = None
        #: Where every record also goes (the Prometheus exporter); detached at close.
        self.metrics: MetricsSink | None = None
        self._sink_failed = False

    def checkpoint(self, m: CheckpointMetrics) -> None:
        if not self._ckpt.closed:
            self._ckpt.write(json.dumps(asdict(m)) + "\n")
        if self.metrics is not None:
            self._feed(self.metrics.checkpoint, m)

    def event(self, kind: str, **fields: Any) -> None:
        rec = {"t": time.time(), "event": kind, **fields}
        # A task that ends after the agent stopped may still report: keep it quiet.
        if not self._events.closed:
            self._events.write(json.dumps(rec, default=str) + "\n")
        if self.metrics is not None:
            self._feed(self.metrics.event, kind, fields)
        if self.alerter is not None:
            alert = alert_for(kind, fields)
            if alert is not None:
                details = {k: v for k, v in fields.items() if k != "reason"}
                self.alerter.emit(alert[0], alert[1], event=kind, **details)

    def status(self, status: dict[str, Any]) -> None:
        write_owner_only(self.root / "status.json", json.dumps(status, indent=2, default=str))
        if self.metrics is not None:
            self._feed(self.metrics.status, status)

    def _feed(self, fn: Callable[..., None], *args: Any) -> None:
        """Give a record to the metrics sink: a failing sink is logged (once) and never
        gets in the way of the agent."""
        try:
            fn(*args)
        except Exception:
            if not self._sink_failed:
                log.exception("metrics: a record was not exported")
            self._sink_failed = True

    def alert_history(self, n: int = 5) -> list[dict[str, Any]]:
        """The last ``n`` alerts sent (for ``kemari status``)."""
        return self.alerter.history[-n:] if self.alerter is not None else []

    def close(self) -> None:
        # Late reports (a task ending after the agent stopped) must not reach the next
        # agent's metrics.
        self.metrics = None
        self._ckpt.close()
        self._events.close()
        if self.alerter is not None:
            self.alerter.close(timeout=5.0)


#: Agent states that are alerts, and what kind.
_STATE_ALERTS = {
    "unprotected": AlertKind.UNPROTECTED,
    "held": AlertKind.UNPROTECTED,
    "protected": AlertKind.PROTECTED,
    "fenced": AlertKind.FENCED,
    "active": AlertKind.FAILOVER,
    "switched-over": AlertKind.SWITCHOVER,
}


def alert_for(kind: str, fields: dict[str, Any]) -> tuple[AlertKind, str] | None:
    """The alert an artifact event raises, if any: (kind, reason)."""
    reason = str(fields.get("reason", ""))
    if kind == "state":
        ak = _STATE_ALERTS.get(str(fields.get("state")))
        return None if ak is None else (ak, reason or str(fields.get("state")))
    if kind == "guest":
        where = f" on {fields['node']}" if fields.get("node") else ""
        return (AlertKind.GUEST, f"the guest reported {fields.get('name', '?')}{where}")
    if kind == "failover-failed":
        split = "diverged" in reason or "split" in reason
        return (AlertKind.SPLIT_BRAIN if split else AlertKind.FAILOVER_FAILED, reason)
    if kind in ("failover-refused", "switchover-refused", "compat-refused"):
        split = "diverged" in reason or "stale" in reason
        return (AlertKind.SPLIT_BRAIN if split else AlertKind.FAILOVER_REFUSED, reason)
    return None
