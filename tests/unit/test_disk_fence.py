"""kemari fence-peer maps the tiebreaker's answer onto DRBD's exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from kemari_suite.config import load
from kemari_suite.errors import ConfigError
from kemari_suite.ha.fence import EXIT_OUTDATE_SELF, EXIT_PEER_FENCED, EXIT_UNDECIDED, fence_peer
from kemari_suite.ha.witness import WitnessServer


def _cfg(witness: str, key_file: Path):  # type: ignore[no-untyped-def]
    if not key_file.exists():
        key_file.write_bytes(b"k" * 32)
        key_file.chmod(0o600)
    base = load(None)
    rep = dataclasses.replace(
        base.replication,
        tiebreaker="witness",
        witness=witness,
        witness_key_file=str(key_file),
    )
    return dataclasses.replace(base, replication=rep)


def test_exit_codes_follow_the_witness(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    server = WitnessServer(b"k" * 32, 3.0, "127.0.0.1", 0)
    loop.run_until_complete(server.start())
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        cfg = _cfg(f"127.0.0.1:{port}", tmp_path / "pair.key")
        assert fence_peer(cfg, "alpha")[0] == EXIT_PEER_FENCED  # first claim: ours
        code, reason = fence_peer(cfg, "beta")
        assert code == EXIT_OUTDATE_SELF and "alpha" in reason
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
    # Nobody answers: I/O stays frozen.
    assert (
        fence_peer(_cfg(f"127.0.0.1:{port}", tmp_path / "pair.key"), "alpha")[0] == EXIT_UNDECIDED
    )


def test_needs_a_tiebreaker() -> None:
    with pytest.raises(ConfigError, match="tiebreaker"):
        fence_peer(load(None), "alpha")
