"""Losing the secondary: the primary goes on unprotected (the witness agrees), then
re-protects when a secondary comes back, and a later failover still works."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def _alerts(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_alert(path: Path, kind: str, node: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in _alerts(path):
            if a["kind"] == kind and a["node"] == node:
                return a
        time.sleep(0.2)
    raise AssertionError(f"no {kind} alert from {node}: {_alerts(path)}")


def test_secondary_loss_unprotected_then_reprotected(
    lab_factory, base_config: KemariConfig, tmp_path: Path
) -> None:
    lay = lab_factory()
    # A real hook: it appends each alert (JSON on stdin) to a file.
    log = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {log}\necho >> {log}\n")
    hook.chmod(0o755)
    pair = LabPair(lay, base_config, PairOptions(alert_hook=str(hook)))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        pair.kill("secondary")
        st = pair.wait_state("primary", {"unprotected"}, 30)
        assert "witness confirmed" in st["reason"]
        assert st["protected"] is False
        alert = _wait_alert(log, "unprotected", "primary")
        assert alert["vm"] == "guest" and "witness confirmed" in alert["reason"]
        before = pair.read_counter()
        pair.start_secondary()
        st = pair.wait_state("primary", {"protected"}, 120)
        assert st["last_committed_epoch"] > 0
        # The new secondary holds a full, current replica: a failover works from it.
        pair.wait_state("secondary", {"standby"}, 30)
        pair.kill("primary")
        sec = pair.wait_state("secondary", {"active"}, 60)
        assert _wait_alert(log, "failover", "secondary")["reason"].startswith("resumed epoch")
        probes = sec["failover"]["probes"]
        assert probes.get("counter", -1) >= before
        assert pair.wait_counter(60) >= probes["counter"]
    finally:
        pair.stop()


def test_checkpoint_command_and_status(lab_factory, base_config: KemariConfig) -> None:
    from kemari_suite.service import control

    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(max_interval_ms=2000))
    try:
        pair.start()
        st = pair.wait_state("primary", {"protected"}, 180)
        res = control.request(pair.control_path("primary"), "checkpoint", timeout=30)
        assert res["epoch"] >= st["last_committed_epoch"]
        after = pair.status("primary")
        assert after["last_committed_epoch"] >= res["epoch"]
        sec = pair.status("secondary")
        assert sec["state"] == "standby" and sec["last_committed_epoch"] >= res["epoch"]
    finally:
        pair.stop()


def test_guest_shutdown_is_forwarded_not_failed_over(
    lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(workload="sleep 15; poweroff -f"))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        rc = pair.wait_exit("primary", 90)
        assert rc == 0, pair.output("primary")[-2000:]
        st = pair.wait_state("secondary", {"stopped"}, 30)
        assert "SHUTDOWN" in st["reason"]
        assert "SHUTDOWN" in [e["name"] for e in st["guest_events"]]
        # Well past the heartbeat timeout: still no failover.
        import time

        time.sleep(4)
        assert pair.status("secondary")["state"] == "stopped"
        assert pair.qemu_pid("secondary") is None
    finally:
        pair.stop()


def test_no_tiebreaker_means_operator_failover(lab_factory, base_config: KemariConfig) -> None:
    from kemari_suite.service import control

    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(tiebreaker="none"))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        pair.kill("primary")
        import time

        time.sleep(5)  # well past the 3 s heartbeat timeout
        st = pair.status("secondary")
        assert st["state"] == "standby", st
        assert "no tiebreaker" in st["reason"]
        assert pair.qemu_pid("secondary") is None
        report = control.request(pair.control_path("secondary"), "failover", timeout=60)
        assert report["epoch"] >= 1
        assert pair.wait_counter(60) >= report["probes"]["counter"]
    finally:
        pair.stop()


def test_poweroff_after_failover_ends_protection_on_the_survivor(
    lab_factory, base_config: KemariConfig, tmp_path: Path
) -> None:
    lay = lab_factory()
    log = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {log}\necho >> {log}\n")
    hook.chmod(0o755)
    # The guest powers off by itself some seconds after the failover.
    opts = PairOptions(workload="sleep 20; poweroff -f", alert_hook=str(hook))
    pair = LabPair(lay, base_config, opts)
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.settle()
        pair.kill("primary")
        pair.wait_state("secondary", {"active"}, 60)
        # The survivor sees the poweroff itself, records it and ends cleanly.
        rc = pair.wait_exit("secondary", 120)
        assert rc == 0, pair.output("secondary")[-2000:]
        assert pair.qemu_pid("secondary") is None or not _alive(pair.qemu_pid("secondary"))
        alert = _wait_alert(log, "guest", "secondary")
        assert "SHUTDOWN" in alert["reason"]
    finally:
        pair.stop()
    events = [
        json.loads(line)
        for f in sorted(pair.run_dir("secondary").glob("artifacts/*/events.jsonl"))
        for line in f.read_text().splitlines()
    ]
    guest = [e for e in events if e["event"] == "guest"]
    assert [g["name"] for g in guest] == ["SHUTDOWN"] and guest[0]["node"] == "secondary"
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states[-2:] == ["active", "stopped"], states


def _alive(pid: int | None) -> bool:
    import os

    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
