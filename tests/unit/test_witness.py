"""The witness's lease decisions, and its authenticated protocol over loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kemari_suite.errors import ConnectError
from kemari_suite.ha.witness import MAX_MESSAGE, LeaseTable, WitnessClient, WitnessServer, _mac
from kemari_suite.protocol import framing


def port_of(server: WitnessServer) -> int:
    assert isinstance(server._server, asyncio.Server)
    return int(server._server.sockets[0].getsockname()[1])


def test_owner_renews_other_is_refused_until_expiry() -> None:
    t = LeaseTable(lease_s=3.0, started=0.0)
    assert t.decide("renew", "vm", "pri", now=0.5).granted  # first claim
    d = t.decide("takeover", "vm", "sec", now=3.0)
    assert not d.granted and "held by pri" in d.reason
    assert t.decide("renew", "vm", "pri", now=3.2).granted
    assert not t.decide("takeover", "vm", "sec", now=6.0).granted  # 2.8 s after renew
    d = t.decide("takeover", "vm", "sec", now=6.3)  # 3.1 s after the last renewal
    assert d.granted and d.owner == "sec" and d.generation == 2
    # The old owner is refused from now on.
    assert not t.decide("renew", "vm", "pri", now=6.4).granted


def test_no_takeover_during_witness_grace_period() -> None:
    t = LeaseTable(lease_s=3.0, started=100.0)
    d = t.decide("takeover", "vm", "sec", now=101.0)
    assert not d.granted and "grace" in d.reason
    assert t.decide("takeover", "vm", "sec", now=103.5).granted


def test_release_and_query() -> None:
    t = LeaseTable(lease_s=3.0, started=0.0)
    t.decide("renew", "vm", "a", now=5)
    assert t.decide("query", "vm", "a", now=6).granted
    assert not t.decide("release", "vm", "b", now=6).granted
    assert t.decide("release", "vm", "a", now=6).granted
    assert t.decide("takeover", "vm", "b", now=6.1).granted


def test_protocol_over_loopback_and_wrong_key() -> None:
    async def main() -> None:
        server = WitnessServer(b"k" * 32, 3.0, "127.0.0.1", 0)
        await server.start()
        port = port_of(server)
        try:
            good = WitnessClient(b"k" * 32, f"127.0.0.1:{port}", "vm", "pri", timeout=2)
            d = await good.ask("renew")
            assert d.granted and d.owner == "pri"
            assert good.lease_valid(3.0, 0.5)
            other = WitnessClient(b"k" * 32, f"127.0.0.1:{port}", "vm", "sec", timeout=2)
            assert not (await other.ask("takeover")).granted
            forged = WitnessClient(b"x" * 32, f"127.0.0.1:{port}", "vm", "sec", timeout=2)
            with pytest.raises(ConnectError):
                await forged.ask("takeover")
        finally:
            await server.close()
        with pytest.raises(ConnectError):
            await good.ask("renew")

    asyncio.run(main())


def test_solo_owner_blocks_takeover_even_after_expiry() -> None:
    """A primary that ran without a secondary made the standby's copy stale."""
    t = LeaseTable(lease_s=3.0, started=0.0)
    assert t.decide("renew", "vm", "pri", now=1).granted
    assert t.decide("solo", "vm", "pri", now=2).granted
    d = t.decide("takeover", "vm", "sec", now=100)  # long expired
    assert not d.granted and "stale" in d.reason
    # Protected again: a later failover is allowed after expiry.
    assert t.decide("paired", "vm", "pri", now=101).granted
    assert not t.decide("takeover", "vm", "sec", now=102).granted
    assert t.decide("takeover", "vm", "sec", now=104.5).granted
    # Only the owner may change the flag.
    assert not t.decide("solo", "vm", "pri", now=105).granted


def test_malformed_and_oversized_requests_get_signed_refusals() -> None:
    """Raw JSON lines, each sent with the connection's current challenge: a bad frame is
    refused (signed), an oversized one ends the talk."""
    key = b"k" * 32

    async def main() -> None:
        server = WitnessServer(key, 3.0, "127.0.0.1", 0)
        await server.start()
        port = port_of(server)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            hello = await framing.read_frame(reader, MAX_MESSAGE, 5)
            assert hello is not None
            challenge = hello["challenge"]
            replies = []

            def signed(obj: dict[str, Any]) -> bytes:
                obj = {**obj, "challenge": challenge}
                return framing.encode({**obj, "mac": _mac(key, obj)})

            req: dict[str, Any] = {"op": "renew", "vm": "vm", "node": "pri", "nonce": "n1"}
            frames = [
                lambda: b"not json\n",
                lambda: framing.encode({**req, "challenge": challenge, "mac": "0" * 64}),
                lambda: signed({**req, "op": "steal"}),
                lambda: signed(req),
                lambda: b"{" * (MAX_MESSAGE + 1) + b"\n",
            ]
            for frame in frames:
                writer.write(frame())
                await writer.drain()
                rep = await framing.read_frame(reader, MAX_MESSAGE, 5)
                assert rep is not None
                replies.append(rep)
                challenge = rep.get("challenge", "")
            assert await framing.read_frame(reader, MAX_MESSAGE, 5) is None  # hung up
            writer.close()
        finally:
            await server.close()
        for rep in replies:
            assert rep["mac"] == _mac(key, rep)
        errors = [r.get("error", "") for r in replies]
        assert "not JSON" in errors[0]
        assert "authentication" in errors[1]
        assert "unknown witness op 'steal'" in errors[2]
        assert replies[3]["granted"] and replies[3]["nonce"] == "n1"
        assert f"exceeds the limit of {MAX_MESSAGE} bytes" in errors[4]

    asyncio.run(main())


def test_a_silent_or_garbage_witness_is_a_connect_error() -> None:
    async def main(reply: bytes) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"challenge":"c"}\n')
            await reader.readline()
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = WitnessClient(b"k" * 32, f"127.0.0.1:{port}", "vm", "pri", timeout=2)
            await client.ask("renew")
        finally:
            server.close()

    for reply, match in [
        (b"", "without a reply"),
        (b'{"granted":true', "truncated"),
        (b"[]\n", "not an object"),
        (b'{"granted":true}\n', "authentication"),
        (b"x" * (MAX_MESSAGE + 10) + b"\n", "exceeds the limit"),
    ]:
        with pytest.raises(ConnectError, match=match):
            asyncio.run(main(reply))
