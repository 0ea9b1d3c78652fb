"""A Kemari-protected guest under a real Corosync + Pacemaker cluster in the lab.

The cluster (kemari_suite.lab.cluster): nodes ``a`` and ``b`` on the lab's two hosts,
each in its own network, mount and UTS namespaces, and corosync-qnetd on the LAN as
the third vote. ``ocf:kemari:vm`` runs as a promotable clone with
``replication.tiebreaker = "pacemaker"``, the stand-in fence device
``fence_kemari_lab`` kills a fenced node's processes (kemari_suite.demo.pacemaker).
Pacemaker cold-boots the guest on ``a`` first.

- kill every process of host ``a``: the cluster, quorate with qnetd's vote, fences ``a``
  and promotes ``b``; the guest resumes there (slow: CI runs the same through
  ``kemari demo --pacemaker --json``, test_demo_pacemaker_cli.py);
- ``crm_resource --move`` to ``b``: the demote of ``a`` is a switchover, ``b``'s
  promote finds the VM already there, and ``a`` protects it again as the standby (slow);
- cut host ``a``'s replication link and its LAN (the cluster network): ``a`` loses
  quorum, ``b`` with qnetd's vote fences ``a`` and promotes itself (slow);
- restart qnetd: both nodes keep quorum (two of three votes), the guest stays on ``a``,
  protected (slow).

Each checks from the client's side that the guest's counter is never behind a value
read before the event (output commit: no acknowledged output lost, no rewind).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.demo.pacemaker import CLONE, PacemakerPair
from kemari_suite.errors import KemariError
from kemari_suite.lab import links
from kemari_suite.lab.cluster import missing_binaries
from kemari_suite.lab.pair import PairOptions
from tests.conftest import needs_root

pytestmark = [
    pytest.mark.e2e,
    needs_root,
    pytest.mark.skipif(
        bool(missing_binaries()), reason=f"not installed: {', '.join(missing_binaries())}"
    ),
]


@pytest.fixture
def protected(lab_factory, base_config: KemariConfig, guest_image) -> Iterator[PacemakerPair]:
    """The cluster up, the guest protected on ``a``; everything stopped afterwards."""
    lab = lab_factory()
    pp = PacemakerPair(lab, base_config, PairOptions(tapped_net=True))
    try:
        pp.start()
        # Each host's pacemaker talks to its own corosync (abstract sockets are per
        # network namespace, libqb's ring buffers in the node's own /dev/shm).
        assert pp.cluster.check_isolation() == {"a": "a/1", "b": "b/2"}
        assert pp.wait_protected()["role"] == "primary"
        assert pp.promoted_on("b") == "a"
        pp.pair.settle(3)
        yield pp
    finally:
        pp.stop()


def client_reads(pp: PacemakerPair, seconds: float = 2.0) -> int:
    """The highest counter the client read over ``seconds``."""
    seen = pp.pair.wait_counter(60)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(KemariError):
            seen = max(seen, pp.pair.read_counter())
        time.sleep(0.2)
    return seen


def fenced(pp: PacemakerPair, node: str, via: str) -> str:
    return pp.cluster.run(via, ["stonith_admin", "--history", node], check=False).stdout


@pytest.mark.slow
def test_kill_primary_host_cluster_promotes_standby(protected: PacemakerPair) -> None:
    pp = protected
    seen = client_reads(pp)
    pp.cluster.kill_node("a")
    t_kill = time.monotonic()
    resumed = pp.wait_promoted("b", 180)
    after = pp.pair.wait_counter(60)
    took = time.monotonic() - t_kill

    assert resumed["state"] == "active" or resumed["role"] == "primary"
    assert after >= seen, f"counter rewound: {after} after {seen}"
    assert pp.cluster.quorate("b"), "b's partition should be quorate with qnetd's vote"
    assert "successful" in fenced(pp, "a", "b")
    assert took < 120, f"the client waited {took:.1f} s"


@pytest.mark.slow
def test_move_is_a_switchover(protected: PacemakerPair) -> None:
    pp = protected
    seen = client_reads(pp)
    pp.cluster.run("a", ["crm_resource", "--move", "-r", CLONE, "--promoted", "-N", "b"])
    pp.wait_promoted("b", 240)
    after = pp.pair.wait_counter(60)
    assert after >= seen, f"counter rewound: {after} after {seen}"
    # A planned move, not a failover: nothing was fenced, a protects the VM again.
    assert "successful" not in fenced(pp, "a", "b")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(KemariError):
            if pp.status("b").get("state") == "protected":
                break
        time.sleep(0.5)
    assert pp.status("b")["state"] == "protected"
    assert pp.status("a")["role"] == "secondary"
    pp.cluster.run("a", ["crm_resource", "--clear", "-r", CLONE])


@pytest.mark.slow
def test_partition_only_the_quorate_side_runs_the_guest(protected: PacemakerPair) -> None:
    pp = protected
    seen = client_reads(pp)
    lab_id = pp.lab.lab_id
    links.set_link_up(lab_id, "primary", False, link="repl")
    links.set_link_up(lab_id, "primary", False, link="lan")
    pp.wait_promoted("b", 240)
    after = pp.pair.wait_counter(60)
    assert after >= seen, f"counter rewound: {after} after {seen}"
    assert pp.cluster.quorate("b")
    # The inquorate side was fenced: nothing of host a runs the guest any more.
    assert "successful" in fenced(pp, "a", "b")
    assert pp.cluster.node_pids("a") == []


@pytest.mark.slow
def test_qnetd_restart_keeps_the_guest_where_it_is(protected: PacemakerPair) -> None:
    pp = protected
    seen = client_reads(pp)
    pp.cluster.stop_qnetd()
    time.sleep(5)
    # Two of three votes: both nodes stay quorate, nothing moves.
    assert pp.cluster.quorate("a") and pp.cluster.quorate("b")
    pp.cluster.start_qnetd()
    time.sleep(5)
    assert pp.promoted_on("b") == "a"
    assert pp.status("a")["state"] == "protected"
    after = client_reads(pp)
    assert after >= seen, f"counter rewound: {after} after {seen}"
