"""The lab's Corosync + Pacemaker cluster alone (no QEMU, no Kemari agents): two nodes
in their own network, mount and UTS namespaces and corosync-qnetd on the LAN.

- each node's pacemaker talks to its own corosync, and the cluster is quorate with
  three votes;
- without a fencing device, the ``pacemaker`` tiebreaker refuses to run protected
  (asked from inside node ``a``, as the agents would);
- qnetd restarts: the nodes stay quorate without it (2 of 3 votes), and qdevice
  reconnects to the new qnetd;
- node ``b`` is lost: ``a`` stays quorate thanks to qnetd's vote;
- everything is stopped by PID, and nothing is left in the namespaces.

About 60 s on a loaded 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kemari_suite.lab.cluster import ClusterLab, missing_binaries
from tests.conftest import needs_root

pytestmark = [
    pytest.mark.integration,
    needs_root,
    pytest.mark.skipif(
        bool(missing_binaries()), reason=f"not installed: {', '.join(missing_binaries())}"
    ),
]


def _qdevice_votes(cluster: ClusterLab, node: str) -> bool:
    out = cluster.run(node, ["corosync-quorumtool", "-s"], check=False).stdout
    return any(line.split()[-1:] == ["Qdevice"] and " 1 " in line for line in out.splitlines())


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_cluster_on_lab_hosts(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory()
    cluster = ClusterLab(lab, tmp_path / "cluster")
    try:
        cluster.start()
        cluster.wait_online(120)
        assert cluster.check_isolation() == {"a": "a/1", "b": "b/2"}
        assert cluster.quorate("a") and cluster.quorate("b")
        _wait(lambda: _qdevice_votes(cluster, "a"), 30, "qdevice never voted")

        # No fencing device: the pacemaker tiebreaker refuses, from inside node a.
        probe = cluster.run(
            "a",
            [
                sys.executable,
                "-c",
                "from kemari_suite.ha.pacemaker import require_fencing; require_fencing()",
            ],
            check=False,
        )
        assert probe.returncode != 0
        assert "no fencing device" in probe.stderr, probe.stderr

        _load_the_playbooks_cib(cluster, tmp_path)

        cluster.stop_qnetd()
        time.sleep(3)
        assert cluster.quorate("a") and cluster.quorate("b")
        cluster.start_qnetd()
        _wait(lambda: _qdevice_votes(cluster, "a"), 60, "qdevice did not reconnect")

        cluster.kill_node("b")
        _wait(lambda: "b" not in _online(cluster), 60, "a still sees b online")
        assert cluster.quorate("a"), "a lost quorum although qnetd votes for it"
    finally:
        cluster.stop()
    for node in cluster.nodes.values():
        pids = subprocess.run(
            ["ip", "netns", "pids", node.ns], capture_output=True, text=True, check=False
        ).stdout.split()
        assert pids == [], f"left running in {node.ns}: {pids}"
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()


def _online(cluster: ClusterLab) -> set[str]:
    from xml.etree import ElementTree as ET

    tree = ET.fromstring(cluster.crm_mon_xml("a"))
    return {n.get("name", "") for n in tree.iter("node") if n.get("online") == "true"}


def _load_the_playbooks_cib(cluster: ClusterLab, tmp_path: Path) -> None:
    """The pacemaker role's resources and constraints (with DRBD), loaded into the live
    CIB with the role's own cibadmin commands, in maintenance mode (nothing is started),
    then removed again."""
    from xml.etree import ElementTree as ET

    from tests.integration.test_pacemaker_drbd_constraints import render

    files = {}
    for scope, template in (("resources", "kemari-resources.xml.j2"),
                            ("constraints", "kemari-constraints.xml.j2")):  # fmt: skip
        files[scope] = tmp_path / f"pacemaker-{scope}.xml"
        files[scope].write_text(ET.tostring(render(template), encoding="unicode"))
    prop = ["crm_attribute", "--type", "crm_config", "--name", "maintenance-mode"]
    cluster.run("a", [*prop, "--update", "true"])
    try:
        for scope, path in files.items():
            done = cluster.run("a", ["cibadmin", "--modify", "--allow-create", "--scope", scope,
                                     "--xml-file", str(path)], check=False)  # fmt: skip
            assert done.returncode == 0, f"cibadmin refused the role's {scope}: {done.stderr}"
        live = cluster.run("b", ["cibadmin", "--query", "--scope", "configuration"]).stdout
        for rid in ("kemari-vm-clone", "drbd-r0-clone", "o-drbd-r0-before-kemari-vm"):
            assert f'id="{rid}"' in live, rid
        verify = cluster.run("a", ["crm_verify", "--live-check"], check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        for scope in ("constraints", "resources"):
            cluster.run("a", ["cibadmin", "--replace", "--scope", scope, "--xml-text",
                              f"<{scope}/>"], check=False)  # fmt: skip
        cluster.run("a", [*prop, "--delete"], check=False)
