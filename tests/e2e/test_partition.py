"""Partitions with both hosts alive: never two guests at once, and the loser says why."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kemari_suite import lab as labmod
from kemari_suite.config import KemariConfig
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def _events(pair: LabPair, role: str) -> list[dict]:
    out = []
    for f in (pair.run_dir(role) / "artifacts").glob("*/events.jsonl"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda e: e["t"])


@pytest.mark.parametrize("disk", ["", "builtin", "shared"], ids=["nodisk", "builtin", "shared"])
def test_replication_link_cut_primary_keeps_lease(
    disk: str, lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    opts = PairOptions(disk=disk, tapped_net=bool(disk))
    pair = LabPair(lay, base_config, opts)
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        before = pair.wait_counter(120)
        pair.settle()
        labmod.partition(lay.lab_id)
        # Both sides notice after the heartbeat timeout; the witness keeps the primary.
        st = pair.wait_state("primary", {"unprotected"}, 30)
        assert "witness confirmed" in st["reason"]
        time.sleep(2)
        sec = pair.status("secondary")
        assert sec["state"] == "standby", sec
        # Refused by the tiebreaker, or (built-in disk) earlier still: the copy knows the
        # primary's generation and that the primary ran solo past it.
        refusals = ("tiebreaker refused", "lease held", "this copy is stale")
        assert any(r in sec["reason"] for r in refusals), sec
        assert pair.qemu_pid("secondary") is None, "a second guest was started"
        assert pair.read_counter() > before, "the primary's guest stopped serving"
        # Healing the link re-protects the guest.
        labmod.heal(lay.lab_id)
        pair.wait_state("primary", {"protected"}, 120)
        assert pair.status("secondary")["state"] == "standby"
    finally:
        pair.stop()


def test_stale_standby_never_takes_over(lab_factory, base_config: KemariConfig) -> None:
    """After the primary ran unprotected, the standby's copy is stale: when the primary
    then dies, the standby refuses to resume it (it would lose acknowledged work)."""
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions())
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        labmod.partition(lay.lab_id)
        pair.wait_state("primary", {"unprotected"}, 30)
        pair.kill("primary")
        time.sleep(6)  # twice the heartbeat timeout
        sec = pair.status("secondary")
        assert sec["state"] == "standby", sec
        assert "stale" in sec["reason"], sec
        assert pair.qemu_pid("secondary") is None
    finally:
        pair.stop()


@pytest.mark.parametrize("disk", ["", "builtin", "shared"], ids=["nodisk", "builtin", "shared"])
def test_primary_isolated_fences_before_secondary_takes_over(
    disk: str, lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(disk=disk, tapped_net=bool(disk)))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        # Cut the primary off from everything: replication link and LAN (witness).
        labmod.set_link_up(lay.lab_id, "primary", False, link="lan")
        labmod.partition(lay.lab_id)
        rc = pair.wait_exit("primary", 60)
        assert rc not in (None, 0), "the isolated primary did not stop"
        assert "stopped its VM" in pair.output("primary")
        sec = pair.wait_state("secondary", {"active"}, 60)
        fenced = [e for e in _events(pair, "primary") if e["event"] == "fenced"]
        assert fenced, "the primary did not record why it stopped"
        assert "lease" in fenced[0]["reason"] or "tiebreaker" in fenced[0]["reason"]
        took_over = [e for e in _events(pair, "secondary") if e["event"] == "failover"]
        assert took_over
        # The guest on the primary was gone before the secondary's guest started.
        assert fenced[0]["t"] < took_over[0]["detected_at"] + took_over[0]["tiebreak_ms"] / 1e3
        assert sec["failover"]["epoch"] >= 1
    finally:
        pair.stop()


def test_after_reprotection_a_cut_link_still_leaves_one_guest(
    lab_factory, base_config: KemariConfig
) -> None:
    """A failover, the failed host back as the standby (re-protection), then the
    replication link cut: the witness must still tell the two hosts apart. Both ran
    ``kemari standby`` once, so an identity taken from the role ("secondary" on both)
    would let the new standby "renew" the lease its primary holds and resume a second
    guest."""
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(reprotect=True))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        pair.kill("primary")
        pair.wait_state("secondary", {"unprotected", "syncing", "protected"}, 60)
        pair.start_standby_on("primary")
        st = pair.wait_state("secondary", {"protected"}, 180)
        assert st["role"] == "primary", st
        standby = pair.status("primary")
        assert standby["state"] == "standby"
        # Each host keeps its own name at the witness, whatever role it runs now.
        assert (st["node_id"], standby["node_id"]) == ("secondary", "primary")
        pair.settle()
        before = pair.read_counter()
        labmod.partition(lay.lab_id)
        st = pair.wait_state("secondary", {"unprotected"}, 30)
        assert "witness confirmed" in st["reason"], st
        time.sleep(3)  # one more heartbeat timeout for the standby to decide
        sb = pair.status("primary")
        assert sb["state"] == "standby", sb
        assert "lease held" in sb["reason"] or "tiebreaker refused" in sb["reason"], sb
        # The pid file is the killed QEMU's: no process may answer to it now.
        pid = pair.qemu_pid("primary")
        assert pid is None or not Path(f"/proc/{pid}").exists(), "a second guest runs"
        assert pair.read_counter() > before, "the serving guest stopped"
    finally:
        pair.stop()
