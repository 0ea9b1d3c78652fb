"""A host's name at the tiebreaker names the host, not the role it runs, and two hosts
of a pair that end up with one name are refused at the replication handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, build, load
from kemari_suite.errors import ConfigError, ConnectError
from kemari_suite.ha.tiebreak import node_identity
from kemari_suite.protocol.link import Link, connect, serve

KEY = b"k" * 32


def _cfg(**replication: object) -> KemariConfig:
    base = load(None)
    return dataclasses.replace(
        base, replication=dataclasses.replace(base.replication, **replication)
    )


def test_an_explicit_node_id_wins() -> None:
    assert node_identity(_cfg(node_id="hostA", listen="10.0.0.1:7410")) == "hostA"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("10.0.0.1:7410", "10.0.0.1"), ("[fd00::2]:7410", "fd00::2"), ("db-a.lan:7410", "db-a.lan")],
)
def test_without_one_the_listen_address_names_the_host(listen: str, expected: str) -> None:
    assert node_identity(_cfg(listen=listen)) == expected


@pytest.mark.parametrize("listen", ["", "0.0.0.0:7410", "[::]:7410"])
def test_a_wildcard_or_no_listener_falls_back_to_the_host_name(listen: str) -> None:
    assert node_identity(_cfg(listen=listen)) == socket.gethostname()


def test_the_role_never_names_the_host() -> None:
    """The same config gives the same id whichever agent reads it (primary, or the
    standby the failed primary comes back as)."""
    cfg = _cfg(listen="10.0.0.1:7410")
    assert node_identity(cfg) not in ("primary", "secondary")


@pytest.mark.parametrize("bad", ["two words", "a/b", "é\x00"])
def test_a_node_id_with_odd_characters_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"replication\.node_id"):
        build(KemariConfig, {"replication": {"node_id": bad}}, path="t.toml")


def test_a_peer_with_this_hosts_own_node_id_is_refused() -> None:
    """Real loopback sockets: a primary calling itself what the standby calls itself
    is refused after authentication, and the standby never gets the link; a primary
    with its own name connects."""

    async def main() -> tuple[str, list[str]]:
        links: list[Link] = []

        async def on_link(link: Link) -> None:
            links.append(link)

        server = await serve("127.0.0.1", 0, key=KEY, node_id="hostB", on_link=on_link)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ConnectError) as refused:
                await connect(f"127.0.0.1:{port}", key=KEY, node_id="hostB", timeout=5)
            await asyncio.sleep(0.2)
            assert links == [], "the standby took a link from a peer with its own name"
            ok = await connect(f"127.0.0.1:{port}", key=KEY, node_id="hostA", timeout=5)
            for _ in range(100):
                if links:
                    break
                await asyncio.sleep(0.02)
            names = [lk.session.peer.node_id for lk in links if lk.session.peer is not None]
            ok.close()
            for lk in links:
                lk.close()
            return str(refused.value), names
        finally:
            server.close()

    message, names = asyncio.run(main())
    assert "'hostB'" in message and "replication.node_id" in message
    assert names == ["hostA"]


def test_lab_and_deploy_configs_name_each_host(tmp_path: Path) -> None:
    """The configs the suite renders give the two hosts different ids, each the
    host's own (so the restarted standby on the failed primary keeps its name)."""
    from kemari_suite.klab.engine import EngineSpec, l1_trees

    spec = EngineSpec(lab_id="t1", slot=1, tree="/x", kernel="/k", initrd="/i")
    trees = l1_trees(spec, ("10.99.1.1", "10.99.1.2"))
    ids = {role: t["replication"]["node_id"] for role, t in trees.items()}
    assert ids == {"primary": "l1a", "secondary": "l1b"}
