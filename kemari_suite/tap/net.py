"""The network tap: a frame proxy between the guest NIC and a TAP device, with output
commit.

::

    QEMU virtio-net                     FrameProxy                           LAN
    -netdev stream,server=off,   --->   guest frame: tagged with the   -->   TAP device
      addr.type=unix,                   open epoch and held; sent on         (IFF_TAP |
      addr.path=<guest_socket>          release(e) for every epoch <= e      IFF_NO_PI)
                                 <---   TAP frame: straight to the guest <--

QEMU 7.2's ``-netdev stream`` client (verified here) connects to the proxy's unix socket
and carries each Ethernet frame as a 4-byte big-endian length and the frame, both ways
(QEMU does not pad short frames). It connects once, at startup and without retrying:
the proxy must be listening before QEMU starts, or the NIC stays unplugged.

The proxy reads from QEMU as soon as bytes arrive (an asyncio protocol whose reading is
never paused), also while the VM is stopped: QEMU must never see backpressure that could
complete a transmission inside the stopped window. When the hold buffer is full
(``hold_limit_bytes``/``hold_limit_frames``), a guest frame is dropped and counted
(``dropped_frames``, ``overflows``) rather than reading slower; a network may lose a
frame, never show one early. Frames from the TAP go to the guest at once; when no guest
is connected or QEMU has not drained ``guest_buffer_limit`` bytes, they are dropped and
counted.

Inbound copies and replay. While PROTECTED, the frames delivered to the guest in one
wakeup are also handed to ``forward`` (an :data:`~kemari_suite.tap.events.InboundSink`)
with the open epoch: the primary sends them to the standby. On the standby, after a
failover's ``cont``, :meth:`FrameProxy.inject` writes the frames it kept into the
resumed guest (``replayed_frames``); see docs/sync-policy.md for why that is safe.

One class serves every role: the primary (PROTECTED, released per epoch), a primary
without secondary or the secondary after failover (UNPROTECTED: pass-through), and a
new primary protecting towards a new secondary (``set_protected()``). A newer QEMU
connection replaces the older one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.errors import ProtocolError, TapError
from kemari_suite.tap.events import EventSink, InboundSink, IOEvent, OpenEpoch, TapMode
from kemari_suite.tap.tun import TapDevice

log = logging.getLogger(__name__)

#: QEMU's NET_BUFSIZE (4096 + 65536): no frame on the stream is longer.
MAX_FRAME = 4096 + 65536
LENGTH = struct.Struct("!I")
#: TAP frames read per wakeup before yielding to the rest of the loop.
TAP_BURST = 64


def encode_frame(frame: bytes) -> bytes:
    """One frame as QEMU's stream netdev carries it: ``!I`` length, then the frame."""
    return LENGTH.pack(len(frame)) + frame


class FrameDecoder:
    """Incremental decoder of the stream netdev's length-prefixed frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the frames they complete (possibly none).

        Raises:
            ProtocolError: a length prefix of 0 or above ``max_frame`` (the stream is
                out of step and cannot be trusted from there on).
        """
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= LENGTH.size:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n == 0 or n > self.max_frame:
                raise ProtocolError(f"net stream: frame length {n} (1..{self.max_frame})")
            if len(buf) - pos - LENGTH.size < n:
                break
            start = pos + LENGTH.size
            out.append(bytes(buf[start : start + n]))
            pos = start + n
        if pos:
            del buf[:pos]
        return out


