"""The witness's lease table survives a restart: it is written (temporary file, fsync,
rename, directory fsync) before any reply, and a restarted witness decides from it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kemari_suite.errors import ConfigError
from kemari_suite.ha.witness import LeaseTable, WitnessClient, WitnessServer
from kemari_suite.ha.witness_state import load_state, save_state

KEY = b"k" * 32


def port_of(server: WitnessServer) -> int:
    assert isinstance(server._server, asyncio.Server)
    return int(server._server.sockets[0].getsockname()[1])


def test_generation_rises_on_every_grant_of_a_new_era() -> None:
    """Claim, going solo and takeover each bump the fencing token; renewals do not."""
    t = LeaseTable(lease_s=3.0, started=0.0)
    g1 = t.decide("renew", "vm", "pri", now=5).generation
    assert t.decide("renew", "vm", "pri", now=6).generation == g1
    g2 = t.decide("solo", "vm", "pri", now=7).generation
    assert g2 > g1  # writes made alone are newer than anything the standby holds
    assert t.decide("paired", "vm", "pri", now=8).generation == g2
    g3 = t.decide("takeover", "vm", "sec", now=20).generation
    assert g3 > g2


def test_a_solo_owner_that_released_still_blocks_a_stale_takeover() -> None:
    t = LeaseTable(lease_s=3.0, started=0.0)
    t.decide("solo", "vm", "pri", now=5)
    assert t.decide("release", "vm", "pri", now=6).granted
    d = t.decide("takeover", "vm", "sec", now=7)
    assert not d.granted and "stale" in d.reason and d.solo
    # The solo owner itself may come back.
    assert t.decide("renew", "vm", "pri", now=8).granted


def test_table_round_trips_through_the_state_file(tmp_path: Path) -> None:
    t = LeaseTable(lease_s=3.0, started=0.0)
    t.decide("renew", "web", "pri", now=5)
    t.decide("solo", "web", "pri", now=6)
    t.decide("renew", "db", "a", now=6)
    path = tmp_path / "witness.json"
    save_state(path, t.snapshot())
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    again = LeaseTable(lease_s=3.0, started=100.0)
    again.restore(load_state(path))
    web = again.leases["web"]
    assert (web.owner, web.solo, web.generation) == ("pri", True, t.leases["web"].generation)
    assert again.leases["db"].owner == "a"


def test_a_restarted_table_refuses_the_stale_standby_and_keeps_the_holder() -> None:
    """Before this fix, a restarted witness forgot "solo" and granted the takeover."""
    t = LeaseTable(lease_s=3.0, started=0.0)
    t.decide("solo", "vm", "pri", now=5)
    again = LeaseTable(lease_s=3.0, started=1000.0)
    again.restore(t.snapshot())
    d = again.decide("takeover", "vm", "sec", now=1010.0)  # long after the grace period
    assert not d.granted and "stale" in d.reason
    # A paired holder keeps its lease for the grace period, then can be taken over.
    p = LeaseTable(lease_s=3.0, started=0.0)
    gen = p.decide("renew", "vm", "pri", now=5).generation
    again = LeaseTable(lease_s=3.0, started=1000.0)
    again.restore(p.snapshot())
    assert not again.decide("takeover", "vm", "sec", now=1001.0).granted
    d = again.decide("renew", "vm", "pri", now=1001.5)
    assert d.granted and d.generation == gen
    d = again.decide("takeover", "vm", "sec", now=1005.0)
    assert d.granted and d.generation > gen


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "not JSON"),
        ('{"version": 1, "pairs": {"vm": {"owner": 3}}}', "owner"),
        ('{"version": 99, "pairs": {}}', "version"),
        ('{"version": 1, "pairs": {"vm": {"generation": -1}}}', "generation"),
    ],
)
def test_a_corrupted_state_file_refuses_to_start(tmp_path: Path, content: str, match: str) -> None:
    """Forgetting the table could grant a stale takeover: never start from a guess."""
    path = tmp_path / "witness.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_state(path)
    assert str(path) in str(info.value)


def test_a_missing_state_file_is_an_empty_table(tmp_path: Path) -> None:
    assert load_state(tmp_path / "nope.json") == {}


def test_server_persists_before_replying_and_a_new_server_resumes(tmp_path: Path) -> None:
    state = tmp_path / "state" / "witness.json"

    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, state_file=state)
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            pri = WitnessClient(KEY, addr, "vm", "pri", timeout=5)
            assert (await pri.ask("renew")).granted
            d = await pri.ask("solo")
            assert d.granted
            # Written by the time the reply arrived.
            on_disk = json.loads(state.read_text())
            assert on_disk["pairs"]["vm"]["solo"] is True
            assert on_disk["pairs"]["vm"]["generation"] == d.generation
        finally:
            await server.close()
        server = WitnessServer(KEY, 0.2, "127.0.0.1", 0, state_file=state)
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            await asyncio.sleep(0.4)  # the grace period and the lease are over
            sec = WitnessClient(KEY, addr, "vm", "sec", timeout=5)
            d = await sec.ask("takeover")
            assert not d.granted and "stale" in d.reason
        finally:
            await server.close()

    asyncio.run(main())
    assert oct(state.parent.stat().st_mode & 0o777) == oct(0o700)


def test_state_file_write_failure_refuses_the_grant(tmp_path: Path) -> None:
    """A grant the witness cannot make durable is not given (and not kept in memory)."""
    state = tmp_path / "witness.json"

    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, state_file=state)
        await server.start()
        state.mkdir()  # the rename over it fails, even for root
        try:
            pri = WitnessClient(KEY, f"127.0.0.1:{port_of(server)}", "vm", "pri", timeout=5)
            rep = await pri.ask("renew")
            assert not rep.granted and "cannot persist" in rep.reason
            assert server.table.leases["vm"].owner is None
        finally:
            await server.close()

    asyncio.run(main())
