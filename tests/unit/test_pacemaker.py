"""``tiebreaker = "pacemaker"`` and the cluster lab's pure parts: the tiebreaker's
answers, the promotion grant, reading the CIB's fencing, corosync.conf, the CIB
resources and the test-only fence agent (no cluster, no root)."""

from __future__ import annotations

import asyncio
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kemari_suite.config import load
from kemari_suite.demo.pacemaker import fence_script, resources_xml
from kemari_suite.errors import ConfigError, ConnectError
from kemari_suite.ha.pacemaker import (
    PacemakerTiebreaker,
    PromotionGrant,
    fencing_status,
    require_fencing,
)
from kemari_suite.ha.tiebreak import make_tiebreaker
from kemari_suite.lab.cluster import ClusterNode, corosync_conf


class Quorum:
    def __init__(self, value: bool) -> None:
        self.value = value
        self.asked = 0

    async def __call__(self) -> bool:
        self.asked += 1
        return self.value


def tiebreaker(tmp_path: Path, quorate: bool = True) -> tuple[PacemakerTiebreaker, Quorum]:
    q = Quorum(quorate)
    return PacemakerTiebreaker(tmp_path / "grant", "b", quorate=q, wall=lambda: 1000.0), q


def test_takeover_only_with_the_clusters_grant(tmp_path: Path) -> None:
    tb, _ = tiebreaker(tmp_path)
    d = asyncio.run(tb.ask("takeover"))
    assert not d.granted and "Pacemaker decides" in d.reason
    PromotionGrant("b", 999.0, "promote").write(tb.grant)
    d = asyncio.run(tb.ask("takeover"))
    assert not d.granted and "expired" in d.reason
    PromotionGrant("b", 1100.0, "promote").write(tb.grant)
    assert asyncio.run(tb.ask("takeover")).granted
    PromotionGrant.clear(tb.grant)
    assert not asyncio.run(tb.ask("takeover")).granted


def test_renew_and_solo_follow_quorum(tmp_path: Path) -> None:
    tb, q = tiebreaker(tmp_path, quorate=True)
    assert asyncio.run(tb.ask("renew")).granted
    assert asyncio.run(tb.ask("solo")).granted
    assert q.asked == 1  # reused within QUORUM_TTL_S
    assert tb.lease_valid(10.0, 0.1)
    tb, _ = tiebreaker(tmp_path, quorate=False)
    d = asyncio.run(tb.ask("solo"))
    assert not d.granted and "no quorum" in d.reason
    assert not tb.lease_valid(10.0, 0.1)


def test_query_is_never_stale(tmp_path: Path) -> None:
    tb, _ = tiebreaker(tmp_path)
    d = asyncio.run(tb.ask("query"))
    assert not d.stale and d.generation == 0
    assert asyncio.run(tb.ask("release")).granted


def test_grant_file_is_private_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "g"
    PromotionGrant("a", 5.0, "x").write(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("not json")
    assert PromotionGrant.read(path) is None


def cib(prop: tuple[int, str], resources: str):  # type: ignore[no-untyped-def]
    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if argv[0] == "crm_attribute":
            return subprocess.CompletedProcess(argv, prop[0], prop[1], "")
        return subprocess.CompletedProcess(argv, 0, resources, "")

    return run


FENCED = '<resources><primitive id="f" class="stonith" type="fence_x"/></resources>'
UNFENCED = '<resources><primitive id="p" class="ocf" provider="kemari" type="vm"/></resources>'


def test_fencing_status_reads_the_cib() -> None:
    assert fencing_status(cib((0, "true\n"), FENCED)).devices == ("f",)
    # stonith-enabled unset: its default, true.
    assert fencing_status(cib((105, ""), FENCED)).ok
    st = fencing_status(cib((0, "false\n"), FENCED))
    assert not st.ok and "stonith-enabled=false" in st.refusal()
    st = fencing_status(cib((0, "true\n"), UNFENCED))
    assert not st.ok and "no fencing device" in st.refusal()


def test_require_fencing_refuses() -> None:
    with pytest.raises(ConfigError, match="no fencing device"):
        require_fencing(cib((0, "true"), UNFENCED))

    def down(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 102, "", "Could not connect to the CIB")

    with pytest.raises(ConfigError, match="no cluster answers"):
        require_fencing(down)
    assert isinstance(ConnectError("x", "y"), Exception)


def test_make_tiebreaker_pacemaker_needs_a_cluster(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k" * 48 + "\n")
    key.chmod(0o600)
    cfg_path = tmp_path / "k.toml"
    cfg_path.write_text(
        f'[paths]\nrun_dir = "{tmp_path}"\n[replication]\nkey_file = "{key}"\n'
        'tiebreaker = "pacemaker"\n'
    )
    cfg = load(cfg_path)
    assert cfg.replication.tiebreaker == "pacemaker"
    # No cluster here (or no CIB reachable from this process): refused, clearly.
    with pytest.raises(ConfigError, match=r"pacemaker|fencing"):
        make_tiebreaker(cfg, "a", format_lease=False)


def test_corosync_conf() -> None:
    nodes = [ClusterNode("a", 1, "ns-a", "10.0.0.2"), ClusterNode("b", 2, "ns-b", "10.0.0.3")]
    text = corosync_conf("c1", nodes, "10.0.0.1:5403")
    assert "ring0_addr: 10.0.0.2" in text and "nodeid: 2" in text
    assert "model: net" in text and "host: 10.0.0.1" in text and "port: 5403" in text
    assert "two_node" not in text
    assert "two_node: 1" in corosync_conf("c1", nodes, None)
    assert text.count("{") == text.count("}")


def test_resources_xml() -> None:
    tree = ET.fromstring(resources_xml({"a": Path("/a.toml"), "b": Path("/b.toml")}, "/k"))
    fence = tree.find("primitive")
    assert fence is not None and fence.get("class") == "stonith"
    clone = tree.find("clone")
    assert clone is not None
    meta = {nv.get("name"): nv.get("value") for nv in clone.iter("nvpair")}
    assert meta["promotable"] == "true" and meta["notify"] == "true"
    configs = {
        ia.find("rule/expression").get("value"): ia.find("nvpair").get("value")  # type: ignore[union-attr]
        for ia in clone.iter("instance_attributes")
        if ia.find("rule") is not None
    }
    assert configs == {"a": "/a.toml", "b": "/b.toml"}
    ops = {(o.get("name"), o.get("role")) for o in clone.iter("op")}
    assert ("monitor", "Promoted") in ops and ("monitor", "Unpromoted") in ops


def test_fence_script_metadata_and_unknown_node(tmp_path: Path) -> None:
    script = tmp_path / "fence_kemari_lab"
    script.write_text(fence_script({"a": "kemari-nonexistent-pri"}))
    script.chmod(0o755)
    meta = subprocess.run(
        [str(script), "-o", "metadata"], capture_output=True, text=True, timeout=10, check=True
    )
    assert ET.fromstring(meta.stdout).get("name") == "fence_kemari_lab"
    listing = subprocess.run(
        [str(script)], input="action=list\n", capture_output=True, text=True, timeout=10, check=True
    )
    assert listing.stdout.split() == ["a"]
    off = subprocess.run(
        [str(script)],
        input="action=off\nport=zz\n",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert off.returncode == 1
