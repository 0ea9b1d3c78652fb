"""A flood of idle and garbage connections on the witness does not keep a real client
from its lease: it connects, answers its challenge and is granted, while the flood goes
on. No root needed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from kemari_suite.config import load
from kemari_suite.errors import ConnectError
from kemari_suite.ha.witness import Decision, WitnessClient, server_from_config
from kemari_suite.protocol import framing
from kemari_suite.protocol import link as linkmod
from tests.integration.test_link_flood import Flood

KEY = b"w" * 40
#: What some flood connections send before their garbage: a well-formed request with a
#: wrong MAC (the witness must read the pair's key and check it, then refuse).
BOGUS = framing.encode(
    {"op": "takeover", "vm": "web", "node": "evil", "nonce": "0" * 24, "mac": "0" * 64}
)


def test_a_real_client_gets_its_lease_through_a_flood(tmp_path: Path) -> None:
    base = load(None)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "web.key").write_bytes(KEY)
    (keys / "web.key").chmod(0o600)
    cfg = dataclasses.replace(
        base,
        replication=dataclasses.replace(base.replication, heartbeat_timeout_ms=3000),
        witness=dataclasses.replace(
            base.witness, state_file=tmp_path / "witness.json", keys_dir=keys
        ),
    )

    async def main() -> None:
        rejects: list[str] = []
        server = server_from_config(cfg, "127.0.0.1:0")
        server.on_reject = lambda _peer, err: rejects.append(str(err))
        await server.start()
        assert isinstance(server._server, asyncio.Server)
        port = int(server._server.sockets[0].getsockname()[1])
        flood = Flood(port, tmp_path / "flood-status", BOGUS)
        try:
            while flood.opened < 200:  # the flood is on and the bound is reached
                assert flood.proc.poll() is None, "the flood process ended"
                await asyncio.sleep(0.1)
            client = WitnessClient(KEY, f"127.0.0.1:{port}", "web", "pri", timeout=5)
            attempts, errors = 0, []
            deadline = time.monotonic() + 60
            decision: Decision | None = None
            while decision is None and time.monotonic() < deadline:
                attempts += 1
                try:
                    decision = await client.ask("renew")
                except ConnectError as err:
                    # The tiebreaker asks again at its next heartbeat.
                    errors.append(str(err))
                    await asyncio.sleep(0.2)
            assert decision is not None, f"no reply in {attempts} attempts: {errors[-3:]}"
            assert decision.granted and decision.owner == "pri", decision
            # Renewals go on getting through: a few in a row, as the heartbeat would.
            renewed = 0
            for _ in range(5):
                try:
                    renewed += (await client.ask("renew")).granted
                except ConnectError as err:
                    errors.append(str(err))
            assert renewed >= 3, f"only {renewed} of 5 renewals: {errors[-3:]}"
            # The flood was on before and is still on: the bound acted meanwhile.
            after = len(rejects)
            for _ in range(100):
                if len(rejects) > after + 10:
                    break
                await asyncio.sleep(0.05)
            assert len(rejects) > after + 10, "the flood was over before the client got in"
            assert flood.proc.poll() is None
            assert any("unauthenticated connections were open" in r for r in rejects)
            assert len(server.gate) <= linkmod.MAX_PENDING
            print(f"lease after {attempts} attempt(s) {errors}; {len(rejects)} refused in all")
        finally:
            flood.stop()
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 120))
