"""The secondary's replication listener: an explicit address, a handshake deadline and a
bound on unauthenticated connections (real loopback sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig, load
from kemari_suite.errors import ConfigError
from kemari_suite.protocol import link as linkmod
from kemari_suite.protocol.link import Link, parse_listen, serve

KEY = b"k" * 32


# ---- the address ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", ":7410", "7410", "10.0.0.1:", "10.0.0.1:x", "h:70000"])
def test_a_listen_address_without_host_or_port_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"replication\.listen"):
        parse_listen(value)


def test_an_explicit_address_is_used_as_given() -> None:
    assert parse_listen("10.0.0.2:7410") == ("10.0.0.2", 7410)
    assert parse_listen("[fd00::2]:7410") == ("fd00::2", 7410)


@pytest.mark.parametrize("value", ["0.0.0.0:7410", "[::]:7410"])
def test_all_addresses_given_explicitly_is_allowed_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=linkmod.__name__):
        host, port = parse_listen(value)
    assert port == 7410 and host in ("0.0.0.0", "::")
    assert any("every address" in r.getMessage() for r in caplog.records)


def test_the_secondary_refuses_an_unspecified_listen_before_starting(
    run_paths: PathsConfig,
) -> None:
    from kemari_suite.replica.secondary import SecondaryAgent
    from kemari_suite.vm.qemu import VMSpec

    base = load(None)
    cfg: KemariConfig = dataclasses.replace(
        base,
        paths=run_paths,
        replication=dataclasses.replace(base.replication, key="k" * 64, listen=":7410"),
    )
    spec = VMSpec(name="ls", kernel=Path("/nonexistent"), initrd=Path("/nonexistent"))
    with pytest.raises(ConfigError, match=r"replication\.listen"):
        SecondaryAgent(cfg, spec)


# ---- the handshake deadline and the bound ---------------------------------------------


class Rejects:
    def __init__(self) -> None:
        self.items: list[tuple[str, Exception]] = []

    def __call__(self, peer: str, err: Exception) -> None:
        self.items.append((peer, err))

    def reasons(self) -> list[str]:
        return [str(e) for _, e in self.items]


async def _never(link: Link) -> None:
    link.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the server closed (or reset) the connection; never blocks."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def _until_closed(sock: socket.socket, limit: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if _closed_by_peer(sock):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return float("inf")


def test_an_idle_connection_is_dropped_after_the_default_handshake_deadline() -> None:
    assert linkmod.HANDSHAKE_TIMEOUT_S <= 5.0

    async def main() -> None:
        rejects = Rejects()
        server = await serve(
            "127.0.0.1", 0, key=KEY, node_id="s", on_link=_never, on_reject=rejects
        )
        port = server.sockets[0].getsockname()[1]
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            try:
                took = await _until_closed(sock, 15.0)
            finally:
                sock.close()
            # The default deadline, with room for two busy cores (the old one was 10 s).
            assert took < linkmod.HANDSHAKE_TIMEOUT_S + 3.0
            assert any("did not finish" in r for r in rejects.reasons())
        finally:
            server.close()

    asyncio.run(main())


def test_unauthenticated_connections_beyond_the_bound_are_closed_at_once() -> None:
    async def main() -> None:
        rejects = Rejects()
        server = await serve(
            "127.0.0.1", 0, key=KEY, node_id="s", on_link=_never, on_reject=rejects
        )
        port = server.sockets[0].getsockname()[1]
        socks = [
            socket.create_connection(("127.0.0.1", port)) for _ in range(3 * linkmod.MAX_PENDING)
        ]
        try:
            await asyncio.sleep(1.0)
            open_now = [s for s in socks if not _closed_by_peer(s)]
            # Well before the handshake deadline, only the bound is still open.
            assert len(open_now) <= linkmod.MAX_PENDING
            assert any("unauthenticated connections" in r for r in rejects.reasons())
        finally:
            for s in socks:
                s.close()
            server.close()

    asyncio.run(main())


def test_garbage_is_closed_at_once_and_named() -> None:
    async def main() -> None:
        rejects = Rejects()
        server = await serve(
            "127.0.0.1", 0, key=KEY, node_id="s", on_link=_never, on_reject=rejects
        )
        port = server.sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await _until_closed(sock, 3.0) < 3.0
            assert any("preamble" in r for r in rejects.reasons()), rejects.reasons()
        finally:
            sock.close()
            server.close()

    asyncio.run(main())


def test_the_pending_gate_evicts_the_oldest_idle_connection_first() -> None:
    gate = linkmod.PendingGate(limit=2)
    closed: list[str] = []
    a = gate.admit(lambda: closed.append("a"))
    b = gate.admit(lambda: closed.append("b"))
    assert a is not None and b is not None
    gate.progressed(a)  # a sent its preamble: no longer idle
    c = gate.admit(lambda: closed.append("c"))
    assert c is not None and closed == ["b"]
    gate.progressed(c)
    # Both in their handshake: the newcomer is the one refused.
    assert gate.admit(lambda: closed.append("d")) is None
    gate.done(a)
    assert gate.admit(lambda: closed.append("e")) is not None
    gate.done(a)  # done twice is harmless
    assert len(gate) == 2
