"""Planned switchover and failback: the VM moves to the standby and back, with a client
connected throughout, nothing lost, each host ending in the other role, and the new
primary's first epoch a delta on the RAM the old primary kept; and the protect-time
compatibility check refuses a standby that cannot run the VM."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.netclient import open_connection
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root
from tests.e2e.test_stream import Reader

pytestmark = [pytest.mark.e2e, needs_root]

PORT = 7002


def _connect(lay, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_connection(lay.ns_client, lay.guest_ip, PORT)
        except KemariError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _progress(reader: Reader, lines: int, timeout: float = 60.0) -> None:
    target = reader.expected + lines
    deadline = time.monotonic() + timeout
    while reader.expected < target and time.monotonic() < deadline:
        assert not reader.errors, reader.errors
        time.sleep(0.1)
    assert not reader.errors, reader.errors
    assert reader.expected >= target, f"stream stalled at {reader.expected}"


def _peer_resume_spans(pair: LabPair, role: str) -> dict[str, float]:
    """The spans (ms) of the last resume host ``role`` logged (its ``failover`` event)."""
    last: dict[str, float] = {}
    for path in sorted(pair.run_dir(role).glob("artifacts/*/events.jsonl")):
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") == "failover" and ev.get("spans_ms"):
                last = ev["spans_ms"]
    return last


def _switch(pair: LabPair, reader: Reader, old: str, new: str) -> float:
    """Switch the VM from host ``old`` to host ``new``; returns the client's longest gap
    between received data across it (from the request until 200 more lines)."""
    reader.longest_gap = 0.0
    res = pair.switchover(old)
    assert res["switched"] is True
    assert res["pause_ms"] > 0
    # Where the pause went, for operators: the old primary's steps, then the peer's.
    spans = res["spans_ms"]
    assert list(spans) == ["final_sync", "released", "disk_flush", "disk_demote", "lease", "peer"]
    assert sum(spans.values()) <= res["pause_ms"] + 1.0, res
    st = pair.wait_state(new, {"protected"}, 180)
    assert st["role"] == "primary"
    assert pair.wait_state(old, {"standby"}, 60)["role"] == "secondary"
    _progress(reader, 200)
    gap = reader.longest_gap
    sync = st["initial_sync"]
    resume = _peer_resume_spans(pair, new)
    # The peer's part of the pause, step by step (its QEMU's start, the restore...).
    assert resume and resume.get("qemu", 0) > 0, resume
    print(
        f"switchover {old} -> {new}: pause {res['pause_ms']} ms {spans}; the peer's resume "
        f"{resume}; client's longest gap {gap:.3f} s; first epoch {sync}"
    )
    # The old primary kept its RAM: only what the guest changed since the resume went over.
    assert sync["mode"] == "delta", sync
    assert sync["pages"] < sync["ram_pages"] // 8, sync
    # The old primary's disk copy was current: only blocks written since went over.
    assert st["disk_resync"]["mode"] == "incremental", st["disk_resync"]
    # Loose: this machine is shared, and what the client waits for here is mostly the
    # guest's TCP retransmission timeout (see docs/operations.md), not the resync.
    assert gap < 5.0, gap
    return gap


def test_switchover_and_failback_with_client_connected(
    lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    opts = PairOptions(tapped_net=True, disk="builtin", workload=f"stream -p {PORT} 500")
    pair = LabPair(lay, base_config, opts)
    reader: Reader | None = None
    try:
        pair.start()
        st = pair.wait_state("primary", {"protected"}, 180)
        # Protection is declared only after the standby restored a checkpoint.
        assert st["compat"]["ok"] is True and st["compat"]["stage"] == "restore"
        reader = Reader(_connect(lay), slow=False)
        reader.start()
        _progress(reader, 100)

        # Switchover: primary host -> secondary host; then failback.
        _switch(pair, reader, "primary", "secondary")
        _switch(pair, reader, "secondary", "primary")
        assert not reader.errors, reader.errors
    except BaseException:
        for role in ("primary", "secondary"):
            print(f"---- {role}.out alive={pair.alive(role)} ----\n{pair.output(role)[-4000:]}")
            for log in sorted(pair.run_dir(role).glob("artifacts/*/agent.log")):
                print(f"---- {log} ----\n{log.read_text(errors='replace')[-5000:]}")
        raise
    finally:
        if reader is not None:
            reader.stop.set()
            with contextlib.suppress(OSError):
                reader.sock.close()
        pair.stop()


def test_switchover_refused_when_not_protected(lab_factory, base_config: KemariConfig) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions())
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.kill("secondary")
        pair.wait_state("primary", {"unprotected"}, 30)
        with pytest.raises(KemariError, match="not protected"):
            pair.switchover("primary", timeout=30)
        # Still running here.
        assert pair.wait_counter(30) >= 0
    finally:
        pair.stop()


def test_mismatched_memory_refused_before_sync(lab_factory, base_config: KemariConfig) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions())
    # The standby's copy of the definition says 192 MiB; the primary runs 128.
    cfg: Path = pair.configs["secondary"]
    cfg.write_text(cfg.read_text().replace("memory_mib = 128", "memory_mib = 192"))
    try:
        pair.start()
        st = pair.wait_state("primary", {"unprotected"}, 120)
        assert "vm.memory_mib" in st["reason"] and "128" in st["reason"], st["reason"]
        sec = pair.status("secondary")
        assert sec["state"] == "waiting"
        assert sec["compat"]["profile"] == "refused"
        # Refused before a single page was copied.
        assert sec["last_committed_epoch"] == -1
        assert pair.wait_counter(60) >= 0
    finally:
        pair.stop()
