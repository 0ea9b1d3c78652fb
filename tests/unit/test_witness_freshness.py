"""Witness requests carry freshness (the connection's challenge under the MAC): the
bytes of a real request, captured on the wire and sent again, are refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kemari_suite.errors import ConfigError, ConnectError
from kemari_suite.ha.witness import MAX_MESSAGE, WitnessClient, WitnessServer
from kemari_suite.ha.witness_state import PairKeys, read_key_file
from kemari_suite.protocol import framing

KEY = b"k" * 32


def port_of(server: WitnessServer) -> int:
    assert isinstance(server._server, asyncio.Server)
    return int(server._server.sockets[0].getsockname()[1])


async def _recording_relay(
    target: int, captured: list[bytes]
) -> tuple[asyncio.AbstractServer, int]:
    """A TCP relay in front of the witness that records what clients send."""

    async def pump(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, sink: list[bytes] | None
    ) -> None:
        try:
            while data := await r.read(65536):
                if sink is not None:
                    sink.append(data)
                w.write(data)
                await w.drain()
        finally:
            w.close()

    async def serve(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pump(cr, sw, captured), pump(sr, cw, None))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _send_raw(port: int, data: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = await framing.read_frame(reader, MAX_MESSAGE, 5)
        assert greeting is not None and "challenge" in greeting
        writer.write(data)
        await writer.drain()
        rep = await framing.read_frame(reader, MAX_MESSAGE, 5)
        assert rep is not None
        return rep
    finally:
        writer.close()


def test_a_captured_request_replayed_is_refused() -> None:
    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0)
        await server.start()
        captured: list[bytes] = []
        relay, relay_port = await _recording_relay(port_of(server), captured)
        try:
            pri = WitnessClient(KEY, f"127.0.0.1:{relay_port}", "vm", "pri", timeout=5)
            assert (await pri.ask("release")).granted is False  # nothing held yet
            sec = WitnessClient(KEY, f"127.0.0.1:{relay_port}", "vm", "sec", timeout=5)
            await asyncio.sleep(3.1)  # past the grace period of a fresh witness
            d = await sec.ask("takeover")
            assert d.granted and d.owner == "sec"
            await asyncio.sleep(0.1)
            takeover_bytes = b"".join(captured[1:])
            assert b'"takeover"' in takeover_bytes
            assert (await sec.ask("release")).granted
            # An attacker replays the captured takeover: refused, and nothing changed.
            rep = await _send_raw(port_of(server), takeover_bytes)
            assert rep["granted"] is False
            assert "replayed" in str(rep.get("error"))
            assert server.table.leases["vm"].owner is None
        finally:
            relay.close()
            await server.close()

    asyncio.run(main())


def test_a_request_without_the_challenge_is_refused() -> None:
    """The old, challenge-less request of a client that only signs its own nonce."""
    from kemari_suite.ha.witness import _mac

    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0)
        await server.start()
        try:
            req: dict[str, object] = {"op": "renew", "vm": "vm", "node": "pri", "nonce": "n1"}
            rep = await _send_raw(port_of(server), framing.encode({**req, "mac": _mac(KEY, req)}))
            assert rep["granted"] is False and "replayed" in str(rep["error"])
        finally:
            await server.close()

    asyncio.run(main())


# ---- per-pair keys --------------------------------------------------------------------


def _key(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_key_files_must_be_private_and_long(tmp_path: Path) -> None:
    good = _key(tmp_path / "good.key", os.urandom(32).hex().encode() + b"\n")
    assert len(read_key_file(good, what="x")) == 64
    with pytest.raises(ConfigError, match="readable by group or others"):
        read_key_file(_key(tmp_path / "g.key", b"a" * 40, 0o640), what="x")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        read_key_file(_key(tmp_path / "s.key", b"a" * 31), what="x")
    with pytest.raises(ConfigError, match="cannot read"):
        read_key_file(tmp_path / "missing.key", what="x")


def test_pair_keys_and_name_checks(tmp_path: Path) -> None:
    _key(tmp_path / "web.key", b"w" * 32)
    keys = PairKeys(tmp_path, fallback=None)
    assert keys.key_for("web") == b"w" * 32
    for bad in ("../etc/passwd", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="pair name"):
            keys.key_for(bad)
    with pytest.raises(ValueError, match="no key for pair 'db'"):
        keys.key_for("db")
    assert PairKeys(tmp_path, fallback=b"f" * 32).key_for("db") == b"f" * 32


def test_the_witness_uses_each_pairs_own_key(tmp_path: Path) -> None:
    web, db = b"w" * 32, b"d" * 32
    _key(tmp_path / "web.key", web)
    _key(tmp_path / "db.key", db)

    async def main() -> None:
        server = WitnessServer(None, 3.0, "127.0.0.1", 0, keys_dir=tmp_path)
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            assert (await WitnessClient(web, addr, "web", "pri", timeout=5).ask("renew")).granted
            assert (await WitnessClient(db, addr, "db", "pri", timeout=5).ask("renew")).granted
            # One pair's key does not speak for another pair.
            with pytest.raises(ConnectError, match="authentication"):
                await WitnessClient(web, addr, "db", "sec", timeout=5).ask("takeover")
        finally:
            await server.close()

    asyncio.run(main())


def _witness_cfg(**rep: object):  # type: ignore[no-untyped-def]
    import dataclasses

    from kemari_suite.config import load

    base = load(None)
    r = dataclasses.replace(base.replication, tiebreaker="witness", witness="127.0.0.1:7411", **rep)
    return dataclasses.replace(base, replication=r)


def test_agents_use_the_witness_key_file_never_the_replication_key(tmp_path: Path) -> None:
    from kemari_suite.ha.tiebreak import make_tiebreaker

    wkey = _key(tmp_path / "w.key", b"w" * 40)
    tb = make_tiebreaker(
        _witness_cfg(key="r" * 32, witness_key_file=str(wkey)), "pri", format_lease=False
    )
    assert isinstance(tb, WitnessClient) and tb.key == b"w" * 40
    loose = _key(tmp_path / "loose.key", b"w" * 40, 0o644)
    with pytest.raises(ConfigError, match=r"replication\.witness_key_file.*chmod 600"):
        make_tiebreaker(_witness_cfg(witness_key_file=str(loose)), "pri", format_lease=False)
    with pytest.raises(ConfigError, match="witness_key_file"):
        make_tiebreaker(_witness_cfg(), "pri", format_lease=False)
    # The replication key never stands in for the witness key.
    with pytest.raises(ConfigError, match="witness_key_file"):
        make_tiebreaker(_witness_cfg(key="r" * 32), "pri", format_lease=False)