class ProxyState(enum.Enum):
    NEW = "new"
    WAITING = "waiting"  # listening, no QEMU connected
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass
class ProxyStats:
    """Counters; ``held_*`` are current values, the rest only grow."""

    from_guest_frames: int = 0
    from_guest_bytes: int = 0
    held_frames: int = 0
    held_bytes: int = 0
    max_held_bytes: int = 0
    released_frames: int = 0
    released_bytes: int = 0
    passed_frames: int = 0  # sent to the TAP unheld (UNPROTECTED)
    passed_bytes: int = 0
    dropped_frames: int = 0  # hold buffer full
    dropped_bytes: int = 0
    overflows: int = 0  # times the hold buffer ran full (one per full spell)
    tap_write_errors: int = 0
    to_guest_frames: int = 0
    to_guest_bytes: int = 0
    to_guest_dropped: int = 0
    forwarded_frames: int = 0  # copies handed to ``forward`` (PROTECTED)
    forwarded_bytes: int = 0
    replayed_frames: int = 0  # kept frames injected after a failover
    replayed_bytes: int = 0
    replay_dropped: int = 0  # kept frames that found no guest (or a full buffer)
    guest_connections: int = 0
    protocol_errors: int = 0


@dataclass(frozen=True, slots=True)
class HeldFrame:
    epoch: int
    frame: bytes
    t_held: float


