"""The Prometheus exporter: what an agent's artifacts become on ``/metrics``.

Every test scrapes over real HTTP (127.0.0.1, a port the kernel picks, so parallel
workers never collide) and parses with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kemari_suite.config import KemariConfig, MetricsConfig, load, with_overrides
from kemari_suite.errors import ConfigError
from kemari_suite.service import prometheus
from kemari_suite.service.metrics import Artifacts, CheckpointMetrics
from kemari_suite.service.prometheus import (
    COUNTED_EVENTS,
    LISTEN_KEY,
    AgentMetrics,
    Exporter,
    MetricsServer,
)

REPO = Path(__file__).resolve().parents[2]
STATES = {
    "primary": ["starting", "syncing", "protected", "held", "fenced", "stopped"],
    "secondary": ["waiting", "receiving", "standby", "active", "stopped"],
}

#: (sample name, labels without vm) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, *, vm: str = "web1") -> Samples:
    """GET /metrics, parsed; every sample must carry ``vm``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("vm") == vm, f"{s.name} {s.labels}"
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "vm")
            out[(s.name, labels)] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def row(epoch: int, trigger: str, pause_ms: float, **kw: Any) -> CheckpointMetrics:
    base: dict[str, Any] = dict(
        stop_ms=0.5,
        devstate_ms=1.0,
        scan_ms=0.5,
        stage_ms=0.2,
        dirty_pages=10,
        devstate_bytes=300_000,
        bytes_sent=1000,
    )
    base.update(kw)
    return CheckpointMetrics(epoch=epoch, trigger=trigger, pause_ms=pause_ms, **base)


@dataclass
class Served:
    metrics: AgentMetrics
    server: MetricsServer

    def scrape(self) -> Samples:
        return scrape(self.server.port, vm=self.metrics.vm)


@pytest.fixture
def served() -> Iterator[Served]:
    metrics = AgentMetrics("web1", STATES)
    server = MetricsServer.start("127.0.0.1:0", metrics.registry)
    try:
        yield Served(metrics, server)
    finally:
        server.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[Artifacts]:
    a = Artifacts(tmp_path / "run")
    try:
        yield a
    finally:
        a.close()


# ---- checkpoint rows ---------------------------------------------------------------


def test_checkpoint_rows_fill_the_histograms_and_counters(served: Served) -> None:
    m = served.metrics
    m.checkpoint(
        row(1, "net", 2.0, transfer_ms=1.0, ack_ms=3.0, bytes_sent=1000, tracker="uffd-wp")
    )
    m.checkpoint(
        row(2, "net", 4.0, transfer_ms=0.0, ack_ms=1.0, bytes_sent=2000, tracker="uffd-wp")
    )
    m.checkpoint(row(3, "interval", 30.0, transfer_ms=60.0, ack_ms=2.0, bytes_sent=3000))
    got = served.scrape()

    assert value(got, "kemari_pause_seconds_count") == 3
    assert value(got, "kemari_pause_seconds_sum") == pytest.approx(0.036)
    assert value(got, "kemari_pause_seconds_bucket", le="0.0025") == 1
    assert value(got, "kemari_pause_seconds_bucket", le="0.005") == 2
    assert value(got, "kemari_pause_seconds_bucket", le="0.025") == 2
    assert value(got, "kemari_pause_seconds_bucket", le="0.05") == 3
    assert value(got, "kemari_pause_seconds_bucket", le="+Inf") == 3
    assert value(got, "kemari_transfer_seconds_sum") == pytest.approx(0.061)
    assert value(got, "kemari_transfer_seconds_bucket", le="0.0005") == 1  # the 0
    assert value(got, "kemari_ack_seconds_sum") == pytest.approx(0.006)
    assert value(got, "kemari_ack_seconds_count") == 3
    assert series(got, "kemari_sync_points_total") == {
        frozenset({("trigger", "net")}): 2.0,
        frozenset({("trigger", "interval")}): 1.0,
    }
    assert value(got, "kemari_replicated_bytes_total") == 6000
    # The third row named no tracker: the last one named stays.
    assert series(got, "kemari_tracker_info") == {frozenset({("tracker", "uffd-wp")}): 1.0}


def test_a_new_tracker_replaces_the_old_one(served: Served) -> None:
    served.metrics.event("tracker", {"name": "soft-dirty", "reason": "no uffd-wp"})
    assert series(served.scrape(), "kemari_tracker_info") == {
        frozenset({("tracker", "soft-dirty")}): 1.0
    }
    served.metrics.checkpoint(row(1, "net", 1.0, tracker="compare+verify"))
    assert series(served.scrape(), "kemari_tracker_info") == {
        frozenset({("tracker", "compare+verify")}): 1.0
    }


# ---- events, through the artifact folder ----------------------------------------------


