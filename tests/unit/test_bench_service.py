"""The service campaign's bookkeeping: outage, gaps and the report (no VM here; the
campaign itself runs in tests/e2e/test_debian_service.py)."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
from pathlib import Path
from typing import Any

from kemari_suite.bench.service import (
    Client,
    Request,
    by_clients_figures,
    summary,
    warmup_figures,
    write_results,
)


def _client(reqs: list[tuple[float, float, int]]) -> Client:
    c = Client("ns", "10.0.0.2")
    c.requests = [Request(f"r{i}", b"x", t0, t1, code) for i, (t0, t1, code) in enumerate(reqs)]
    return c


def test_outage_counts_only_requests_sent_after_the_kill() -> None:
    # An answer already on its way at t=10 (sent at 9.9) says nothing about the outage.
    c = _client([(9.9, 10.05, 201), (10.1, 13.0, 0), (10.2, 14.2, 201), (14.3, 14.4, 201)])
    assert c.first_success_after(10.0) == 14.2
    assert c.first_success_after(20.0) is None


def test_longest_gap_and_committed() -> None:
    c = _client([(0, 1.0, 201), (1, 2.0, 201), (2, 6.5, 201), (6.5, 7.0, 0), (7, 7.2, 204)])
    assert c.longest_gap(0.0, 8.0) == 4.5
    assert abs(c.longest_gap(6.6, 7.3) - 0.6) < 1e-9
    assert set(c.committed()) == {"r0", "r1", "r2", "r4"}


def test_report_states_the_figures(tmp_path: Path) -> None:
    m = {"seconds": 10, "stored": 100, "failed": 0, "per_s": 10.0}
    res = {
        "profile": "10g",
        "memory_mib": 256,
        "vcpus": 2,
        "policy": "kemari",
        "unprotected": m | {"per_s": 100.0, "latency_p50_ms": 30.0, "latency_p99_ms": 60.0},
        "protected": m
        | {
            "latency_p50_ms": 200.0,
            "latency_p99_ms": 400.0,
            "sync": {
                "syncs_per_s": 30.0,
                "paused_share": 0.7,
                "pause_p50_ms": 23.0,
                "pause_p99_ms": 33.0,
                "ack_p50_ms": 3.0,
                "dirty_pages_p50": 160,
                "triggers": {"policy": 300},
            },
        },
        "throughput_ratio": 0.1,
        "kills": [
            {
                "victim": "primary",
                "outage_s": 4.0,
                "agent_failover_ms": 350.0,
                "reprotected_s": 10.0,
                "spot_checked": 5,
                "spot_missing": [],
            }
        ],
        "switchovers": [
            {
                "from": "primary",
                "pause_ms": 120.0,
                "peer_resume_ms": 70.0,
                "client_longest_gap_s": 0.4,
                "client_failed": 0,
            }
        ],
        "outage_p50_s": 4.0,
        "outage_max_s": 4.0,
        "check": {
            "committed": 1000,
            "missing_live": [],
            "fsck_clean": True,
            "offline_missing": [],
            "offline_mismatched": [],
        },
        "ok": True,
    }
    md = write_results(res, tmp_path, "kemari bench service").read_text()
    assert "| unprotected (warm: the baseline) | 100.0 |" in md
    assert "Protected / unprotected throughput: 0.10" in md
    assert "never captured" not in md  # no cold figure recorded, no cold row
    assert "| 1 | primary | 4.00 | - | - | 350 | - | 10 | 5/5 |" in md
    assert "| primary host | 120 | 70 | 0.40 | 0 |" in md
    assert "70.0% of the time" in md
    assert "nothing lost" in md
    assert (tmp_path / "service.json").exists()


def test_report_shows_the_cold_and_warm_baselines(tmp_path: Path) -> None:
    m = {"seconds": 10, "stored": 100, "failed": 0, "latency_p50_ms": 1.0, "latency_p99_ms": 2.0}
    cold, warm = m | {"per_s": 40.0}, m | {"per_s": 50.0}
    wu = warmup_figures(cold, warm)
    assert wu["cold_per_s"] == 40.0 and wu["warm_per_s"] == 50.0 and wu["ratio"] == 1.25
    assert warmup_figures(m | {"per_s": 0.0}, warm)["ratio"] is None
    res = {
        "profile": "10g",
        "memory_mib": 256,
        "vcpus": 2,
        "unprotected_cold": cold,
        "unprotected": warm,
        "protected": m | {"per_s": 10.0},
        "warmup": wu,
        "throughput_ratio": 0.2,
        "kills": [],
        "outage_p50_s": None,
        "outage_max_s": None,
        "check": {
            "committed": 0,
            "missing_live": [],
            "fsck_clean": True,
            "offline_missing": [],
            "offline_mismatched": [],
        },
        "ok": True,
    }
    md = write_results(res, tmp_path, "kemari bench service").read_text()
    assert "| unprotected, never captured (cold) | 40.0 |" in md
    assert "| unprotected (warm: the baseline) | 50.0 |" in md
    assert "warm / cold 1.25" in md


class _Records(http.server.BaseHTTPRequestHandler):
    """Stores PUT bodies; every second answer closes the connection without saying so
    (as nginx does to an idle kept-alive connection after its request limit)."""

    protocol_version = "HTTP/1.1"
    stored: dict[str, bytes] = {}
    answered = 0

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).stored[self.path] = body
        type(self).answered += 1
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = type(self).answered % 2 == 0

    def log_message(self, *args: object) -> None:
        pass


def test_kept_alive_put_goes_on_when_the_server_closed_the_connection() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Records)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = Client("ns", "127.0.0.1", port=srv.server_address[1], timeout_s=5)
        conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=5)
        codes = []
        for i in range(6):
            code, nxt = c._keepalive_put(conn, f"r{i}", f"body {i}".encode())
            codes.append(code)
            assert nxt is not None
            conn = nxt
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    assert codes == [201] * 6
    assert _Records.stored == {f"/records/r{i}": f"body {i}".encode() for i in range(6)}


def test_keepalive_put_reports_no_answer_as_zero() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    c = Client("ns", "127.0.0.1", port=port, timeout_s=2)
    code, conn = c._keepalive_put(
        http.client.HTTPConnection("127.0.0.1", port, timeout=2), "x", b"y"
    )
    assert (code, conn) == (0, None)


def _m(per_s: float, p50: float, pause: float | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"seconds": 8, "stored": 10, "failed": 0, "per_s": per_s}
    m |= {"latency_p50_ms": p50, "latency_p99_ms": 2 * p50}
    if pause is not None:
        m["sync"] = {
            "syncs_per_s": 30.0,
            "paused_share": 0.3,
            "pause_p50_ms": pause,
            "pause_p99_ms": 2 * pause,
            "ack_p50_ms": 3.0,
            "dirty_pages_p50": 100,
            "triggers": {"policy": 240},
        }
    return m


def test_by_clients_figures_and_the_json_line(tmp_path: Path) -> None:
    four = by_clients_figures(_m(40.0, 90.0, pause=20.0), _m(50.0, 60.0))
    assert four["throughput_ratio"] == 0.8
    assert four["added_latency_p50_ms"] == 30.0 and four["added_latency_over_pause"] == 1.5
    sixteen = by_clients_figures(_m(30.0, 300.0, pause=25.0), _m(100.0, 100.0))
    assert sixteen["throughput_ratio"] == 0.3 and sixteen["added_latency_over_pause"] == 8.0
    res: dict[str, Any] = {
        "profile": "10g",
        "memory_mib": 256,
        "vcpus": 2,
        "policy": "output",
        "heartbeat_timeout_ms": 1000,
        "clients": [4, 16],
        "by_clients": {"4": four, "16": sixteen},
        "protected": four["protected"],
        "unprotected": four["unprotected"],
        "throughput_ratio": 0.8,
        "kills": [],
        "switchovers": [{"from": "primary", "pause_ms": 90.0, "peer_resume_ms": 60.0,
                         "client_longest_gap_s": 0.25, "client_failed": 0}],
        "outage_p50_s": 1.4,
        "outage_max_s": 1.6,
        "soak": {"seconds": 1800, "clients": 4, "false_failovers": 0,
                 "events": {"rollback": 1}, "samples": 900, "not_protected_samples": 0,
                 "not_protected_states": {}, "stored": 9000, "failed": 0, "sync": {}},
        "check": {"committed": 123, "missing_live": [], "fsck_clean": True,
                  "offline_missing": [], "offline_mismatched": []},
        "ok": True,
    }  # fmt: skip
    line = summary(res)
    assert line["throughput_ratio"] == {"4": 0.8, "16": 0.3}
    assert line["outage_s_p50"] == 1.4 and line["switchover_gap_s_max"] == 0.25
    assert line["false_failovers"] == 0 and line["records_committed"] == 123
    json.dumps(line)  # the CLI prints it as one JSON line
    md = write_results(res, tmp_path, "kemari bench service --quick").read_text()
    assert "| 16 | 100.0 | 30.0 | 0.30 | 100.0 / 300.0 | 200.0 | 25.0 | 8.00 | 30.0 |" in md
    assert "False failovers (a takeover or a fence with both hosts alive): **0**" in md
    assert "rollback 1" in md
    assert "includes the 1.0 s heartbeat timeout" in md


def test_a_rewritten_record_counts_with_its_last_body_and_a_failed_rewrite_drops_it() -> None:
    c = Client("ns", "10.0.0.2")
    c.requests = [
        Request("g1w0-000000", b"one", 0.0, 0.1, 201),
        Request("g1w0-000001", b"two", 0.1, 0.2, 201),
        Request("g1w0-000000", b"three", 0.2, 0.3, 201),
        Request("g1w0-000001", b"four", 0.3, 5.0, 0),  # no answer: either body may be there
        Request("g2w0-000000", b"five", 5.0, 5.1, 201),
    ]
    assert c.committed() == {"g1w0-000000": b"three", "g2w0-000000": b"five"}
    c._gen = 2  # the writers started a second time: g2 names are being written now
    assert c.settled() == {"g1w0-000000": b"three"}
