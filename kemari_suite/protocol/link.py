"""The replication link: :mod:`wire` sessions over asyncio TCP streams.

The primary connects (it is the handshake's initiator); the secondary listens. A
:class:`Link` sends and receives whole messages; the handshake happens before a Link is
handed out, so everything that reaches the agents is authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from kemari_suite.errors import AuthError, ConnectError, ProtocolError
from kemari_suite.protocol import wire

READ_CHUNK = 1 << 20


class Link:
    """One authenticated connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: wire.Session,
        peer: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.peer = peer
        self._inbox: deque[wire.Message] = deque()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    async def send(self, msg: wire.Message) -> int:
        """Send one message; returns the bytes put on the wire.

        Raises:
            ConnectionError: the connection is gone.
            ProtocolError: the session failed or was closed.
        """
        if self.closed:
            raise ConnectionError(f"link to {self.peer} is closed")
        # encode_parts and writelines with no await between them: frames stay in
        # sequence-number order even with several senders (heartbeats, epochs).
        parts = self.session.encode_parts(msg)
        n = sum(len(p) for p in parts)
        self.writer.writelines(parts)
        self.bytes_sent += n
        await self.writer.drain()
        return n

    async def recv(self) -> wire.Message:
        """The next message.

        Raises:
            ConnectionError: the peer closed the connection (cleanly, between frames).
            ProtocolError: malformed, forged or truncated data.
        """
        while not self._inbox:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                self.session.decoder.eof()
                raise ConnectionError(f"{self.peer} closed the connection")
            self.bytes_received += len(data)
            self._inbox.extend(self.session.feed(data))
        return self._inbox.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: wire.Session,
    peer: str,
    timeout: float,
) -> Link:
    session.start()
    writer.write(session.data_to_send())
    await writer.drain()
    early: list[wire.Message] = []

    async def run() -> None:
        while not session.established:
            data = await reader.read(65536)
            if not data:
                session.decoder.eof()
                raise ConnectError(peer, "closed the connection during the handshake")
            early.extend(session.feed(data))
            out = session.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError as err:
        raise ConnectError(peer, f"handshake did not finish in {timeout:.1f} s") from err
    link = Link(reader, writer, session, peer)
    link._inbox.extend(early)
    return link


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    writer.transport.set_write_buffer_limits(high=32 << 20)


async def connect(address: str, *, key: bytes, node_id: str, timeout: float) -> Link:
    """Connect to the secondary at ``host:port`` and authenticate.

    Raises:
        ConnectError: unreachable, refused, or the handshake timed out.
        AuthError: the peer does not hold the same key.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectError(address, "peer address must be host:port")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), limit=READ_CHUNK * 4), timeout
        )
    except (OSError, TimeoutError) as err:
        raise ConnectError(address, str(err) or "timeout") from err
    _tune(writer)
    session = wire.Session(
        key,
        role=wire.Role.PRIMARY,
        node_id=node_id,
        initiator=True,
        accept_roles={wire.Role.SECONDARY},
    )
    try:
        return await _handshake(reader, writer, session, address, timeout)
    except BaseException:
        writer.close()
        raise


async def serve(
    host: str,
    port: int,
    *,
    key: bytes,
    node_id: str,
    on_link: Callable[[Link], Awaitable[None]],
    handshake_timeout: float = 10.0,
    on_reject: Callable[[str, Exception], None] | None = None,
) -> asyncio.AbstractServer:
    """Listen for primaries; hand each authenticated connection to ``on_link``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        peer = f"{addr[0]}:{addr[1]}" if addr else "?"
        _tune(writer)
        session = wire.Session(
            key,
            role=wire.Role.SECONDARY,
            node_id=node_id,
            initiator=False,
            accept_roles={wire.Role.PRIMARY},
        )
        try:
            link = await _handshake(reader, writer, session, peer, handshake_timeout)
        except (AuthError, ProtocolError, ConnectError, ConnectionError) as err:
            if on_reject is not None:
                on_reject(peer, err)
            writer.close()
            return
        await on_link(link)

    return await asyncio.start_server(handle, host, port, limit=READ_CHUNK * 4, reuse_address=True)
