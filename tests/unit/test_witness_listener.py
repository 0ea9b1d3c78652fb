"""The witness's listener has the replication link's protections: an explicit address, a
deadline for the first authenticated request, a bound on connections without one; and
the witness serves each pair with its own key file only (real loopback sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, load
from kemari_suite.errors import ConfigError, ConnectError
from kemari_suite.ha import witness as witnessmod
from kemari_suite.ha.witness import MAX_MESSAGE, WitnessClient, WitnessServer, server_from_config
from kemari_suite.protocol import framing
from kemari_suite.protocol import link as linkmod

KEY = b"k" * 32


def port_of(server: WitnessServer) -> int:
    assert isinstance(server._server, asyncio.Server)
    return int(server._server.sockets[0].getsockname()[1])


def _cfg(tmp_path: Path, *, replication_key: str = "") -> KemariConfig:
    base = load(None)
    return dataclasses.replace(
        base,
        replication=dataclasses.replace(base.replication, key=replication_key),
        witness=dataclasses.replace(
            base.witness, state_file=tmp_path / "state.json", keys_dir=tmp_path / "keys"
        ),
    )


def _pair_key(cfg: KemariConfig, pair: str, key: bytes) -> None:
    cfg.witness.keys_dir.mkdir(mode=0o700, exist_ok=True)
    path = cfg.witness.keys_dir / f"{pair}.key"
    path.write_bytes(key)
    path.chmod(0o600)


class Rejects:
    def __init__(self) -> None:
        self.items: list[tuple[str, Exception]] = []

    def __call__(self, peer: str, err: Exception) -> None:
        self.items.append((peer, err))

    def reasons(self) -> list[str]:
        return [str(e) for _, e in self.items]


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the witness closed (or reset) the connection; never blocks. The
    challenge it sent first is read and ignored."""
    try:
        while data := sock.recv(4096, socket.MSG_DONTWAIT):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def _until_closed(sock: socket.socket, limit: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if _closed_by_peer(sock):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return float("inf")


# ---- the address and the keys ---------------------------------------------------------


@pytest.mark.parametrize("value", ["", ":7411", "7411", "10.0.0.3:", "10.0.0.3:x"])
def test_the_witness_needs_an_explicit_address(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"witness\.listen"):
        server_from_config(_cfg(tmp_path), value)


def test_every_address_given_explicitly_is_allowed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=linkmod.__name__):
        server = server_from_config(_cfg(tmp_path), "0.0.0.0:7411")
    assert (server.host, server.port) == ("0.0.0.0", 7411)
    assert any(
        "witness.listen" in r.getMessage() and "every address" in r.getMessage()
        for r in caplog.records
    )
    assert server_from_config(_cfg(tmp_path), "[fd00::3]:7411").host == "fd00::3"


def test_the_witness_never_serves_a_pair_with_the_replication_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(tmp_path, replication_key="r" * 64)
    with caplog.at_level(logging.WARNING, logger=witnessmod.__name__):
        server = server_from_config(cfg, "127.0.0.1:0")
    assert server.keys.fallback is None
    assert any("no pair key" in r.getMessage() for r in caplog.records)
    pair_key = b"p" * 40
    _pair_key(cfg, "web", pair_key)

    async def main() -> None:
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            # The replication key speaks for no pair, with or without a key file.
            for vm in ("web", "db"):
                with pytest.raises(ConnectError, match="authentication"):
                    await WitnessClient(b"r" * 64, addr, vm, "pri", timeout=5).ask("renew")
            assert (
                await WitnessClient(pair_key, addr, "web", "pri", timeout=5).ask("renew")
            ).granted
        finally:
            await server.close()

    asyncio.run(main())


# ---- the deadline and the bound -------------------------------------------------------


def test_a_silent_connection_is_closed_at_the_deadline() -> None:
    assert linkmod.HANDSHAKE_TIMEOUT_S <= 5.0

    async def main() -> None:
        rejects = Rejects()
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, handshake_timeout=0.5, on_reject=rejects)
        await server.start()
        try:
            sock = socket.create_connection(("127.0.0.1", port_of(server)))
            try:
                took = await _until_closed(sock, 10.0)
            finally:
                sock.close()
            assert 0.4 < took < 3.0
            assert any("no authenticated request in 0.5 s" in r for r in rejects.reasons())
            assert len(server.gate) == 0
        finally:
            await server.close()

    asyncio.run(main())


