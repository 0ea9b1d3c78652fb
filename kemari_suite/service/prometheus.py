"""The agent's Prometheus exporter: ``/metrics`` over HTTP, off unless ``[metrics] listen``.

::

    Artifacts.checkpoint(row) ──┐
    Artifacts.event(kind, ...) ─┼─► AgentMetrics ─ one CollectorRegistry ◄─ GET /metrics
    Artifacts.status(dict) ─────┤   (no I/O)                                (MetricsServer:
    status sampler, 1 s ────────┘                                           prometheus_client's
      (on the event loop)                                                    WSGI server thread)

The collectors are fed from the artifact folder's three streams as they are written (see
:class:`~kemari_suite.service.metrics.Artifacts`): every checkpoint row, every event and
every status; the primary writes its status only when it stops, so the node also samples
``status_dict()`` once a second on the event loop (never from the server's thread).

Names follow the Linux HA exporters (drbd-reactor's prometheus plugin, ClusterLabs'
ha_cluster_exporter): a ``kemari_`` prefix, base units in the name (``_seconds``,
``_bytes``), ``_total`` on counters, and a ``vm`` label on every series:

======================================  =========  ============  ===========================
name                                    type       labels        from
======================================  =========  ============  ===========================
kemari_pause_seconds                    histogram  vm            checkpoint row ``pause_ms``
kemari_transfer_seconds                 histogram  vm            row ``transfer_ms``
kemari_ack_seconds                      histogram  vm            row ``ack_ms``
kemari_sync_points_total                counter    vm, trigger   row ``trigger``
kemari_replicated_bytes_total           counter    vm            row ``bytes_sent``
kemari_state                            gauge      vm, role,     ``state`` events: 1 for the
                                                   state         current (role, state), else 0
kemari_tracker_info                     gauge      vm, tracker   ``tracker`` event, row, status
kemari_epoch_lag                        gauge      vm            primary status
kemari_committed_epoch                  gauge      vm            status
kemari_held_output_bytes                gauge      vm            primary status ``held_bytes``
kemari_failovers_total                  counter    vm, outcome   ``failover``, ``failover-failed``
kemari_switchovers_total                counter    vm, outcome   ``switchover``,
                                                                 ``switchover-failed``
kemari_takeovers_refused_total          counter    vm, kind      ``failover-refused``,
                                                                 ``switchover-refused``
kemari_fenced_total                     counter    vm            ``fenced``
kemari_link_resets_total                counter    vm, cause     ``secondary-lost``,
                                                                 ``primary-disconnected``
                                                                 (lost); ``rejected``
======================================  =========  ============  ===========================

docs/prometheus.md says what each one means. Every exporter has its own registry, never
prometheus_client's global one, so two agents in one process (tests, the lab) never
clash. An exporter lives as long as its node (``kemari protect``, ``kemari standby``): a
switchover changes the role, not the scrape target, and the counters go on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kemari_suite.config import MetricsConfig
from kemari_suite.errors import ConfigError
from kemari_suite.protocol.listen import parse_listen
from kemari_suite.service.metrics import Artifacts, CheckpointMetrics

log = logging.getLogger(__name__)

#: The config key of the exporter's address (named in every error about it).
LISTEN_KEY = "metrics.listen"
#: How often the node hands the agent's status to the exporter, seconds.
STATUS_INTERVAL_S = 1.0
#: Histogram buckets, seconds: a pause of a small guest is a few milliseconds, a large
#: or busy one's up to seconds; acknowledgements follow the link.
BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: events.jsonl events that count, and the counter (with its label value) each bumps.
#: tests/unit/test_prometheus.py checks that each one is still emitted somewhere.
COUNTED_EVENTS: Mapping[str, tuple[str, str]] = {
    # The standby resumed the VM from its replica: also the standby's side of a planned
    # switchover (the event does not say which).
    "failover": ("failovers", "succeeded"),
    "failover-failed": ("failovers", "failed"),
    # The primary's side of a planned switchover.
    "switchover": ("switchovers", "succeeded"),
    "switchover-failed": ("switchovers", "failed"),
    "failover-refused": ("takeovers_refused", "failover"),
    "switchover-refused": ("takeovers_refused", "switchover"),
    "fenced": ("fenced", ""),
    # The replication link ended: on the primary (once per loss, not per reconnect
    # attempt), on the secondary (an orderly goodbye included), or because the secondary
    # refused a corrupt or forged frame.
    "secondary-lost": ("link_resets", "lost"),
    "primary-disconnected": ("link_resets", "lost"),
    "rejected": ("link_resets", "rejected"),
}


class _OneOf(Collector):
    """A gauge that is 1 for one label value (or tuple of values) and 0 for the others
    it knows: switched in one assignment, so a scrape never sees two ones or none."""

    def __init__(self, name: str, doc: str, labels: Sequence[str], vm: str, *, zeros: bool) -> None:
        self.name = name
        self.doc = doc
        self.labels = ("vm", *labels)
        self.vm = vm
        #: Also list the known values at 0 (a one-hot gauge), or only the current one.
        self.zeros = zeros
        self.known: list[tuple[str, ...]] = []
        self.current: tuple[str, ...] | None = None

    def declare(self, values: Sequence[tuple[str, ...]]) -> None:
        self.known = [*self.known, *(v for v in values if v not in self.known)]

    def set(self, value: tuple[str, ...] | None) -> None:
        if value is not None and value not in self.known:
            self.declare([value])
        self.current = value

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        current = self.current  # read once: a scrape sees one value, whatever changes
        if self.zeros:
            for value in self.known:
                family.add_metric([self.vm, *value], 1.0 if value == current else 0.0)
        elif current is not None:
            family.add_metric([self.vm, *current], 1.0)
        yield family


class AgentMetrics:
    """The collectors of one exporter, fed with the agent's artifacts. No I/O.

    Implements :class:`~kemari_suite.service.metrics.MetricsSink`.
    """

    def __init__(self, vm: str, states: Mapping[str, Sequence[str]]) -> None:
        self.vm = vm
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["vm"], buckets=BUCKETS_S, registry=r)

        self.pause = histogram(
            "kemari_pause_seconds", "Time the VM was stopped for one sync point"
        ).labels(vm)
        self.transfer = histogram(
            "kemari_transfer_seconds",
            "Time sending one epoch took after the VM resumed (0: sent while stopped)",
        ).labels(vm)
        self.ack = histogram(
            "kemari_ack_seconds", "Time from an epoch's last byte sent to its acknowledgement"
        ).labels(vm)
        self.sync_points = Counter(
            "kemari_sync_points_total",
            "Sync points (checkpoints) taken",
            ["vm", "trigger"],
            registry=r,
        )
        self.replicated = Counter(
            "kemari_replicated_bytes_total",
            "Bytes sent to the standby at sync points",
            ["vm"],
            registry=r,
        ).labels(vm)
        self.state = _OneOf(
            "kemari_state",
            "1 for the agent's current role and state, 0 for the other states",
            ("role", "state"),
            vm,
            zeros=True,
        )
        self.state.declare([(role, s) for role, names in states.items() for s in names])
        r.register(self.state)
        self.tracker = _OneOf(
            "kemari_tracker_info",
            "The dirty-page tracker in use (always 1)",
            ("tracker",),
            vm,
            zeros=False,
        )
        r.register(self.tracker)
        self.epoch_lag = Gauge(
            "kemari_epoch_lag",
            "Epochs closed on the primary and not yet acknowledged by the standby",
            ["vm"],
            registry=r,
        )
        self.committed_epoch = Gauge(
            "kemari_committed_epoch", "Last epoch the standby committed", ["vm"], registry=r
        )
        self.held_bytes = Gauge(
            "kemari_held_output_bytes",
            "Guest output (disk write data, network frames) held until its epoch commits",
            ["vm"],
            registry=r,
        )
        counters = {
            "failovers": ("kemari_failovers_total", "Takeovers by the standby", "outcome"),
            "switchovers": ("kemari_switchovers_total", "Planned switchovers", "outcome"),
            "takeovers_refused": (
                "kemari_takeovers_refused_total",
                "Failovers and switchovers the standby refused",
                "kind",
            ),
            "fenced": ("kemari_fenced_total", "Times the primary stopped its VM for good", ""),
            "link_resets": ("kemari_link_resets_total", "Replication links that ended", "cause"),
        }
        made = {
            key: Counter(name, doc, ["vm", label] if label else ["vm"], registry=r)
            for key, (name, doc, label) in counters.items()
        }
        # Every counted event's series exists at 0 from the start, so rate() and
        # increase() see its first increment.
        self._counted = {
            kind: made[key].labels(self.vm, value) if value else made[key].labels(self.vm)
            for kind, (key, value) in COUNTED_EVENTS.items()
        }

    def attach(self, artifacts: Artifacts, *, role: str, state: str) -> None:
        """Feed from ``artifacts`` (a new agent: after a switchover the node runs another
        role); ``state`` is its initial state, which it announces with no event."""
        self.tracker.set(None)
        for gauge in (self.epoch_lag, self.committed_epoch, self.held_bytes):
            gauge.clear()  # the previous agent's, until this one's status says
        self.state.set((role, state))
        artifacts.metrics = self

    # ---- the sink: what Artifacts forwards ------------------------------------------

    def checkpoint(self, m: CheckpointMetrics) -> None:
        self.pause.observe(m.pause_ms / 1e3)
        self.transfer.observe(m.transfer_ms / 1e3)
        self.ack.observe(m.ack_ms / 1e3)
        self.sync_points.labels(self.vm, m.trigger or "unknown").inc()
        self.replicated.inc(m.bytes_sent)
        if m.tracker:
            self.tracker.set((m.tracker,))

    def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        counter = self._counted.get(kind)
        if counter is not None:
            counter.inc()
        elif kind == "state" and fields.get("role") and fields.get("state"):
            self.state.set((str(fields["role"]), str(fields["state"])))
        elif kind == "tracker" and fields.get("name"):
            self.tracker.set((str(fields["name"]),))

    def status(self, status: Mapping[str, Any]) -> None:
        """Take the gauges a status holds; drop those it does not (the secondary has no
        open epoch and holds no output)."""
        epoch = _int(status.get("epoch"))
        committed = _int(status.get("last_committed_epoch"))
        lag = None if epoch is None or committed is None else max(0, epoch - 1 - committed)
        _set_or_drop(self.epoch_lag, self.vm, lag)
        _set_or_drop(self.committed_epoch, self.vm, committed)
        _set_or_drop(self.held_bytes, self.vm, _int(status.get("held_bytes")))
        tracker = status.get("tracker")
        if isinstance(tracker, str) and tracker:
            self.tracker.set((tracker,))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _set_or_drop(gauge: Gauge, vm: str, value: int | None) -> None:
    if value is not None:
        gauge.labels(vm).set(value)
    else:
        gauge.clear()


class MetricsServer:
    """prometheus_client's HTTP server for one registry, on a thread; :meth:`close` ends it."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry) -> MetricsServer:
        """Serve ``registry`` on ``listen`` ("host:port"; port 0 picks a free one).

        Raises:
            ConfigError: (naming ``metrics.listen``) a bad address, one this host does not
                have, or a port in use.
        """
        host, port = parse_listen(listen, key=LISTEN_KEY, example="10.0.0.1:9410")
        try:
            httpd, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise ConfigError(
                f"cannot serve /metrics on {listen}: {err.strerror or err}", key=LISTEN_KEY
            ) from err
        return cls(httpd, thread)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port (waits for the server's poll, up to 0.5 s)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


class Observed(Protocol):
    """What the node's exporter reads of an agent (primary or secondary)."""

    artifacts: Artifacts

    @property
    def state(self) -> enum.Enum: ...

    def status_dict(self) -> dict[str, Any]: ...


class Exporter:
    """One node's exporter: the collectors and the server that serves them."""

    def __init__(self, metrics: AgentMetrics, server: MetricsServer) -> None:
        self.metrics = metrics
        self.server = server

    def attach(self, agent: Observed, role: str) -> None:
        """Export ``agent`` (call before it starts: its first events count)."""
        self.metrics.attach(agent.artifacts, role=role, state=str(agent.state.value))

    def sample(self, status: Callable[[], Mapping[str, Any]]) -> asyncio.Task[None]:
        """Hand ``status()`` to the collectors every :data:`STATUS_INTERVAL_S` until the
        returned task is cancelled (it runs on the caller's event loop)."""
        return asyncio.create_task(self._sample(status))

    async def _sample(self, status: Callable[[], Mapping[str, Any]]) -> None:
        while True:
            try:
                self.metrics.status(status())
            except Exception as err:  # a status mid-shutdown; the next one will do
                log.debug("metrics: status sample failed: %s", err)
            await asyncio.sleep(STATUS_INTERVAL_S)

    def close(self) -> None:
        self.server.close()


def serve(cfg: MetricsConfig, *, vm: str, states: Mapping[str, Sequence[str]]) -> Exporter | None:
    """Start the exporter ``cfg`` asks for, labelled ``vm``; None when it is off (the
    default). ``states`` lists each role's states (all exported, 0 or 1).

    Raises:
        ConfigError: (naming ``metrics.listen``) the address is bad or its port in use.
    """
    if not cfg.listen:
        return None
    metrics = AgentMetrics(vm, states)
    server = MetricsServer.start(cfg.listen, metrics.registry)
    log.info("serving Prometheus metrics on http://%s/metrics", cfg.listen)
    return Exporter(metrics, server)


__all__ = [
    "COUNTED_EVENTS",
    "LISTEN_KEY",
    "AgentMetrics",
    "Exporter",
    "MetricsServer",
    "serve",
]
