"""A real ``kemari witness`` process on loopback, killed (SIGKILL) and started again:
its decisions survive, and a primary that ran alone is never undercut by a stale
standby. No root needed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.errors import ConnectError
from kemari_suite.ha.witness import Decision, Op, WitnessClient

KEY = os.urandom(32).hex().encode()
LEASE_MS = 1000
KEMARI = Path(sys.executable).with_name("kemari")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WitnessProcess:
    """``kemari witness -c CONFIG`` as a child process, stopped by its PID."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.state = tmp / "state" / "witness.json"
        keys = tmp / "keys"
        keys.mkdir()
        (keys / "vm.key").write_bytes(KEY)
        (keys / "vm.key").chmod(0o600)
        self.config = tmp / "witness.toml"
        self.config.write_text(
            f"[replication]\nheartbeat_timeout_ms = {LEASE_MS}\n\n"
            f'[witness]\nlisten = "127.0.0.1:{self.port}"\n'
            f'state_file = "{self.state}"\nkeys_dir = "{keys}"\n'
        )
        self.log = tmp / "witness.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(KEMARI), "witness", "-c", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30  # two busy cores: the import alone takes seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"witness exited: {self.log.read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError(f"witness did not listen: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[WitnessProcess]:
    w = WitnessProcess(tmp_path)
    w.start()
    try:
        yield w
    finally:
        w.kill()


def ask(w: WitnessProcess, node: str, op: Op) -> Decision:
    return asyncio.run(WitnessClient(KEY, w.address, "vm", node, timeout=10).ask(op))


def test_restart_while_solo_refuses_the_stale_standby(witness: WitnessProcess) -> None:
    assert ask(witness, "pri", "renew").granted
    solo = ask(witness, "pri", "solo")
    assert solo.granted
    witness.kill()
    witness.start()
    time.sleep(LEASE_MS / 1000 * 1.5)  # past the grace period and the lease
    d = ask(witness, "sec", "takeover")
    assert not d.granted and "stale" in d.reason
    assert d.owner == "pri" and d.solo and d.generation == solo.generation
    # The primary that ran alone keeps its lease and its generation.
    d = ask(witness, "pri", "renew")
    assert d.granted and d.generation == solo.generation


def test_restart_while_paired_keeps_the_holder_and_the_generation(
    witness: WitnessProcess,
) -> None:
    first = ask(witness, "pri", "paired")
    assert first.granted
    witness.kill()
    witness.start()
    d = ask(witness, "pri", "renew")
    assert d.granted and d.generation == first.generation
    assert not ask(witness, "sec", "takeover").granted  # the holder renews
    time.sleep(LEASE_MS / 1000 * 1.5)
    d = ask(witness, "sec", "takeover")
    assert d.granted and d.generation > first.generation


def test_wrong_key_is_refused_by_the_process(witness: WitnessProcess) -> None:
    client = WitnessClient(b"x" * 32, witness.address, "vm", "pri", timeout=10)
    with pytest.raises(ConnectError, match="authentication"):
        asyncio.run(client.ask("renew"))


def test_witness_without_a_listen_address_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[witness]\nstate_file = "{tmp_path / "s.json"}"\n')
    res = subprocess.run(
        [str(KEMARI), "witness", "-c", str(cfg)], capture_output=True, timeout=60, text=True
    )
    assert res.returncode == 2
    assert "listen" in res.stderr and "[witness]" in res.stderr