def test_events_written_to_the_artifacts_are_counted(served: Served, artifacts: Artifacts) -> None:
    served.metrics.attach(artifacts, role="secondary", state="waiting")
    for kind, fields in [
        ("state", {"role": "secondary", "old": "waiting", "state": "receiving"}),
        ("primary-connected", {"peer": "10.0.0.1:40000"}),
        ("rejected", {"reason": "bad MAC"}),
        ("primary-disconnected", {"reason": "reset by peer"}),
        ("failover-refused", {"reason": "tiebreaker refused"}),
        ("failover-refused", {"reason": "tiebreaker refused"}),
        ("switchover-refused", {"reason": "no committed epoch"}),
        ("failover-failed", {"reason": "qemu died"}),
        ("failover", {"reason": "heartbeat lost", "epoch": 41}),
        ("state", {"role": "secondary", "old": "failing-over", "state": "active"}),
        ("guest", {"name": "RESET", "node": "b"}),
    ]:
        artifacts.event(kind, **fields)
    got = served.scrape()

    assert value(got, "kemari_failovers_total", outcome="succeeded") == 1
    assert value(got, "kemari_failovers_total", outcome="failed") == 1
    assert value(got, "kemari_takeovers_refused_total", kind="failover") == 2
    assert value(got, "kemari_takeovers_refused_total", kind="switchover") == 1
    assert value(got, "kemari_link_resets_total", cause="lost") == 1
    assert value(got, "kemari_link_resets_total", cause="rejected") == 1
    assert value(got, "kemari_fenced_total") == 0
    assert value(got, "kemari_switchovers_total", outcome="succeeded") == 0
    # The events still reach the file as before.
    lines = (artifacts.root / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines][-2:] == ["state", "guest"]


def test_the_primary_side_counts_fencing_switchovers_and_lost_secondaries(
    served: Served, artifacts: Artifacts
) -> None:
    served.metrics.attach(artifacts, role="primary", state="starting")
    artifacts.event("secondary-lost", reason="heartbeat timeout")
    artifacts.event("switchover-failed", reason="refused")
    artifacts.event("switchover", switched=True, epoch=7)
    artifacts.event("fenced", reason="lease lost")
    got = served.scrape()
    assert value(got, "kemari_link_resets_total", cause="lost") == 1
    assert value(got, "kemari_switchovers_total", outcome="failed") == 1
    assert value(got, "kemari_switchovers_total", outcome="succeeded") == 1
    assert value(got, "kemari_fenced_total") == 1


def test_state_is_one_hot_over_every_state_of_both_roles(
    served: Served, artifacts: Artifacts
) -> None:
    served.metrics.attach(artifacts, role="primary", state="starting")
    got = series(served.scrape(), "kemari_state")
    assert len(got) == sum(len(v) for v in STATES.values())
    assert [dict(k) for k, v in got.items() if v == 1] == [{"role": "primary", "state": "starting"}]
    artifacts.event("state", role="primary", old="starting", state="protected", reason="")
    got = series(served.scrape(), "kemari_state")
    assert [dict(k) for k, v in got.items() if v == 1] == [
        {"role": "primary", "state": "protected"}
    ]
    assert sum(got.values()) == 1


def test_a_role_change_moves_the_state_and_keeps_the_counters(
    served: Served, tmp_path: Path
) -> None:
    """A switchover: the node's next agent is a secondary, exported by the same exporter."""
    first = Artifacts(tmp_path / "primary")
    served.metrics.attach(first, role="primary", state="starting")
    first.event("tracker", name="uffd-wp", reason="")
    first.event("switchover", switched=True, epoch=9)
    first.status({"epoch": 10, "last_committed_epoch": 9, "held_bytes": 512})
    first.close()
    # A late report of the old agent counts no more.
    first.event("fenced", reason="late")

    second = Artifacts(tmp_path / "secondary")
    try:
        served.metrics.attach(second, role="secondary", state="waiting")
        second.status({"last_committed_epoch": -1})
        got = served.scrape()
    finally:
        second.close()
    on = [dict(k) for k, v in series(got, "kemari_state").items() if v == 1]
    assert on == [{"role": "secondary", "state": "waiting"}]
    assert value(got, "kemari_switchovers_total", outcome="succeeded") == 1
    assert value(got, "kemari_fenced_total") == 0
    assert series(got, "kemari_tracker_info") == {}
    assert series(got, "kemari_epoch_lag") == {}
    assert series(got, "kemari_held_output_bytes") == {}
    assert value(got, "kemari_committed_epoch") == -1


# ---- status ------------------------------------------------------------------------


