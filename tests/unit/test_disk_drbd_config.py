"""DRBD resource files: validation, rendering, and the real drbdadm's dry run on every one.

drbdadm's dry run (``drbdadm -c FILE -d up RES`` with ``__DRBD_NODE__``) parses the file
and prints the drbdsetup/drbdmeta commands it would run, without root and without the
kernel module, so it runs in the unit tier.
"""

from __future__ import annotations

import dataclasses
import shutil
import tomllib
from pathlib import Path

import pytest

from kemari_suite.disk.drbd import (
    DrbdConfig,
    DrbdNode,
    DrbdTools,
    QuorumOptions,
    check_with_drbdadm,
    drbd_config_from_dict,
    render_resource,
)
from kemari_suite.errors import ConfigError, DrbdError

needs_drbdadm = pytest.mark.skipif(
    shutil.which("drbdadm", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin") is None,
    reason="drbd-utils not installed (scripts/setup.sh installs it)",
)

ALPHA = DrbdNode("alpha", "10.99.0.1", 0)
BETA = DrbdNode("beta", "10.99.0.2", 1)


def two_nodes(**kw: object) -> DrbdConfig:
    args: dict[str, object] = {
        "resource": "kemari0",
        "nodes": (ALPHA, BETA),
        "disk": "/dev/vg0/kemari0",
        "minor": 10,
    }
    args.update(kw)
    return DrbdConfig(**args)  # type: ignore[arg-type]


# Every shape of configuration the suite can render; each is checked by the real drbdadm.
CONFIGS: dict[str, DrbdConfig] = {
    "default": two_nodes(),
    "ipv6-ports-minor": DrbdConfig(
        "kvm_web-1.a",
        (
            DrbdNode("host-a.example", "fd00::1", 3, port=7790),
            DrbdNode("host-b", "fd00::2", 7, port=7791),
        ),
        disk="/dev/disk/by-id/dm-name-vg-lv",
        minor=(1 << 20) - 1,
    ),
    "external-meta-per-node-disk": DrbdConfig(
        "r1",
        (
            DrbdNode("alpha", "192.168.7.1", 0, disk="/dev/sdb"),
            DrbdNode("beta", "192.168.7.2", 1, disk="/dev/nvme0n1p3"),
        ),
        meta_disk="/dev/vg0/drbdmeta",
        verify_alg="crc32c",
        split_brain_handler="/usr/local/bin/kemari disk split-brain --resource {resource}",
    ),
    "quorum-with-diskless-tiebreaker": two_nodes(
        nodes=(ALPHA, BETA, DrbdNode("wit", "10.99.0.3", 2, disk="none")),
        quorum=QuorumOptions("majority", "suspend-io"),
    ),
    "no-fencing": two_nodes(fencing="dont-care", fence_peer_handler=""),
    "resource-only-fencing-auto-promote": two_nodes(
        fencing="resource-only", auto_promote=True, quorum=QuorumOptions(2)
    ),
}


def test_defaults_are_the_safe_ones() -> None:
    text = render_resource(two_nodes())
    assert "protocol C;" in text
    assert "fencing resource-and-stonith;" in text
    assert 'fence-peer "kemari fence-peer --resource kemari0";' in text
    for n in ("0pri", "1pri", "2pri"):
        assert f"after-sb-{n} disconnect;" in text
    assert "verify-alg sha256;" in text
    assert "auto-promote no;" in text
    assert "quorum off;" in text
    assert "on-no-quorum" not in text  # only meaningful with quorum on


def test_render_nodes_addresses_and_disks() -> None:
    cfg = CONFIGS["ipv6-ports-minor"]
    text = render_resource(cfg)
    assert "address ipv6 [fd00::1]:7790;" in text
    assert "address ipv6 [fd00::2]:7791;" in text
    assert "device minor 1048575;" in text
    assert text.count('disk "/dev/disk/by-id/dm-name-vg-lv";') == 2
    assert "hosts host-a.example host-b;" in text
    wit = render_resource(CONFIGS["quorum-with-diskless-tiebreaker"])
    assert "disk none;" in wit
    assert "quorum majority;" in wit and "on-no-quorum suspend-io;" in wit


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"nodes": (ALPHA, dataclasses.replace(BETA, node_id=0))}, "drbd.nodes[1].node_id",
         "already used by nodes[0]"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, address=""))}, "drbd.nodes[1].address",
         "missing"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, address="beta.example"))},
         "drbd.nodes[1].address", "not an IP address"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, port=0))}, "drbd.nodes[1].port",
         "not a TCP port"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, port=70000))}, "drbd.nodes[1].port",
         "not a TCP port"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, name="alpha"))}, "drbd.nodes[1].name",
         "already used"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, name=""))}, "drbd.nodes[1].name", "missing"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, node_id=32))}, "drbd.nodes[1].node_id",
         "not in 0..31"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, address="10.99.0.1", port=7789))},
         "drbd.nodes[1].port", "already used"),
        ({"nodes": (ALPHA,)}, "drbd.nodes", "at least two"),
        ({"nodes": (ALPHA, dataclasses.replace(BETA, disk="none"))}, "drbd.nodes",
         "two nodes need a backing disk"),
        ({"disk": ""}, "drbd.nodes[0].disk", "no backing disk"),
        ({"disk": "vg0/kemari0"}, "drbd.nodes[0].disk", "absolute"),
        ({"disk": '/dev/x"; disk /etc/passwd'}, "drbd.nodes[0].disk", "absolute"),
        ({"minor": 1 << 20}, "drbd.minor", "not in 0..1048575"),
        ({"resource": "all"}, "drbd.resource", "letters"),
        ({"resource": "bad name"}, "drbd.resource", "letters"),
        ({"meta_disk": "external"}, "drbd.meta_disk", "internal"),
        ({"verify_alg": "SHA 256"}, "drbd.verify_alg", "hash"),
        ({"after_sb_2pri": "discard-secondary"}, "drbd.after_sb_2pri", "not one of"),
        ({"fence_peer_handler": ""}, "drbd.fence_peer_handler", "needs a fence-peer handler"),
        ({"fence_peer_handler": 'kemari "x"'}, "drbd.fence_peer_handler", "quotes"),
        ({"fence_peer_handler": "kemari {node}"}, "drbd.fence_peer_handler", "template"),
        ({"quorum": QuorumOptions(3)}, "drbd.quorum.quorum", "1..2"),
        ({"quorum": QuorumOptions("most")}, "drbd.quorum.quorum", "majority"),
    ],
)  # fmt: skip
def test_bad_config_names_the_field(change: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        two_nodes(**change)
    assert info.value.key == key
    assert words in info.value.reason


def test_node_lookup() -> None:
    cfg = two_nodes()
    assert cfg.node("beta") is BETA
    with pytest.raises(ConfigError, match="not a node"):
        cfg.node("gamma")


def test_from_toml_table() -> None:
    data = tomllib.loads(
        """
        resource = "kemari0"
        disk = "/dev/vg0/kemari0"
        minor = 3
        quorum = { quorum = "majority" }
        [[nodes]]
        name = "alpha"
        address = "10.99.0.1"
        node_id = 0
        [[nodes]]
        name = "beta"
        address = "10.99.0.2"
        node_id = 1
        port = 7800
        [[nodes]]
        name = "wit"
        address = "10.99.0.3"
        node_id = 2
        disk = "none"
        """
    )
    cfg = drbd_config_from_dict(data, path="kemari.toml")
    assert cfg.nodes[1].port == 7800
    assert cfg.quorum.quorum == "majority"
    data["nodes"][1]["node_id"] = 0
    with pytest.raises(ConfigError) as info:
        drbd_config_from_dict(data, path="kemari.toml")
    assert info.value.path == "kemari.toml"
    assert info.value.key == "disk.drbd.nodes[1].node_id"
    data["nodes"][1]["node_id"] = 1
    data["nodes"][1]["prot"] = 1
    with pytest.raises(ConfigError, match="unknown key"):
        drbd_config_from_dict(data, path="kemari.toml")


def _basenames(cmds: list[list[str]]) -> list[list[str]]:
    # drbdadm prints the absolute drbdsetup path when it was itself run by absolute path.
    return [[Path(c[0]).name, *c[1:]] for c in cmds]


@needs_drbdadm
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_rendered_config_passes_drbdadm_for_every_node(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    path = tmp_path / f"{cfg.resource}.res"
    path.write_text(render_resource(cfg))
    plans = check_with_drbdadm(cfg, path)
    assert set(plans) == {n.name for n in cfg.nodes}
    for node in cfg.nodes:
        cmds = _basenames(plans[node.name])
        flat = [" ".join(c) for c in cmds]
        # drbdadm read our node id, peers, addresses and options as we meant them.
        assert cmds[0][:4] == ["drbdsetup", "new-resource", cfg.resource, str(node.node_id)]
        for peer in cfg.nodes:
            if peer is node:
                continue
            new_peer = next(
                c
                for c in cmds
                if c[:4] == ["drbdsetup", "new-peer", cfg.resource, str(peer.node_id)]
            )
            assert f"--_name={peer.name}" in new_peer
            assert "--protocol=C" in new_peer
            assert f"--verify-alg={cfg.verify_alg}" in new_peer
            for p in ("0pri", "1pri", "2pri"):
                assert f"--after-sb-{p}={getattr(cfg, f'after_sb_{p}')}" in new_peer
            if cfg.fencing != "dont-care":
                assert f"--fencing={cfg.fencing}" in new_peer
            assert any(
                c[:4] == ["drbdsetup", "new-path", cfg.resource, str(peer.node_id)] for c in cmds
            )
            assert ["drbdsetup", "connect", cfg.resource, str(peer.node_id)] in cmds
        disk = cfg.disk_of(node)
        if disk == "none":
            assert [
                "drbdsetup",
                "new-minor",
                cfg.resource,
                str(cfg.minor),
                "0",
                "--diskless",
            ] in cmds
            assert not any(c[1] == "attach" for c in cmds)
        else:
            attach = next(c for c in cmds if c[1] == "attach")
            assert attach[2:4] == [str(cfg.minor), disk]
        if cfg.quorum.quorum != "off":
            assert f"--quorum={cfg.quorum.quorum}" in flat[0]
        assert f"--auto-promote={'yes' if cfg.auto_promote else 'no'}" in flat[0]


@needs_drbdadm
def test_drbdadm_rejects_what_we_reject_too(tmp_path: Path) -> None:
    """Hand-edit a duplicate node id into a rendered file: drbdadm says exit code 10."""
    cfg = two_nodes()
    path = tmp_path / "kemari0.res"
    path.write_text(render_resource(cfg).replace("node-id 1;", "node-id 0;"))
    with pytest.raises(DrbdError) as info:
        check_with_drbdadm(cfg, path)
    assert info.value.rc == 10
    assert "conflicting use of node-id" in info.value.stderr
    assert info.value.resource == "kemari0"
    assert info.value.command.startswith("drbdadm -d -c ")
    assert info.value.command.endswith(" up kemari0")


@needs_drbdadm
def test_drbdadm_dry_run_misses_ranges_our_validation_catches(tmp_path: Path) -> None:
    """Why validate(): drbdadm's dry run accepts node-id 32, which the kernel refuses."""
    path = tmp_path / "kemari0.res"
    path.write_text(render_resource(two_nodes()).replace("node-id 1;", "node-id 32;"))
    cmds = DrbdTools().drbdadm_dry_run(
        "kemari0", ["drbdadm", "-c", str(path), "up", "kemari0"], "alpha"
    )
    assert any("32" in c for c in cmds if c[1] == "new-peer")
    with pytest.raises(ConfigError, match=r"not in 0\.\.31"):
        two_nodes(nodes=(ALPHA, dataclasses.replace(BETA, node_id=32)))
