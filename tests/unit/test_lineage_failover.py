"""An operator's failover consults the tiebreaker: a copy known to be stale (the primary
ran alone after the standby's last commit) is refused, unless the operator accepts the
data loss, which raises an alert. The built-in disk's sidecar records the generation of
the data it holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from kemari_suite.alerts import Alerter
from kemari_suite.config import AlertConfig
from kemari_suite.disk.builtin import BuiltinDisk, read_sidecar_generation
from kemari_suite.errors import FailoverError
from kemari_suite.ha.witness import WitnessClient, WitnessServer
from kemari_suite.replica.failover import copy_staleness, operator_failover_check
from kemari_suite.service.metrics import Artifacts

KEY = b"k" * 32


def port_of(server: WitnessServer) -> int:
    assert isinstance(server._server, asyncio.Server)
    return int(server._server.sockets[0].getsockname()[1])


def _artifacts(tmp_path: Path) -> tuple[Artifacts, Path]:
    """Real artifacts with a real alert hook that appends each alert to a file."""
    sink = tmp_path / "alerts.jsonl"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat >> {sink}\necho >> {sink}\n")
    hook.chmod(0o700)
    art = Artifacts(tmp_path / "art")
    art.alerter = Alerter(AlertConfig(hook=str(hook), syslog=False), vm="vm", node="sec")
    return art, sink


def test_operator_failover_of_a_stale_copy(tmp_path: Path) -> None:
    art, sink = _artifacts(tmp_path)

    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0)
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            pri = WitnessClient(KEY, addr, "vm", "pri", timeout=5)
            sec = WitnessClient(KEY, addr, "vm", "sec", timeout=5)
            assert (await pri.ask("paired")).granted
            assert await copy_staleness(sec, None) == ""  # paired: the copy is current
            await operator_failover_check(sec, None, art, accept_data_loss=False)
            assert (await pri.ask("solo")).granted
            why = await copy_staleness(sec, None)
            assert "ran without a secondary" in why and "pri" in why
            with pytest.raises(FailoverError, match="--accept-data-loss"):
                await operator_failover_check(sec, None, art, accept_data_loss=False)
            await operator_failover_check(sec, None, art, accept_data_loss=True)
        finally:
            await server.close()

    asyncio.run(main())
    assert art.alerter is not None and art.alerter.close(timeout=20)
    art.close()
    alerts = [json.loads(line) for line in sink.read_text().splitlines() if line.strip()]
    kinds = [a["kind"] for a in alerts]
    assert any("data loss" in a["reason"] for a in alerts), alerts
    assert len(kinds) == 2  # the refusal and the accepted loss
    events = (tmp_path / "art" / "events.jsonl").read_text()
    assert "failover-data-loss-accepted" in events


def test_a_sidecar_generation_older_than_the_tiebreakers_is_stale(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    disk = BuiltinDisk(image)
    disk.attach()
    try:
        disk.generation = 4
        disk.write_state("L1", 9)
        assert read_sidecar_generation(disk.state_path) == 4
        assert disk.read_state().lineage == "L1"  # the CopyState is unchanged
        # A later write_state without a generation keeps the recorded one.
        disk.generation = None
        disk.write_state("L1", 10)
        assert read_sidecar_generation(disk.state_path) == 4
    finally:
        disk.close()

    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0)
        await server.start()
        addr = f"127.0.0.1:{port_of(server)}"
        try:
            pri = WitnessClient(KEY, addr, "vm", "pri", timeout=5)
            sec = WitnessClient(KEY, addr, "vm", "sec", timeout=5)
            for _ in range(5):  # generation 5 by the time we ask
                await pri.ask("solo")
                await pri.ask("paired")
                await pri.ask("release")
            d = await pri.ask("paired")
            assert d.generation > 4
            why = await copy_staleness(sec, 4)
            assert f"generation {d.generation}" in why and "generation 4" in why
            assert await copy_staleness(sec, d.generation) == ""
        finally:
            await server.close()

    asyncio.run(main())


def test_no_tiebreaker_means_nothing_is_known() -> None:
    assert asyncio.run(copy_staleness(None, 3)) == ""