def test_status_sets_epoch_lag_committed_epoch_and_held_bytes(served: Served) -> None:
    # Epoch 10 is open; 8 and 9 are closed and unacknowledged.
    served.metrics.status({"epoch": 10, "last_committed_epoch": 7, "held_bytes": 4096})
    got = served.scrape()
    assert value(got, "kemari_epoch_lag") == 2
    assert value(got, "kemari_committed_epoch") == 7
    assert value(got, "kemari_held_output_bytes") == 4096
    # Just adopted after a failover: the open epoch is the committed one.
    served.metrics.status({"epoch": 41, "last_committed_epoch": 41, "held_bytes": 0})
    got = served.scrape()
    assert value(got, "kemari_epoch_lag") == 0
    assert value(got, "kemari_held_output_bytes") == 0


def test_a_failing_sink_never_gets_in_the_way_of_the_artifacts(
    artifacts: Artifacts, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def checkpoint(self, m: CheckpointMetrics) -> None:
            raise RuntimeError("collector bug")

        def event(self, kind: str, fields: Any) -> None:
            raise RuntimeError("collector bug")

        def status(self, status: Any) -> None:
            raise RuntimeError("collector bug")

    artifacts.metrics = Broken()
    with caplog.at_level(logging.ERROR, logger="kemari_suite.service.metrics"):
        artifacts.checkpoint(row(1, "net", 1.0))
        artifacts.event("fenced", reason="x")
        artifacts.status({"state": "stopped"})
    assert (artifacts.root / "checkpoints.jsonl").read_text().count("\n") == 1
    assert json.loads((artifacts.root / "status.json").read_text()) == {"state": "stopped"}
    assert len([r for r in caplog.records if "not exported" in r.getMessage()]) == 1


class _State(enum.Enum):
    STANDBY = "standby"


@dataclass
class _FakeAgent:
    artifacts: Artifacts
    state: _State = _State.STANDBY
    calls: list[int] = field(default_factory=list)

    def status_dict(self) -> dict[str, Any]:
        self.calls.append(1)
        if len(self.calls) == 2:
            raise AttributeError("mid-shutdown")
        return {"last_committed_epoch": 100 + len(self.calls)}


def test_the_node_samples_the_status_until_cancelled(
    served: Served, artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus, "STATUS_INTERVAL_S", 0.01)
    exporter = Exporter(served.metrics, served.server)
    agent = _FakeAgent(artifacts)
    exporter.attach(agent, "secondary")
    assert artifacts.metrics is served.metrics

    async def run() -> None:
        task = exporter.sample(agent.status_dict)
        while len(agent.calls) < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    got = served.scrape()
    # The failed second sample did not end the sampler.
    assert value(got, "kemari_committed_epoch") >= 104
    on = [dict(k) for k, v in series(got, "kemari_state").items() if v == 1]
    assert on == [{"role": "secondary", "state": "standby"}]


# ---- the server --------------------------------------------------------------------


def test_two_exporters_in_one_process_do_not_clash() -> None:
    a, b = AgentMetrics("web1", STATES), AgentMetrics("db1", STATES)
    sa = MetricsServer.start("127.0.0.1:0", a.registry)
    sb = MetricsServer.start("127.0.0.1:0", b.registry)
    try:
        a.checkpoint(row(1, "net", 1.0))
        b.checkpoint(row(1, "net", 1.0))
        b.checkpoint(row(2, "disk", 1.0))
        assert value(scrape(sa.port, vm="web1"), "kemari_pause_seconds_count") == 1
        assert value(scrape(sb.port, vm="db1"), "kemari_pause_seconds_count") == 2
    finally:
        sa.close()
        sb.close()


def test_serve_from_the_config_and_close_frees_the_port() -> None:
    exporter = prometheus.serve(MetricsConfig(listen="127.0.0.1:0"), vm="web1", states=STATES)
    assert exporter is not None
    port = exporter.server.port
    assert ("kemari_fenced_total", frozenset()) in scrape(port)
    exporter.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with socket.socket() as s:
        # As a restarted agent binds it (the scrape's connection may be in TIME_WAIT).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # nobody listens there any more
        s.listen()


def test_a_port_in_use_is_refused_naming_the_key() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = MetricsConfig(listen=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError) as err:
            prometheus.serve(cfg, vm="web1", states=STATES)
    assert err.value.key == LISTEN_KEY == "metrics.listen"
    assert "metrics.listen" in str(err.value) and "in use" in str(err.value)


def test_an_address_this_host_does_not_have_is_refused() -> None:
    cfg = MetricsConfig(listen="192.0.2.1:9410")  # TEST-NET-1: on no interface here
    with pytest.raises(ConfigError) as err:
        prometheus.serve(cfg, vm="web1", states=STATES)
    assert err.value.key == "metrics.listen"


# ---- off by default, and the config ---------------------------------------------------


def test_off_by_default_serves_nothing() -> None:
    """Nothing is served, no thread started, and prometheus_client is never imported."""
    probe = (
        "import sys, threading\n"
        "from kemari_suite.config import KemariConfig\n"
        "from kemari_suite.node import _serve_metrics\n"
        "before = threading.active_count()\n"
        "assert KemariConfig().metrics.listen == ''\n"
        "assert _serve_metrics(KemariConfig(), 'web1') is None\n"
        "assert threading.active_count() == before\n"
        "assert 'prometheus_client' not in sys.modules, 'imported while off'\n"
        "print('off')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "off"
    threads = threading.active_count()
    assert prometheus.serve(MetricsConfig(), vm="web1", states=STATES) is None
    assert threading.active_count() == threads


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("9410", "is not host:port"),
        (":9410", "names no host"),
        ("[]:9410", "names no host"),
        ("10.0.0.1", "is not host:port"),
        ("10.0.0.1:", "no valid port"),
        ("10.0.0.1:http", "no valid port"),
        ("10.0.0.1:0", "no valid port"),
        ("10.0.0.1:65536", "no valid port"),
    ],
)
def test_a_bad_address_is_refused_naming_the_key(tmp_path: Path, listen: str, words: str) -> None:
    path = tmp_path / "k.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "metrics.listen"
    assert words in err.value.reason
    assert str(path) in str(err.value) and "metrics.listen" in str(err.value)
    with pytest.raises(ConfigError) as err:
        with_overrides(KemariConfig(), metrics={"listen": listen})
    assert err.value.key == "metrics.listen"


