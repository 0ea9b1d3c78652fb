"""``kemari status --all``: two live agents (real control servers) and a dead socket."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kemari_suite.cli import statusall
from kemari_suite.cli.main import app
from kemari_suite.service.control import ControlServer

SINCE = time.time() - 300


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a unix socket path holds at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="ksta-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(where: Path, run: Path, vm: str) -> Path:
    path = where / f"{vm}.toml"
    path.write_text(f'[paths]\nrun_dir = "{run}"\n\n[vm]\nname = "{vm}"\n')
    return path


def primary_status() -> dict[str, Any]:
    return {
        "role": "primary",
        "vm": "web",
        "state": "protected",
        "protected": True,
        "since": SINCE,
        "epoch": 12,
        "last_committed_epoch": 10,
        "held_bytes": 2048,
    }


def standby_status() -> dict[str, Any]:
    return {
        "role": "secondary",
        "vm": "db",
        "state": "standby",
        "protected": True,
        "since": SINCE,
        "last_committed_epoch": 7,
        "last_pause_ms": 4.5,
    }


def dead_socket(path: Path) -> None:
    """A socket file no one listens on (an agent killed with SIGKILL leaves one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def with_agents(run: Path, body: Callable[[], Awaitable[None]]) -> None:
    async def reply(status: dict[str, Any]) -> Any:
        return status

    async def main() -> None:
        servers = [
            ControlServer(
                run / "kemari-web" / "control.sock",
                {"status": lambda req: reply(primary_status())},
            ),
            ControlServer(
                run / "kemari-db" / "control.sock",
                {"status": lambda req: reply(standby_status())},
            ),
        ]
        for s in servers:
            await s.start()
        try:
            await body()
        finally:
            for s in servers:
                await s.close()

    asyncio.run(main())


def test_two_agents_and_a_dead_socket(run_dir: Path, tmp_path: Path) -> None:
    configs = [write_config(tmp_path, run_dir, "web"), write_config(tmp_path, run_dir, "db")]
    dead_socket(run_dir / "kemari-old" / "control.sock")
    # The primary's last checkpoint, in its newest artifact folder.
    for stamp, pause in (("20261206-100000", 9.0), ("20261206-110000", 2.5)):
        folder = run_dir / "artifacts" / f"web-primary-{stamp}"
        folder.mkdir(parents=True)
        rows = [{"epoch": 1, "pause_ms": 1.0}, {"epoch": 2, "pause_ms": pause}]
        (folder / "checkpoints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got: list[statusall.VMRow] = []

    async def body() -> None:
        got.extend(await asyncio.to_thread(statusall.collect, configs, [], timeout=2.0))

    with_agents(run_dir, body)
    by_name = {r.name: r for r in got}
    assert [r.name for r in got] == ["db", "old", "web"]
    web, db, old = by_name["web"], by_name["db"], by_name["old"]
    assert web.answered and web.role == "primary" and web.state == "protected"
    assert web.epoch_lag == 1 and web.last_committed_epoch == 10
    assert web.held_bytes == 2048 and web.last_pause_ms == 2.5
    assert web.protected_since == SINCE and web.config == str(configs[0])
    assert db.answered and db.role == "secondary" and db.state == "standby"
    assert db.epoch_lag is None and db.last_committed_epoch == 7
    assert db.last_pause_ms == 4.5 and db.held_bytes is None
    # Found by its run dir alone, and listed as not answering.
    assert not old.answered and old.config is None and old.error
    assert old.socket == str(run_dir / "kemari-old" / "control.sock")

    console = Console(width=200, record=True, color_system=None)
    console.print(statusall.table(got, now=SINCE + 65))
    text = console.export_text()
    assert "no answer" in text and "2.5 ms" in text and "2.0 KiB" in text
    assert "65 s ago" in text


def test_bad_config_is_a_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vm\n")
    (row,) = statusall.collect([bad], [])
    assert row.name == "bad" and not row.answered and "not valid TOML" in (row.error or "")


def test_cli_all_json(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vms = tmp_path / "vms"
    vms.mkdir()
    write_config(vms, run_dir, "web")
    monkeypatch.setattr(statusall, "VMS_DIR", vms)
    monkeypatch.setattr(statusall, "MAIN_CONFIG", tmp_path / "absent.toml")
    monkeypatch.setenv("KEMARI_RUN", str(run_dir))
    dead_socket(run_dir / "kemari-old" / "control.sock")
    results: list[Any] = []

    async def body() -> None:
        def run(*args: str) -> Any:
            return CliRunner().invoke(app, ["status", "--all", *args], env={"COLUMNS": "200"})

        results.append(await asyncio.to_thread(run, "--json"))
        results.append(await asyncio.to_thread(run))

    with_agents(run_dir, body)
    as_json, as_table = results
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.output)
    # web (its config), db and old (the run dir: $KEMARI_RUN).
    assert [v["name"] for v in listed] == ["db", "old", "web"]
    assert listed[2]["state"] == "protected" and listed[2]["epoch_lag"] == 1
    assert listed[1]["answered"] is False and listed[1]["error"]
    assert as_table.exit_code == 0, as_table.output
    assert "no answer" in as_table.output and "protected" in as_table.output
    assert "old: cannot reach agent at" in as_table.output


def test_nothing_on_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statusall, "VMS_DIR", tmp_path / "none")
    monkeypatch.setattr(statusall, "MAIN_CONFIG", tmp_path / "absent.toml")
    monkeypatch.setenv("KEMARI_RUN", str(tmp_path / "run"))
    res = CliRunner().invoke(app, ["status", "--all", "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == []
