"""The replication link: :mod:`wire` sessions over asyncio TCP streams, in TLS 1.3.

The primary connects (it is the handshake's initiator); the secondary listens. A
connection opens with the link preamble, then TLS when ``replication.tls`` is on, then
the pre-shared-key handshake, which binds the TLS channel (see :mod:`tls`). A
:class:`Link` sends and receives whole messages; the handshake happens before a Link is
handed out, so everything that reaches the agents is authenticated.

The listener is exposed to whoever reaches its address, so :func:`serve` bounds what an
unauthenticated peer can hold: the whole opening (preamble, TLS, handshake) must finish
within ``handshake_timeout``, and at most ``max_pending`` connections may be in it at
once (:class:`~kemari_suite.protocol.listen.Door`, shared with the witness). Beyond
that a newcomer pushes out the oldest connection that has not even sent its preamble,
or is closed at once when every slot is busy with a handshake. A real primary sends its
preamble as soon as it connects. The names of :mod:`~kemari_suite.protocol.listen` this
module always exported (``parse_listen``, ``PendingGate``...) are still exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

from kemari_suite.errors import ConnectError, ProtocolError
from kemari_suite.protocol import tls, wire
from kemari_suite.protocol.listen import (
    HANDSHAKE_TIMEOUT_S,
    MAX_PENDING,
    Door,
    Pending,
    PendingGate,
    admit_stream,
    parse_listen,
)

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
        ssl_object = writer.get_extra_info("ssl_object")
        #: "TLSv1.3" inside TLS, None on a link in the clear.
        self.tls_version: str | None = ssl_object.version() if ssl_object is not None else None
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

    def send_nowait(self, msg: wire.Message) -> int:
        """Queue one message at once, in order with every other send, without waiting
        for the transport to drain (from a callback that cannot await); returns the
        bytes queued. The caller bounds what it queues with :attr:`backlog`.

        Raises:
            ConnectionError: the connection is gone.
            ProtocolError: the session failed or was closed.
        """
        if self.closed or self.writer.is_closing():
            raise ConnectionError(f"link to {self.peer} is closed")
        parts = self.session.encode_parts(msg)
        n = sum(len(p) for p in parts)
        self.writer.writelines(parts)
        self.bytes_sent += n
        return n

    @property
    def backlog(self) -> int:
        """Bytes queued on this link that the kernel has not taken yet."""
        return self.writer.transport.get_write_buffer_size()

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


async def _psk_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: wire.Session,
    peer: str,
) -> Link:
    session.start()
    writer.write(session.data_to_send())
    await writer.drain()
    early: list[wire.Message] = []
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
    if session.peer is not None and session.peer.node_id == session.node_id:
        raise ConnectError(
            peer,
            f"the peer's node id is this host's own, {session.node_id!r}: the tiebreaker "
            "could not tell the two hosts apart (set replication.node_id on each host)",
        )
    link = Link(reader, writer, session, peer)
    link._inbox.extend(early)
    return link


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: wire.Session,
    peer: str,
    timeout: float,
) -> Link:
    """The pre-shared-key handshake alone, on a stream already opened."""
    try:
        return await asyncio.wait_for(_psk_handshake(reader, writer, session, peer), timeout)
    except TimeoutError as err:
        raise ConnectError(peer, f"handshake did not finish in {timeout:.1f} s") from err


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    writer.transport.set_write_buffer_limits(high=32 << 20)


async def _read_preamble(reader: asyncio.StreamReader, peer: str) -> tls.Preamble:
    try:
        raw = await reader.readexactly(tls.PREAMBLE_SIZE)
    except asyncio.IncompleteReadError as err:
        raise ConnectError(peer, "closed the connection before its link preamble") from err
    return tls.Preamble.decode(raw)


async def _open_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, tls_on: bool
) -> bytes:
    """The primary's preamble exchange and TLS; returns the channel binding."""
    writer.write(tls.Preamble(tls=tls_on).encode())
    await writer.drain()
    # The secondary answers only after reading ours, and says nothing more until our
    # ClientHello: the reader holds exactly the preamble when TLS starts.
    theirs = await _read_preamble(reader, address)
    if theirs.tls != tls_on:
        raise ConnectError(address, tls.mismatch_reason(tls_on, theirs.tls, peer_is="secondary"))
    if not tls_on:
        return b""
    try:
        await writer.start_tls(tls.client_context())
    except (ssl.SSLError, OSError) as err:
        raise ConnectError(address, f"TLS handshake failed: {err}") from err
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    if not der:
        raise ConnectError(address, "the secondary presented no TLS certificate")
    return tls.channel_binding(der)


async def connect(
    address: str, *, key: bytes, node_id: str, timeout: float, tls: bool = True
) -> Link:
    """Connect to the secondary at ``host:port`` and authenticate (inside TLS 1.3 when
    ``tls``; the secondary must agree).

    Raises:
        ConnectError: unreachable, refused, a TLS setting that differs from the
            secondary's, or the opening did not finish within ``timeout``.
        AuthError: the peer does not hold the same key, or a relay sits in between.
        ProtocolError: the peer is not a Kemari secondary.
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

    async def opening() -> Link:
        session.bind_channel(await _open_client(reader, writer, address, tls))
        _tune(writer)
        return await _psk_handshake(reader, writer, session, address)

    try:
        return await asyncio.wait_for(opening(), timeout)
    except TimeoutError as err:
        writer.close()
        raise ConnectError(address, f"handshake did not finish in {timeout:.1f} s") from err
    except OSError as err:  # ssl.SSLError and ConnectionError among them
        writer.close()
        raise ConnectError(address, f"connection lost during the handshake: {err}") from err
    except BaseException:
        writer.close()
        raise


class _Listener:
    """The secondary's side of every incoming connection (see :func:`serve`)."""

    def __init__(
        self,
        key: bytes,
        node_id: str,
        on_link: Callable[[Link], Awaitable[None]],
        *,
        tls_on: bool,
        handshake_timeout: float,
        max_pending: int,
        on_reject: Callable[[str, Exception], None] | None,
    ) -> None:
        self.key = key
        self.node_id = node_id
        self.on_link = on_link
        self.tls_on = tls_on
        self.door = Door(
            handshake_timeout=handshake_timeout, max_pending=max_pending, on_reject=on_reject
        )
        self.identity = tls.Identity.generate() if tls_on else None
        self.context = self.identity.server_context() if self.identity is not None else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admitted = self.door.admit(writer)
        if admitted is None:
            return
        peer, pending = admitted
        try:
            link = await asyncio.wait_for(
                self._open(reader, writer, peer, pending), self.door.timeout
            )
        except TimeoutError:
            self._fail(
                writer,
                peer,
                ConnectError(peer, f"handshake did not finish in {self.door.timeout:.1f} s"),
            )
            return
        except (ProtocolError, ConnectError, OSError) as err:  # OSError: ssl.SSLError too
            self._fail(writer, peer, self._why(err, pending, peer))
            return
        except asyncio.CancelledError:
            # The loop is shutting down. Ending quietly: Python 3.11's stream server
            # reports a cancelled handler as an error, and this one was never handed out.
            writer.transport.abort()
            return
        finally:
            pending.done()
        await self.on_link(link)

    @staticmethod
    def _why(err: Exception, pending: Pending, peer: str) -> Exception:
        """What to tell ``on_reject`` about a failed opening."""
        if pending.evicted:
            return pending.why_closed(peer)
        if isinstance(err, OSError):
            return ConnectError(peer, f"TLS or connection failure: {type(err).__name__} {err}")
        return err

    def _fail(self, writer: asyncio.StreamWriter, peer: str, err: Exception) -> None:
        writer.close()
        self.door.reject(peer, err)

    async def _open(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        pending: Pending,
    ) -> Link:
        theirs = await _read_preamble(reader, peer)
        pending.progressed()
        # Ours only now: the primary starts TLS once it has it (see _open_client).
        writer.write(tls.Preamble(tls=self.tls_on).encode())
        await writer.drain()
        if theirs.tls != self.tls_on:
            raise ConnectError(
                peer, tls.mismatch_reason(self.tls_on, theirs.tls, peer_is="primary")
            )
        session = wire.Session(
            self.key,
            role=wire.Role.SECONDARY,
            node_id=self.node_id,
            initiator=False,
            accept_roles={wire.Role.PRIMARY},
        )
        if self.context is not None and self.identity is not None:
            await writer.start_tls(self.context)
            session.bind_channel(self.identity.binding)
        _tune(writer)
        return await _psk_handshake(reader, writer, session, peer)


async def serve(
    host: str,
    port: int,
    *,
    key: bytes,
    node_id: str,
    on_link: Callable[[Link], Awaitable[None]],
    tls: bool = True,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    max_pending: int = MAX_PENDING,
    on_reject: Callable[[str, Exception], None] | None = None,
) -> asyncio.Server:
    """Listen for primaries; hand each authenticated connection to ``on_link``.

    With ``tls``, a fresh certificate is made for this listener (see :mod:`tls`).
    ``on_reject(peer, error)`` hears every connection refused before a Link: a wrong
    key or a relay (``AuthError``), a TLS mismatch, garbage, a timeout, the bound.

    Raises:
        OSError: the address cannot be bound.
    """
    listener = _Listener(
        key,
        node_id,
        on_link,
        tls_on=tls,
        handshake_timeout=handshake_timeout,
        max_pending=max_pending,
        on_reject=on_reject,
    )
    return await asyncio.start_server(
        listener.handle, host, port, limit=READ_CHUNK * 4, reuse_address=True
    )


__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_PENDING",
    "Link",
    "Pending",
    "PendingGate",
    "admit_stream",
    "connect",
    "parse_listen",
    "serve",
]