@pytest.mark.parametrize("listen", ["10.0.0.1:9410", "[::1]:9410", "0.0.0.0:9410", "h1:1"])
def test_good_addresses_load(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "k.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    assert load(path).metrics.listen == listen


def test_an_unknown_metrics_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text("[metrics]\nport = 9410\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "metrics.port"


# ---- honesty: events, dashboard and docs match the exporter ----------------------------


def emitted_events() -> set[str]:
    """Every event name passed as a literal to ``artifacts.event(...)`` in kemari_suite."""
    found: set[str] = set()
    pattern = re.compile(r"artifacts\.event\(\s*\"([a-z-]+)\"")
    for path in (REPO / "kemari_suite").rglob("*.py"):
        found.update(pattern.findall(path.read_text()))
    return found


def test_every_counted_event_is_still_emitted() -> None:
    emitted = emitted_events()
    assert {"state", "tracker", "failover", "fenced"} <= emitted  # the scan works
    missing = sorted(set(COUNTED_EVENTS) - emitted)
    assert not missing, f"counted but never emitted (renamed?): {missing}"


def full_scrape() -> Samples:
    """A scrape where every series the exporter can serve exists."""
    m = AgentMetrics("web1", STATES)
    server = MetricsServer.start("127.0.0.1:0", m.registry)
    try:
        m.checkpoint(row(1, "net", 1.0, tracker="compare"))
        m.status({"epoch": 2, "last_committed_epoch": 1, "held_bytes": 1})
        return scrape(server.port)
    finally:
        server.close()


def dashboard_queries() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                # A panel's or annotation's expr; a query variable's query and definition.
                promql = k == "expr" or (
                    k in ("query", "definition") and node.get("type") == "query"
                )
                if promql and isinstance(v, str):
                    yield v
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    return list(walk(json.loads((REPO / "docs/grafana/kemari.json").read_text())))


def test_every_metric_and_label_the_dashboard_queries_is_served() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    served = full_scrape()
    names = {name for name, _ in served}
    labels = {k for _, ls in served for k, _ in ls} | {"vm", "le", "instance", "job"}
    used = {n for q in queries for n in re.findall(r"\bkemari_[a-z_]+\b", q)}
    assert not sorted(used - names), f"the dashboard queries unknown metrics: {used - names}"
    by = {
        label.strip()
        for q in queries
        for group in re.findall(r"\bby \(([^)]*)\)", q)
        for label in group.split(",")
    }
    selected = {k for q in queries for k in re.findall(r"([a-z_]+)=~?\"", q)}
    assert not sorted((by | selected) - labels), (by | selected) - labels
    # The panels the dashboard promises.
    for wanted in (
        "kemari_pause_seconds_bucket",
        "kemari_sync_points_total",
        "kemari_epoch_lag",
        "kemari_held_output_bytes",
        "kemari_state",
        "kemari_failovers_total",
    ):
        assert wanted in used, wanted


def test_the_docs_list_every_metric_served() -> None:
    doc = (REPO / "docs/prometheus.md").read_text()
    names = {name for name, _ in full_scrape() if not name.endswith("_created")}
    histograms = {n.removesuffix("_bucket") for n in names if n.endswith("_bucket")}
    listed = {n for n in names if re.sub(r"_(bucket|count|sum)$", "", n) not in histograms}
    listed |= histograms
    assert len(listed) == 15
    missing = sorted(n for n in listed if f"`{n}`" not in doc)
    assert not missing, f"docs/prometheus.md does not list {missing}"
