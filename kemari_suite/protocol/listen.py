"""What every listener of the suite does before it trusts a connection: the replication
link's secondary (:mod:`kemari_suite.protocol.link`) and the witness
(:mod:`kemari_suite.ha.witness`) both stand behind one :class:`Door`.

A listener is exposed to whoever reaches its address, so:

- it binds an explicit address (:func:`parse_listen`): never an implied wildcard, and an
  explicit ``0.0.0.0`` or ``[::]`` only with a warning;
- a connection must authenticate within ``handshake_timeout`` of its opening (each
  listener enforces the deadline on its own opening; the door carries the value);
- at most ``max_pending`` connections may be unauthenticated at once
  (:class:`PendingGate`): beyond that a newcomer pushes out the oldest connection that
  has not even sent its opening, or is closed at once when every slot is busy with a
  handshake;
- every connection closed for these reasons is told to ``on_reject(peer, error)``.

No I/O here beyond aborting a transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kemari_suite.errors import ConfigError, ConnectError

log = logging.getLogger(__name__)

#: The whole opening of an incoming connection (preamble, TLS, PSK handshake; or the
#: witness's challenge and first request), seconds: a few round trips and two
#: signatures, with room for two busy cores.
HANDSHAKE_TIMEOUT_S = 5.0
#: Unauthenticated connections a listener holds at once.
MAX_PENDING = 8
#: Addresses meaning every interface: allowed when given explicitly, with a warning.
_WILDCARDS = ("0.0.0.0", "::")

#: Hears every connection a listener closed before it authenticated: (peer, why).
RejectFn = Callable[[str, Exception], None]


def parse_listen(
    value: str, *, key: str = "replication.listen", example: str = "10.0.0.2:7410"
) -> tuple[str, int]:
    """A listener's address (``key`` in the config) as (host, port): an explicit address,
    never implied. ``0.0.0.0`` or ``[::]`` is taken when written out, with a warning.

    Raises:
        ConfigError: (naming ``key``) empty, no host, or no valid port.
    """
    hint = f"give this host's own address on that network, e.g. {example}"
    if not value:
        raise ConfigError(f"not set: {hint}", key=key)
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ConfigError(f"{value!r} names no host: {hint}", key=key)
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{value!r} has no valid port: {hint}", key=key)
    if host in _WILDCARDS:
        log.warning(
            "%s = %s: the listener takes connections on every address of this host; %s",
            key,
            value,
            hint,
        )
    return host, int(port)


class PendingGate:
    """The unauthenticated connections a listener holds, and which one to drop. No I/O.

    A connection is *idle* from :meth:`admit` until :meth:`progressed` (it sent a valid
    opening), then in its handshake until :meth:`done`. With ``limit`` connections
    held, :meth:`admit` closes the oldest idle one to make room, or refuses the newcomer
    (returns None) when all are in their handshake.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the bound on unauthenticated connections must be at least 1")
        self.limit = limit
        self._idle: dict[int, Callable[[], None]] = {}  # insertion order: oldest first
        self._busy: set[int] = set()
        self._next = 0

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def admit(self, close: Callable[[], None]) -> int | None:
        """A token for a new connection (``close`` drops it if it must make room), or
        None: refuse it."""
        if len(self) >= self.limit:
            if not self._idle:
                return None
            oldest = next(iter(self._idle))
            self._idle.pop(oldest)()
        token = self._next
        self._next += 1
        self._idle[token] = close
        return token

    def progressed(self, token: int) -> None:
        if self._idle.pop(token, None) is not None:
            self._busy.add(token)

    def done(self, token: int) -> None:
        self._idle.pop(token, None)
        self._busy.discard(token)


@dataclass
class Pending:
    """One connection admitted by :func:`admit_stream`, until it authenticates."""

    gate: PendingGate
    token: int = -1
    #: The gate closed it to make room for a newer connection.
    evicted: bool = False

    def progressed(self) -> None:
        """It sent a valid opening: no longer the first to be dropped."""
        self.gate.progressed(self.token)

    def done(self) -> None:
        """Authenticated, or closed: its slot is free."""
        self.gate.done(self.token)

    def why_closed(self, peer: str) -> ConnectError:
        return ConnectError(
            peer, f"closed: idle while {self.gate.limit} unauthenticated connections were open"
        )


def admit_stream(gate: PendingGate, writer: asyncio.StreamWriter, peer: str) -> Pending:
    """Admit a new incoming connection to ``gate``. Making room aborts the oldest idle
    connection (its :class:`Pending` says ``evicted``).

    Raises:
        ConnectError: refused (every slot is in its handshake); the connection is
            aborted already.
    """
    pending = Pending(gate)

    def evict() -> None:
        pending.evicted = True
        writer.transport.abort()

    token = gate.admit(evict)
    if token is None:
        writer.transport.abort()
        raise ConnectError(
            peer,
            f"closed at once: {gate.limit} unauthenticated connections are in their handshake",
        )
    pending.token = token
    return pending


def peer_name(writer: asyncio.StreamWriter) -> str:
    """``host:port`` of the other end of ``writer`` ("?" when unknown)."""
    addr = writer.get_extra_info("peername")
    return f"{addr[0]}:{addr[1]}" if addr else "?"


class Door:
    """The front of a listener: the handshake deadline, the bound on unauthenticated
    connections, and whom to tell about a refusal (see the module docstring).

    Raises:
        ValueError: ``max_pending`` below 1.
    """

    def __init__(
        self, *, handshake_timeout: float, max_pending: int, on_reject: RejectFn | None
    ) -> None:
        self.timeout = handshake_timeout
        self.gate = PendingGate(max_pending)
        self.on_reject = on_reject

    def reject(self, peer: str, err: Exception) -> None:
        """Tell ``on_reject`` (if any) that ``peer``'s connection was closed, and why."""
        if self.on_reject is not None:
            self.on_reject(peer, err)

    def admit(self, writer: asyncio.StreamWriter) -> tuple[str, Pending] | None:
        """A new connection: its peer name and its slot, or None when it was refused
        (aborted, and reported)."""
        peer = peer_name(writer)
        try:
            return peer, admit_stream(self.gate, writer, peer)
        except ConnectError as err:
            self.reject(peer, err)
            return None


__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_PENDING",
    "Door",
    "Pending",
    "PendingGate",
    "RejectFn",
    "admit_stream",
    "parse_listen",
    "peer_name",
]
