"""The primary's session with one secondary: frames in, heartbeats out, loss detected.

Incoming frames are dispatched through a table from message type to handler; nothing
is compared by name. A session is lost once (sticky): a refused epoch, a request for
a full resync, a goodbye, a failed link or a silent peer. Losing it wakes whatever
waits on :attr:`PeerSession.lost`.

Acknowledgements are tracked by :class:`AckTracker`: a future per epoch, resolved by
the first ack at or above it, failed with :class:`ReplicationError` on loss, so no
waiter is ever left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from kemari_suite.errors import ConnectError, ProtocolError, ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link

Handler = Callable[[Any], None]


class AckTracker:
    """Futures resolved when their epoch (or a later one) is acknowledged."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}

    def future(self, epoch: int) -> asyncio.Future[int]:
        fut = self._waiters.get(epoch)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[epoch] = fut
        return fut

    def acked(self, epoch: int) -> None:
        for e in sorted(self._waiters):
            if e <= epoch:
                fut = self._waiters.pop(e)
                if not fut.done():
                    fut.set_result(epoch)

    def fail(self, reason: str) -> None:
        for e, fut in self._waiters.items():
            if not fut.done():
                fut.set_exception(ReplicationError(reason, e))
        self._waiters.clear()


class PeerSession:
    """Reads frames from the secondary into handlers and sends heartbeats."""

    def __init__(
        self,
        link: Link,
        handlers: Mapping[type[wire.Message], Handler],
        *,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        role_state: Callable[[], str],
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.link = link
        self.handlers = handlers
        self.interval = heartbeat_interval_s
        self.timeout = heartbeat_timeout_s
        self.role_state = role_state
        self.on_lost = on_lost
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.last_rx = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receiver()),
            asyncio.create_task(self._heartbeats()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    def lose(self, reason: str) -> None:
        """Mark the session lost (the first reason sticks)."""
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(reason)

    def silent_for(self) -> float:
        return time.monotonic() - self.last_rx

    async def _receiver(self) -> None:
        try:
            while True:
                msg = await self.link.recv()
                self.last_rx = time.monotonic()
                handler = self.handlers.get(type(msg))
                if handler is not None:
                    handler(msg)
                elif isinstance(msg, wire.Nack):
                    self.lose(f"secondary refused epoch {msg.epoch}: {msg.reason}")
                elif isinstance(msg, wire.Resync):
                    self.lose(f"secondary asks for a full resync: {msg.reason}")
                elif isinstance(msg, wire.Bye):
                    self.lose(f"secondary left: {msg.reason}")
                if self.lost.is_set():
                    return
        except (ProtocolError, ConnectError, ConnectionError, asyncio.IncompleteReadError) as err:
            self.lose(f"link failed: {err}")

    async def _heartbeats(self) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self.interval)
            seq += 1
            try:
                await self.link.send(
                    wire.Heartbeat(seq=seq, sent_ns=time.time_ns(), role_state=self.role_state())
                )
            except (ConnectionError, OSError) as err:
                self.lose(f"heartbeat send failed: {err}")
                return
            if self.silent_for() > self.timeout:
                self.lose(f"no frame from the secondary for {self.timeout:.1f} s")
                return

    async def wait_ack(self, fut: asyncio.Future[int], epoch: int) -> None:
        """Wait for ``fut`` (an epoch's ack) for at most the heartbeat timeout.

        Raises:
            ReplicationError: the session was lost or no acknowledgement came in time.
        """
        lost: asyncio.Future[bool] = asyncio.ensure_future(self.lost.wait())
        try:
            waitables: set[asyncio.Future[Any]] = {fut, lost}
            done, _ = await asyncio.wait(
                waitables, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if fut in done:
            fut.result()
            return
        raise ReplicationError(self.lost_reason or "no acknowledgement in time", epoch)


__all__ = ["AckTracker", "PeerSession"]
