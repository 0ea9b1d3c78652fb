"""The witness's lease decisions, and its authenticated protocol over loopback."""

from __future__ import annotations

import asyncio

import pytest

from kemari_suite.errors import ConnectError
from kemari_suite.ha.witness import LeaseTable, WitnessClient, WitnessServer


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
        assert server._server is not None
        port = server._server.sockets[0].getsockname()[1]
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
