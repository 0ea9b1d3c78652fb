"""HELD is bounded (issue 13, item 5), on a real QEMU under TCG.

No tiebreaker and the secondary gone: the primary holds output (HELD) and every guest
write piles up in memory. At ``replication.held_limit_mib`` the guest is paused (QMP
``query-status`` says so) and an alert is raised; ``release`` without ``solo`` reports
and changes nothing; ``release --solo`` goes on unprotected: the held writes reach the
disk, the guest runs again. The CLI command talks to the agent's real control socket.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kemari_suite.checkpoint import commands, loss
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.cli.release import release
from kemari_suite.config import PathsConfig
from kemari_suite.errors import ReplicationError
from kemari_suite.service.control import ControlServer
from tests.conftest import needs_root
from tests.integration.window_faults_rig import OUT_OFFSET, Rig, guest_spec, make_config

pytestmark = [pytest.mark.integration, needs_root]

LIMIT_MIB = 1
CHUNK = b"w" * (256 << 10)


def _rig(tmp_path: Path, run_paths: PathsConfig, tag: str) -> Rig:
    cfg = make_config(tmp_path, run_paths, mode="speculative", held_limit_mib=LIMIT_MIB)
    return Rig(cfg, guest_spec(tag), tmp_path / "artifacts")


async def _held(rig: Rig) -> None:
    """Protected, then the secondary goes away: no tiebreaker, so HELD."""
    await rig.start()
    assert rig.replica is not None
    await rig.replica.close()
    await loss.secondary_lost(rig.agent, "test: the secondary is gone")
    assert rig.agent.state is PrimaryState.HELD


async def _wait_status(rig: Rig, want: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = await rig.qemu_status()
        if st == want or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.05)


def test_the_bound_pauses_the_guest_and_release_solo_resumes_it(
    tmp_path: Path, run_paths: PathsConfig
) -> None:
    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "bound")
        try:
            await _held(rig)
            a = rig.agent
            table = commands.handlers(a)
            # Under the bound: the guest runs and its writes are held.
            for i in range(3):
                await rig.guest_writes(CHUNK, OUT_OFFSET + i * len(CHUNK))
            await asyncio.sleep(0.3)
            assert await rig.qemu_status() == "running"
            st = a.status_dict()
            assert st["held_limit_bytes"] == LIMIT_MIB << 20
            assert st["held_bytes"] == 3 * len(CHUNK) and not st["held_paused"]
            # The write that reaches the bound pauses the guest and alerts.
            await rig.guest_writes(CHUNK, OUT_OFFSET + 3 * len(CHUNK))
            assert await _wait_status(rig, "paused") == "paused"
            st = a.status_dict()
            assert st["held_bytes"] >= LIMIT_MIB << 20 and st["held_paused"]
            assert any("held_limit_mib" in al["reason"] for al in a.artifacts.alert_history())
            assert any(e["event"] == "held-limit" for e in rig.events())
            assert not rig.on_disk(CHUNK)
            # Without solo: a report, nothing changes.
            res = await table["release"]({"solo": False})
            assert res["released"] is False and res["state"] == "held" and res["held_paused"]
            assert await rig.qemu_status() == "paused" and a.state is PrimaryState.HELD
            with pytest.raises(ValueError, match="solo must be true or false"):
                await table["release"]({"solo": "yes"})
            # Solo: unprotected, the writes reach the disk, the guest runs.
            res = await table["release"]({"solo": True})
            assert res["released"] is True and res["released_bytes"] == 4 * len(CHUNK)
            assert a.state is PrimaryState.UNPROTECTED
            assert "release --solo" in a.life.reason
            assert await rig.qemu_status() == "running"
            for i in range(4):
                assert rig.on_disk(CHUNK, OUT_OFFSET + i * len(CHUNK))
            assert a.status_dict()["held_bytes"] == 0
            assert any("release --solo" in al["reason"] for al in a.artifacts.alert_history())
            # Writes go through now: no bound, no pause.
            for i in range(6):
                await rig.guest_writes(CHUNK, OUT_OFFSET + i * len(CHUNK))
            await asyncio.sleep(0.3)
            assert await rig.qemu_status() == "running"
        finally:
            await rig.close()

    asyncio.run(run())


def test_release_solo_refuses_a_protected_primary(tmp_path: Path, run_paths: PathsConfig) -> None:
    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "refuse")
        try:
            await rig.start()
            with pytest.raises(ReplicationError, match="this one is protected"):
                await commands.handlers(rig.agent)["release"]({"solo": True})
            assert rig.agent.state is PrimaryState.PROTECTED
        finally:
            await rig.close()

    asyncio.run(run())


def test_the_release_command_through_the_control_socket(
    tmp_path: Path, run_paths: PathsConfig
) -> None:
    """``kemari release`` and ``kemari release --solo`` against the agent's socket."""
    app = typer.Typer()
    app.command()(release)
    app.command("noop")(lambda: None)  # a group, so the command is named

    async def run() -> None:
        rig = _rig(tmp_path, run_paths, "cli")
        a = rig.agent
        server = ControlServer(a.vm.paths.run_dir / "control.sock", commands.handlers(a))
        conf = tmp_path / "kemari.toml"
        conf.write_text(
            f'[vm]\nname = "{a.spec.name}"\n'
            f'[paths]\nrun_dir = "{rig.cfg.paths.run_dir}"\nshm_dir = "{run_paths.shm_dir}"\n'
        )
        try:
            await _held(rig)
            await server.start()
            await rig.guest_writes(CHUNK)
            runner = CliRunner()
            r = await asyncio.to_thread(runner.invoke, app, ["release", "-c", str(conf)])
            assert r.exit_code == 0, r.output
            assert "state held" in r.output and f"{len(CHUNK)} of {LIMIT_MIB << 20}" in r.output
            assert a.state is PrimaryState.HELD
            r = await asyncio.to_thread(runner.invoke, app, ["release", "-c", str(conf), "--solo"])
            assert r.exit_code == 0, r.output
            assert f"released {len(CHUNK)} held bytes" in r.output
            assert a.state is PrimaryState.UNPROTECTED and rig.on_disk(CHUNK)
            # Again: not held any more, a clear error and exit code 2.
            r = await asyncio.to_thread(runner.invoke, app, ["release", "-c", str(conf), "--solo"])
            assert r.exit_code == 2 and "this one is unprotected" in r.output
        finally:
            await server.close()
            await rig.close()

    asyncio.run(run())