class _GuestProtocol(asyncio.Protocol):
    """One QEMU connection: decode frames as they arrive and hand them to the proxy."""

    def __init__(self, proxy: FrameProxy) -> None:
        self.proxy = proxy
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy._guest_connected(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as err:
            self.proxy._guest_protocol_error(self, err)
            return
        for frame in frames:
            self.proxy._from_guest(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._guest_lost(self, exc)


class FrameProxy:
    """Output commit for one guest NIC; see the module docstring.

    Args:
        guest_socket: unix socket path QEMU's ``-netdev stream`` connects to.
        tap: an attached TAP device (:func:`kemari_suite.tap.tun.open_tap`); the proxy
            owns it from now on and closes it in :meth:`close`.
        mode: PROTECTED holds guest frames per epoch; UNPROTECTED passes them through.
        epoch: the primary's open epoch, switched by :meth:`switch_epoch`.
        on_event: told ``(IOEvent.NET, epoch)`` for each guest frame in PROTECTED mode.
        forward: told ``(epoch, frames)`` for the frames delivered to the guest in each
            wakeup, in PROTECTED mode (:attr:`forward`, set again on every protection).
    """

    def __init__(
        self,
        guest_socket: Path | str,
        tap: TapDevice,
        *,
        mode: TapMode,
        epoch: int = 0,
        on_event: EventSink | None = None,
        forward: InboundSink | None = None,
        hold_limit_bytes: int = 16 << 20,
        hold_limit_frames: int = 16384,
        guest_buffer_limit: int = 4 << 20,
        name: str = "net",
    ) -> None:
        self.guest_socket = Path(guest_socket)
        self.tap = tap
        #: The open epoch, pushed by :meth:`switch_epoch`.
        self.open_epoch = OpenEpoch(name, epoch)
        self.mode = mode
        self.on_event = on_event
        self.forward = forward
        self.hold_limit_bytes = hold_limit_bytes
        self.hold_limit_frames = hold_limit_frames
        self.guest_buffer_limit = guest_buffer_limit
        self.name = name
        self.state = ProxyState.NEW
        self.stats = ProxyStats()
        #: True while the hold buffer is full (guest frames are being dropped).
        self.overflowing = False
        self.released_through = -1
        self._held: collections.deque[HeldFrame] = collections.deque()
        self._guest: _GuestProtocol | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the open epoch ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The open epoch: guest frames are held in it (PROTECTED)."""
        return self.open_epoch.value

    def switch_epoch(self, epoch: int) -> None:
        """The primary's open epoch is now ``epoch`` (inside the stopped window).

        Raises:
            TapError: ``epoch`` is older than the open epoch.
        """
        self.open_epoch.switch(epoch)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for QEMU and start reading the TAP. Raises TapError on failure."""
        if self.state is not ProxyState.NEW:
            raise TapError(self.name, f"cannot start from state {self.state.value}")
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            if self.guest_socket.is_socket():
                self.guest_socket.unlink()
        try:
            self._server = await self._loop.create_unix_server(
                lambda: _GuestProtocol(self), path=str(self.guest_socket)
            )
        except OSError as err:
            raise TapError(self.name, f"cannot listen on {self.guest_socket}: {err}") from err
        self._loop.add_reader(self.tap.fd, self._on_tap_readable)
        self.state = ProxyState.WAITING

    async def close(self) -> None:
        """Stop: drop the QEMU connection, stop reading the TAP, close it. Held frames
        are discarded (they belong to epochs that never committed)."""
        if self.state is ProxyState.CLOSED:
            return
        prev = self.state
        self.state = ProxyState.CLOSED
        if self._loop is not None and prev is not ProxyState.NEW:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.tap.fd)
        if self._guest is not None and self._guest.transport is not None:
            self._guest.transport.abort()
        self._guest = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.guest_socket.unlink()
        self.tap.close()
        self._held.clear()
        self.stats.held_frames = self.stats.held_bytes = 0

    # ---- output commit -----------------------------------------------------------------

    def release(self, epoch: int) -> int:
        """Send every held frame of epochs ``<= epoch`` to the TAP, in order.

        Call it once ``epoch`` is acknowledged and its block writes satisfy the output
        rule (``BlockTap.output_ready``). Returns the number of frames sent.
        """
        if epoch > self.released_through:
            self.released_through = epoch
        n = 0
        held = self._held
        while held and held[0].epoch <= epoch:
            hf = held.popleft()
            self.stats.held_frames -= 1
            self.stats.held_bytes -= len(hf.frame)
            if self._to_tap(hf.frame):
                self.stats.released_frames += 1
                self.stats.released_bytes += len(hf.frame)
            n += 1
        if self.overflowing and self._has_room(0):
            self.overflowing = False
        return n

    def held_epochs(self) -> list[int]:
        """Epochs with frames held, oldest first."""
        out: list[int] = []
        for hf in self._held:
            if not out or out[-1] != hf.epoch:
                out.append(hf.epoch)
        return out

    def oldest_held_age(self) -> float | None:
        """Seconds the oldest held frame has waited, or None."""
        return time.monotonic() - self._held[0].t_held if self._held else None

    def set_unprotected(self) -> int:
        """No secondary: release every held frame and pass frames through from now on.
        Returns the number of frames released."""
        n = 0
        if self._held:
            n = self.release(self._held[-1].epoch)
        self.mode = TapMode.UNPROTECTED
        return n

    def set_protected(self) -> None:
        """Hold guest frames per epoch again (a new secondary protects this VM)."""
        self.mode = TapMode.PROTECTED

    # ---- guest side --------------------------------------------------------------------

    def _guest_connected(self, proto: _GuestProtocol) -> None:
        if self.state is ProxyState.CLOSED:
            if proto.transport is not None:
                proto.transport.abort()
            return
        old = self._guest
        self._guest = proto
        self.stats.guest_connections += 1
        self.state = ProxyState.CONNECTED
        if old is not None and old.transport is not None:
            log.info("%s: a new QEMU connection replaces the previous one", self.name)
            old.transport.abort()

    def _guest_lost(self, proto: _GuestProtocol, exc: Exception | None) -> None:
        if self._guest is proto:
            self._guest = None
            if self.state is ProxyState.CONNECTED:
                self.state = ProxyState.WAITING
            log.info("%s: QEMU disconnected%s", self.name, f": {exc}" if exc else "")

    def _guest_protocol_error(self, proto: _GuestProtocol, err: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        log.error("%s: closing the QEMU connection: %s", self.name, err)
        if proto.transport is not None:
            proto.transport.abort()

    def _has_room(self, n: int) -> bool:
        return (
            self.stats.held_bytes + n <= self.hold_limit_bytes
            and self.stats.held_frames + 1 <= self.hold_limit_frames
        )

    def _from_guest(self, frame: bytes) -> None:
        self.stats.from_guest_frames += 1
        self.stats.from_guest_bytes += len(frame)
        if self.mode is TapMode.UNPROTECTED:
            if self._to_tap(frame):
                self.stats.passed_frames += 1
                self.stats.passed_bytes += len(frame)
            return
        epoch = self.open_epoch.value
        if not self._has_room(len(frame)):
            if not self.overflowing:
                self.overflowing = True
                self.stats.overflows += 1
                log.error(
                    "%s: hold buffer full (%d frames, %d bytes): dropping guest frames",
                    self.name,
                    self.stats.held_frames,
                    self.stats.held_bytes,
                )
            self.stats.dropped_frames += 1
            self.stats.dropped_bytes += len(frame)
        else:
            self._held.append(HeldFrame(epoch, frame, time.monotonic()))
            self.stats.held_frames += 1
            self.stats.held_bytes += len(frame)
            self.stats.max_held_bytes = max(self.stats.max_held_bytes, self.stats.held_bytes)
        if self.on_event is not None:
            try:
                self.on_event(IOEvent.NET, epoch)
            except Exception:
                log.exception("%s: on_event failed", self.name)

    def _to_tap(self, frame: bytes) -> bool:
        try:
            os.write(self.tap.fd, frame)
        except OSError as err:
            # A TAP write does not block in practice; a full queue or a downed device
            # loses the frame, as a wire would.
            self.stats.tap_write_errors += 1
            log.debug("%s: TAP write failed: %s", self.name, err)
            return False
        return True

    # ---- TAP side ----------------------------------------------------------------------

    def _on_tap_readable(self) -> None:
        copies: list[bytes] | None = (
            [] if self.forward is not None and self.mode is TapMode.PROTECTED else None
        )
        for _ in range(TAP_BURST):
            try:
                frame = os.read(self.tap.fd, MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as err:
                log.error("%s: TAP read failed: %s", self.name, err)
                break
            if not frame:
                break
            if self._to_guest(frame) and copies is not None:
                copies.append(frame)
        if copies and self.forward is not None:
            self.stats.forwarded_frames += len(copies)
            self.stats.forwarded_bytes += sum(len(f) for f in copies)
            try:
                self.forward(self.open_epoch.value, copies)
            except Exception:
                log.exception("%s: forwarding inbound frames failed", self.name)

    def _to_guest(self, frame: bytes) -> bool:
        """Write one frame to the guest; False (counted) when none is connected or
        QEMU has not drained ``guest_buffer_limit``."""
        guest = self._guest
        transport = guest.transport if guest is not None else None
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > self.guest_buffer_limit
        ):
            self.stats.to_guest_dropped += 1
            return False
        transport.write(encode_frame(frame))
        self.stats.to_guest_frames += 1
        self.stats.to_guest_bytes += len(frame)
        return True

    def inject(self, frames: list[bytes]) -> int:
        """Write frames kept on the standby into the resumed guest, in order, as if
        they came from the TAP now (a failover, right after ``cont``); returns how many
        reached QEMU. Frames that find no guest or a full buffer are counted
        (``replay_dropped``): each only costs the retransmission it costs without
        replay."""
        n = 0
        for frame in frames:
            if self._to_guest(frame):
                n += 1
                self.stats.replayed_frames += 1
                self.stats.replayed_bytes += len(frame)
            else:
                self.stats.replay_dropped += 1
        return n

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = {
            "state": self.state.value,
            "mode": self.mode.value,
            "tap": self.tap.name,
            "released_through": self.released_through,
            "held_epochs": self.held_epochs(),
            "overflowing": self.overflowing,
            **asdict(self.stats),
        }
        forward_status = getattr(self.forward, "status", None)
        if callable(forward_status):
            out["forward"] = forward_status()
        return out


__all__ = [
    "MAX_FRAME",
    "FrameDecoder",
    "FrameProxy",
    "HeldFrame",
    "ProxyState",
    "ProxyStats",
    "encode_frame",
]
