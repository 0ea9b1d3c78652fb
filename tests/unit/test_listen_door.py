"""The listening-socket protections shared by the replication link and the witness
(:mod:`kemari_suite.protocol.listen`): one :class:`Door` in front of both, with the
same handshake timeout, the same bound on unauthenticated connections, and the same
account of every connection it refuses."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kemari_suite.errors import ConnectError
from kemari_suite.ha.witness import WitnessServer
from kemari_suite.protocol import link as linkmod
from kemari_suite.protocol import listen

KEY = b"k" * 32


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Writer:
    """What the door reads of an asyncio.StreamWriter."""

    def __init__(self, peername: Any) -> None:
        self.peername = peername
        self.transport = _Transport()

    def get_extra_info(self, name: str) -> Any:
        return self.peername if name == "peername" else None


def test_the_link_and_the_witness_stand_behind_the_same_door() -> None:
    server = WitnessServer(KEY, 3.0, "127.0.0.1", 0, handshake_timeout=1.5, max_pending=3)
    assert isinstance(server.door, listen.Door)
    assert server.door.timeout == 1.5 and server.door.gate.limit == 3
    assert server.gate is server.door.gate
    listener = linkmod._Listener(
        KEY,
        "s",
        _never,
        tls_on=False,
        handshake_timeout=2.5,
        max_pending=4,
        on_reject=None,
    )
    assert isinstance(listener.door, listen.Door)
    assert listener.door.timeout == 2.5 and listener.door.gate.limit == 4
    # The same defaults, and the names the link always exported.
    assert linkmod.HANDSHAKE_TIMEOUT_S == listen.HANDSHAKE_TIMEOUT_S
    assert linkmod.MAX_PENDING == listen.MAX_PENDING
    assert linkmod.parse_listen is listen.parse_listen
    assert linkmod.PendingGate is listen.PendingGate


async def _never(link: linkmod.Link) -> None:
    raise AssertionError("no link expected")


def test_the_door_admits_names_evicts_and_refuses() -> None:
    rejects: list[tuple[str, str]] = []
    door = listen.Door(
        handshake_timeout=1.0, max_pending=1, on_reject=lambda p, e: rejects.append((p, str(e)))
    )
    first = _Writer(("10.0.0.9", 4000))
    admitted = door.admit(first)  # type: ignore[arg-type]
    assert admitted is not None
    peer, pending = admitted
    assert peer == "10.0.0.9:4000"
    # Full, the oldest idle one goes.
    second = _Writer(None)
    again = door.admit(second)  # type: ignore[arg-type]
    assert again is not None and again[0] == "?"
    assert first.transport.aborted and pending.evicted
    # Full of a connection in its handshake: the newcomer is refused at once, and said.
    again[1].progressed()
    third = _Writer(("10.0.0.7", 1))
    assert door.admit(third) is None  # type: ignore[arg-type]
    assert third.transport.aborted
    assert rejects and rejects[-1][0] == "10.0.0.7:1"
    assert "in their handshake" in rejects[-1][1]
    door.reject("x", ConnectError("x", "why"))
    assert rejects[-1] == ("x", "x: why") or rejects[-1][0] == "x"


def test_a_door_without_a_listener_for_rejects_is_quiet() -> None:
    door = listen.Door(handshake_timeout=1.0, max_pending=1, on_reject=None)
    door.reject("p", ConnectError("p", "why"))  # nobody to tell: no error
    with pytest.raises(ValueError):
        listen.Door(handshake_timeout=1.0, max_pending=0, on_reject=None)


def test_the_door_is_used_by_a_running_witness() -> None:
    async def main() -> None:
        rejects: list[str] = []
        server = WitnessServer(
            KEY, 3.0, "127.0.0.1", 0, max_pending=1, on_reject=lambda p, e: rejects.append(p)
        )
        await server.start()
        try:
            assert server._server is not None
            port = server._server.sockets[0].getsockname()[1]
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for _ in range(100):
                if len(rejects) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert len(rejects) >= 2 and len(server.door.gate) <= 1
            for _r, w in conns:
                w.close()
        finally:
            await server.close()

    asyncio.run(main())
