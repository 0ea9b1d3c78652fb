"""A DRBD split brain seen from events2 by the DRBD backend: recorded, refused, alerted.

The 8.4 fixtures were recorded in the kernel lab (DRBD 8.4.11, drbd-utils 9.22; see
tests/fixtures/drbd/RECORDED-84.md). The backend runs a scripted ``drbdsetup`` (and
``drbdadm``) as real processes: the watch thread, the pipe and the stop are real.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kemari_suite.alerts import Alerter, AlertKind
from kemari_suite.config import AlertConfig
from kemari_suite.disk.drbd import DrbdBackend, DrbdConfig, DrbdNode, DrbdResource, DrbdTools
from kemari_suite.disk.drbd84 import status_from_events
from kemari_suite.disk.drbdevents import DrbdMonitor, SplitBrain, parse_events2
from kemari_suite.disk.drbdwatch import (
    RUNBOOK,
    EventsWatch,
    SplitBrainError,
    SplitBrainGuard,
    SplitBrainRecord,
    alert_on_split_brain,
    resolved,
)
from kemari_suite.errors import DiskError

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "drbd"
SB_A = FIX / "events2-84-split-brain-l1a.txt"
SB_B = FIX / "events2-84-split-brain-l1b.txt"
NOW_STANDALONE = FIX / "events2-84-now-standalone.txt"
NOW_CONNECTED = FIX / "events2-84-now-connected.txt"


def split_brains(path: Path, resource: str) -> list[SplitBrain]:
    monitor = DrbdMonitor(resource)
    notices = monitor.feed_all(parse_events2(path.read_text().splitlines()))
    return [n for n in notices if isinstance(n, SplitBrain)]


# ---- what DRBD printed -------------------------------------------------------------------


@pytest.mark.parametrize("path", [SB_A, SB_B], ids=["l1a", "l1b"])
def test_84_reports_the_split_brain_on_both_sides(path: Path) -> None:
    """8.4.11 runs initial-split-brain, then split-brain (after-sb disconnect): both
    sides' events2 show both helper calls, with 8.4's one peer named "peer"."""
    found = split_brains(path, "r0")
    assert found == [
        SplitBrain("r0", "peer", 0, 0, unresolved=False),
        SplitBrain("r0", "peer", 0, 0, unresolved=True),
    ]


def test_9_reports_the_split_brain_with_the_peers_name() -> None:
    found = split_brains(FIX / "events2-split-brain.txt", "kemari0")
    assert [(sb.peer, sb.unresolved) for sb in found] == [("beta", False), ("beta", True)]


def test_standalone_after_the_split_brain_is_not_resolved() -> None:
    standalone = status_from_events(parse_events2(NOW_STANDALONE.read_text().splitlines()), "r0")
    connected = status_from_events(parse_events2(NOW_CONNECTED.read_text().splitlines()), "r0")
    assert standalone is not None and not standalone.connected
    assert not resolved(standalone)
    assert resolved(connected)
    assert not resolved(None)


# ---- the guard ---------------------------------------------------------------------------


def test_the_guard_records_once_keeps_it_and_alerts_once(tmp_path: Path) -> None:
    marker = tmp_path / "state" / "r0.split-brain"
    guard = SplitBrainGuard("r0", marker, clock=lambda: 1000.0)
    seen: list[SplitBrainRecord] = []
    guard.on_split_brain = seen.append
    for sb in split_brains(SB_A, "r0"):
        guard.notice(sb, "2026-12-07T06:56:35Z")
    rec = guard.record
    assert rec == SplitBrainRecord("r0", "peer", 1000.0, "2026-12-07T06:56:35Z", True)
    assert seen == [SplitBrainRecord("r0", "peer", 1000.0, "2026-12-07T06:56:35Z", False)]
    assert json.loads(marker.read_text()) == rec.to_dict()
    # Another guard on this host (the next backend, an agent restarted) still refuses.
    again = SplitBrainGuard("r0", marker)
    assert again.record == rec
    with pytest.raises(SplitBrainError) as info:
        again.check(None)
    assert isinstance(info.value, DiskError)
    assert info.value.record == rec
    assert "split brain with peer peer" in str(info.value) and RUNBOOK in str(info.value)


def test_the_record_goes_once_the_operator_resolved_it(tmp_path: Path) -> None:
    marker = tmp_path / "r0.split-brain"
    guard = SplitBrainGuard("r0", marker)
    guard.notice(SplitBrain("r0", "peer", 0, 0, unresolved=True))
    standalone = status_from_events(parse_events2(NOW_STANDALONE.read_text().splitlines()), "r0")
    with pytest.raises(SplitBrainError):
        guard.check(standalone)
    assert marker.exists()
    connected = status_from_events(parse_events2(NOW_CONNECTED.read_text().splitlines()), "r0")
    guard.check(connected)
    assert guard.record is None and not marker.exists()


def test_an_unreadable_marker_still_refuses(tmp_path: Path) -> None:
    marker = tmp_path / "r0.split-brain"
    marker.write_text("{not json")
    with pytest.raises(SplitBrainError):
        SplitBrainGuard("r0", marker).check(None)


def test_a_failing_alert_does_not_lose_the_record(tmp_path: Path) -> None:
    guard = SplitBrainGuard("r0", None)

    def broken(_: SplitBrainRecord) -> None:
        raise RuntimeError("hook gone")

    guard.on_split_brain = broken
    guard.notice(SplitBrain("r0", "peer", 0, 0, unresolved=True))
    assert guard.record is not None


# ---- the backend, with a scripted drbdsetup and drbdadm -----------------------------------


def scripted_tools(tmp_path: Path, events: Path, now: Path) -> tuple[DrbdTools, Path]:
    """drbdsetup: ``events2 ... --now`` prints ``now``; ``events2`` prints ``events``
    then waits (as drbdsetup does), its PID in ``events.pid``. drbdadm logs its args."""
    calls = tmp_path / "calls"
    setup = tmp_path / "drbdsetup"
    setup.write_text(
        "#!/bin/sh\n"
        f'echo "drbdsetup $*" >> {calls}\n'
        'case "$*" in\n'
        f"  *--now*) cat {now} ;;\n"
        f"  events2*) echo $$ > {tmp_path / 'events.pid'}; cat {events}; exec sleep 600 ;;\n"
        "esac\n"
    )
    adm = tmp_path / "drbdadm"
    adm.write_text(f'#!/bin/sh\necho "drbdadm $*" >> {calls}\n')
    for script in (setup, adm):
        script.chmod(0o755)
    return DrbdTools(binaries={"drbdsetup": str(setup), "drbdadm": str(adm)}), calls


def backend84(tmp_path: Path, tools: DrbdTools, **kw: bool) -> DrbdBackend:
    dev = tmp_path / "drbd0"
    if not dev.exists():
        dev.write_bytes(bytes(1 << 16))
    return DrbdBackend.for_resource(
        "r0",
        dev,
        config_path="/etc/drbd.d/r0.res",
        tools=tools,
        dialect="8.4",
        state_dir=tmp_path / "state",
        **kw,
    )


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(cond) or not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its parent counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_backend_records_refuses_and_alerts_from_events2(tmp_path: Path) -> None:
    tools, calls = scripted_tools(tmp_path, SB_A, NOW_STANDALONE)
    hook_out = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\ncat >> {hook_out}\necho >> {hook_out}\n")
    hook.chmod(0o755)
    alerter = Alerter(
        AlertConfig(hook=str(hook)), vm="web1", node="l1a", syslog_path=str(tmp_path / "nolog")
    )
    backend = backend84(tmp_path, tools)
    alert_on_split_brain(backend, alerter)
    backend.attach()
    wait_for(lambda: backend.split_brain is not None and backend.split_brain.unresolved)
    st = backend.status()
    assert not st.up_to_date and not st.connected
    assert st.detail["split_brain"]["peer"] == "peer"
    # The events2 line of the first helper call (initial-split-brain).
    assert st.detail["split_brain"]["timestamp"] == "2026-12-07T06:56:35.204027+00:00"
    with pytest.raises(SplitBrainError) as info:
        backend.promote()
    assert RUNBOOK in str(info.value)
    pid = int((tmp_path / "events.pid").read_text())
    assert alive(pid)
    backend.close()
    wait_for(lambda: not alive(pid), 5.0)
    alerter.close(timeout=10.0)
    log = calls.read_text().splitlines()
    assert not any(" primary" in c for c in log)  # DRBD was never asked to promote
    assert any(c.startswith("drbdadm") and " adjust r0" in c for c in log)
    assert "drbdsetup events2 r0 --statistics --timestamps" in log
    sent = [json.loads(line) for line in hook_out.read_text().splitlines() if line.strip()]
    assert [a["kind"] for a in sent] == [AlertKind.SPLIT_BRAIN.value]
    assert sent[0]["details"]["peer"] == "peer" and sent[0]["details"]["runbook"] == RUNBOOK
    assert "split brain" in sent[0]["reason"]
    # The next backend on this host (a failover's) refuses too, without any event.
    later = backend84(tmp_path, tools, watch_events=False)
    with pytest.raises(SplitBrainError):
        later.promote()


def test_the_8_4_peer_is_named_from_the_resource_file(tmp_path: Path) -> None:
    tools, _ = scripted_tools(tmp_path, SB_B, NOW_STANDALONE)
    cfg = DrbdConfig(
        resource="r0",
        nodes=(DrbdNode("l1a", "10.99.0.1", 0), DrbdNode("l1b", "10.99.0.2", 1)),
        disk="/dev/vda",
    )
    res = DrbdResource(cfg, "l1b", config_path=tmp_path / "r0.res", tools=tools, dialect="8.4")
    dev = tmp_path / "drbd0"
    dev.write_bytes(bytes(1 << 16))
    backend = DrbdBackend(res, device_path=dev, state_dir=tmp_path / "state")
    backend.attach()
    try:
        wait_for(lambda: backend.split_brain is not None)
        assert backend.split_brain is not None and backend.split_brain.peer == "l1a"
    finally:
        backend.close()


def test_no_split_brain_no_refusal(tmp_path: Path) -> None:
    tools, calls = scripted_tools(tmp_path, NOW_CONNECTED, NOW_CONNECTED)
    backend = backend84(tmp_path, tools)
    backend.attach()
    try:
        backend.promote()
        st = backend.status()
    finally:
        backend.close()
    assert "split_brain" not in st.detail and st.up_to_date
    assert "drbdadm -c /etc/drbd.d/r0.res primary r0" in calls.read_text().splitlines()


def test_the_watch_restarts_drbdsetup_and_skips_odd_lines(tmp_path: Path) -> None:
    script = tmp_path / "events"
    text = "not an events2 line\n" + SB_A.read_text()
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n")
    script.chmod(0o755)
    seen: list[object] = []
    watch = EventsWatch([str(script)], "r0", lambda n, _ev: seen.append(n), restart_s=0.05)
    watch.start()
    try:
        assert watch.wait_ready(10.0)
        wait_for(lambda: watch.runs >= 2)
    finally:
        watch.stop()
    assert sum(isinstance(n, SplitBrain) for n in seen) >= 4  # two per run


def test_a_missing_drbdsetup_does_not_hold_attach(tmp_path: Path) -> None:
    watch = EventsWatch([str(tmp_path / "no-such-drbdsetup")], "r0", lambda n, ev: None)
    watch.start()
    t0 = time.monotonic()
    try:
        assert not watch.wait_ready(10.0)
    finally:
        watch.stop()
    assert time.monotonic() - t0 < 5.0
