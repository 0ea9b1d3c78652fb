"""The exact sequence of states each host goes through: protect, a checkpoint, a
failover (the primary host killed), re-protection when the failed host returns as a
standby, and a planned switchover back. Read from every agent's ``state`` events, in
the order they happened on that host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.service import control
from kemari_suite.vm import wphelper
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def transitions(run_dir: Path) -> list[tuple[str, str, str]]:
    """(role, old, new) of every state change recorded on one host, oldest first."""
    rows: list[dict[str, Any]] = []
    for events in sorted(run_dir.glob("artifacts/*/events.jsonl")):
        for line in events.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "state":
                rows.append(rec)
    rows.sort(key=lambda r: r["t"])
    return [(r["role"], r["old"], r["state"]) for r in rows]


def settle_switchover_race(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``rows`` with a primary's brief starting -> unprotected -> syncing read as
    starting -> syncing, when it follows a resume (``failing-over -> active``)."""
    out: list[tuple[str, str, str]] = []
    for row in rows:
        if (
            row == ("primary", "unprotected", "syncing")
            and out[-1:] == [("primary", "starting", "unprotected")]
            and ("secondary", "failing-over", "active") in out
        ):
            out[-1] = ("primary", "starting", "syncing")
            continue
        out.append(row)
    return out


def test_states_through_protect_failover_reprotect_and_switchover(
    lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(reprotect=True))
    try:
        pair.start()
        first = pair.wait_state("primary", {"protected"}, 180)
        res = control.request(pair.control_path("primary"), "checkpoint", timeout=30)
        assert res["epoch"] >= 1
        # Every checkpoint's metrics row names the tracker that status names.
        rows = [
            json.loads(line)
            for f in pair.run_dir("primary").glob("artifacts/*/checkpoints.jsonl")
            for line in f.read_text().splitlines()
        ]
        assert rows and {r["tracker"] for r in rows} == {first["tracker"]}
        pair.wait_state("secondary", {"standby"}, 30)

        # Failover: host a dies, host b resumes the VM and protects it again as primary.
        pair.kill("primary")
        st = pair.wait_state("secondary", {"unprotected"}, 60)
        assert st["role"] == "primary" and st["failover"]["epoch"] >= res["epoch"]
        # Host a comes back as the standby; host b re-protects towards it.
        pair.start_standby_on("primary")
        st = pair.wait_state("secondary", {"protected"}, 180)
        standby = pair.wait_state("primary", {"standby"}, 30)
        assert st["accel"] == standby["accel"] and st["accel"] in ("tcg", "kvm")
        if st["tracker"].endswith("+verify"):
            assert st["tracker_verify"]["scans"] > 0, st["tracker_verify"]
        else:
            assert st["tracker_verify"] is None
        # The QEMU the failover started carries the uffd-wp helper too: the new primary
        # tracks with it (checked against the compare tracker, KEMARI_TRACKER_VERIFY).
        if wphelper.probe_kernel()[0]:
            assert st["tracker"].startswith("uffd-wp"), st["tracker_reason"]

        # Planned switchover: the VM goes back to host a.
        out = pair.switchover("secondary")
        assert out["switched"] is True
        st = pair.wait_state("primary", {"protected"}, 180)
        pair.wait_state("secondary", {"standby"}, 60)
        if wphelper.probe_kernel()[0]:
            assert st["tracker"].startswith("uffd-wp"), st["tracker_reason"]
    finally:
        pair.stop()

    # After the switchover host a's new primary may try the link before host b's new
    # standby listens (two busy cores): it then runs unprotected for a moment, which is
    # the truth and allowed; nothing else may differ.
    host_a = settle_switchover_race(transitions(pair.run_dir("primary")))
    host_b = transitions(pair.run_dir("secondary"))
    assert host_a == [
        # protect
        ("primary", "starting", "syncing"),
        ("primary", "syncing", "protected"),
        # (killed: no transition recorded) back as the standby
        ("secondary", "waiting", "receiving"),
        ("secondary", "receiving", "standby"),
        # the switchover hands the VM back: resume, then protect as the primary
        ("secondary", "standby", "failing-over"),
        ("secondary", "failing-over", "active"),
        ("primary", "starting", "syncing"),
        ("primary", "syncing", "protected"),
        ("primary", "protected", "stopped"),
    ], host_a
    assert host_b == [
        ("secondary", "waiting", "receiving"),
        ("secondary", "receiving", "standby"),
        # failover, then re-protection from here
        ("secondary", "standby", "failing-over"),
        ("secondary", "failing-over", "active"),
        ("primary", "starting", "unprotected"),
        ("primary", "unprotected", "syncing"),
        ("primary", "syncing", "protected"),
        # switchover: this host becomes the standby again
        ("primary", "protected", "switched-over"),
        ("secondary", "waiting", "receiving"),
        ("secondary", "receiving", "standby"),
        ("secondary", "standby", "stopped"),
    ], host_b
