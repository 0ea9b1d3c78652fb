"""``kemari failover --yes`` against a stale copy: the command carries
``accept_data_loss`` to the secondary, whose control handler (the check the agent runs,
:func:`operator_failover_check`, on a real witness) refuses without it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kemari_suite.cli.main import app
from kemari_suite.config import load
from kemari_suite.ha.witness import WitnessClient, WitnessServer
from kemari_suite.node import control_path
from kemari_suite.replica.failover import operator_failover_check
from kemari_suite.service.control import ControlServer
from kemari_suite.service.metrics import Artifacts

KEY = b"k" * 32


@pytest.fixture
def secondary(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A witness where the primary went solo, and a control socket answering
    ``failover`` the way the secondary agent does."""
    cfg_path = tmp_path / "sec.toml"
    cfg_path.write_text(f'[vm]\nname = "vm"\n\n[paths]\nrun_dir = "{tmp_path / "run"}"\n')
    cfg = load(cfg_path)
    seen: list[dict[str, Any]] = []
    art = Artifacts(tmp_path / "art")
    loop = asyncio.new_event_loop()
    witness = WitnessServer(KEY, 3.0, "127.0.0.1", 0)

    async def setup() -> WitnessClient:
        await witness.start()
        assert isinstance(witness._server, asyncio.Server)
        addr = f"127.0.0.1:{witness._server.sockets[0].getsockname()[1]}"
        pri = WitnessClient(KEY, addr, "vm", "pri", timeout=5)
        assert (await pri.ask("solo")).granted
        return WitnessClient(KEY, addr, "vm", "sec", timeout=5)

    sec = loop.run_until_complete(setup())

    async def h_failover(req: dict[str, Any]) -> Any:
        seen.append(req)
        await operator_failover_check(
            sec, None, art, accept_data_loss=bool(req.get("accept_data_loss"))
        )
        return {"epoch": 7}

    control = ControlServer(control_path(cfg), {"failover": h_failover})
    loop.run_until_complete(control.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield cfg_path, seen
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.run_until_complete(witness.close())
        loop.close()
        art.close()


def test_failover_of_a_stale_copy_needs_accept_data_loss(
    secondary: tuple[Path, list[dict[str, Any]]],
) -> None:
    cfg_path, seen = secondary
    runner = CliRunner()
    res = runner.invoke(app, ["failover", "--yes", "-c", str(cfg_path)])
    assert res.exit_code == 2, res.output
    assert "stale" in res.output and "--accept-data-loss" in res.output
    assert seen[-1].get("accept_data_loss") is False
    res = runner.invoke(app, ["failover", "--yes", "--accept-data-loss", "-c", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert seen[-1]["accept_data_loss"] is True
    assert '"epoch": 7' in res.output