def test_bad_requests_do_not_extend_the_deadline() -> None:
    """A peer without the key, sending a bad request now and then, is cut at the same
    deadline as a silent one."""

    async def main() -> None:
        rejects = Rejects()
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, handshake_timeout=1.0, on_reject=rejects)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        try:
            t0 = time.monotonic()
            assert await framing.read_frame(reader, MAX_MESSAGE, 5) is not None
            replies = 0
            while time.monotonic() - t0 < 5:
                writer.write(b'{"op":"renew","vm":"vm","node":"x","mac":"00"}\n')
                try:
                    await writer.drain()
                    rep = await framing.read_frame(reader, MAX_MESSAGE, 5)
                except ConnectionError:
                    break
                if rep is None:
                    break
                assert rep["granted"] is False
                replies += 1
                await asyncio.sleep(0.2)
            took = time.monotonic() - t0
            assert replies >= 2 and took < 3.0, (replies, took)
            assert any("no authenticated request" in r for r in rejects.reasons())
        finally:
            writer.close()
            await server.close()

    asyncio.run(main())


def test_connections_beyond_the_bound_push_out_the_oldest_and_a_client_still_gets_in() -> None:
    async def main() -> None:
        rejects = Rejects()
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, on_reject=rejects)
        await server.start()
        port = port_of(server)
        socks = [
            socket.create_connection(("127.0.0.1", port)) for _ in range(3 * linkmod.MAX_PENDING)
        ]
        try:
            await asyncio.sleep(1.0)
            open_now = [s for s in socks if not _closed_by_peer(s)]
            # Well before the deadline, only the bound is still open: the newest ones.
            assert len(open_now) <= linkmod.MAX_PENDING
            assert open_now == socks[-len(open_now) :]
            assert any("unauthenticated connections were open" in r for r in rejects.reasons())
            client = WitnessClient(KEY, f"127.0.0.1:{port}", "vm", "pri", timeout=5)
            assert (await client.ask("renew")).granted
            # An authenticated connection holds no slot of the bound.
            assert len(server.gate) <= linkmod.MAX_PENDING
        finally:
            for s in socks:
                s.close()
            await server.close()

    asyncio.run(main())


def test_an_authenticated_connection_leaves_the_bound() -> None:
    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, max_pending=1)
        await server.start()
        port = port_of(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            hello = await framing.read_frame(reader, MAX_MESSAGE, 5)
            assert hello is not None
            req = {"op": "renew", "vm": "vm", "node": "pri", "nonce": "n1"}
            req = {**req, "challenge": hello["challenge"]}
            writer.write(framing.encode({**req, "mac": witnessmod._mac(KEY, req)}))
            await writer.drain()
            rep = await framing.read_frame(reader, MAX_MESSAGE, 5)
            assert rep is not None and rep["granted"]
            assert len(server.gate) == 0
            # With the only slot free, another client is not pushed out by this one.
            other = WitnessClient(KEY, f"127.0.0.1:{port}", "vm", "pri", timeout=5)
            assert (await other.ask("renew")).granted
        finally:
            writer.close()
            await server.close()

    asyncio.run(main())


def test_the_client_bounds_the_whole_request_by_its_timeout() -> None:
    """A witness that accepts, sends its challenge and then says nothing: the client's
    one timeout covers the whole exchange, not each step."""

    async def main() -> None:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"challenge":"c"}\n')
            await writer.drain()
            await reader.read()  # until the client hangs up
            writer.close()

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = WitnessClient(KEY, f"127.0.0.1:{port}", "vm", "pri", timeout=0.5)
            t0 = time.monotonic()
            with pytest.raises(ConnectError, match="timeout"):
                await client.ask("renew")
            assert time.monotonic() - t0 < 2.0
        finally:
            server.close()

    asyncio.run(main())
