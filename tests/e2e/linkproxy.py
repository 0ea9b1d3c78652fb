"""A TCP relay between primary and secondary that can cut the link and tamper with frames.

Test code only. The relay sees frames, so the pair must run with ``replication.tls =
"off"`` (``PairOptions(tls="off")``): inside TLS it would see ciphertext, and a relay
that terminates TLS is refused by the handshake's channel binding anyway. Frames are
still MACed with the session keys the relay does not have; it can read their headers
and payloads (they are not encrypted) but not forge a valid one, which is the point.

::

    primary ──► [relay: listens in the primary's namespace] ──► secondary's listener
               │ per connection, per direction: the 8-byte link preamble, then whole
               │ frames (24-byte header, payload, 32-byte MAC) read one at a time

What it does on demand (:meth:`LinkProxy.tamper`, once, to the next frame of a chosen
type going one way):

- ``forged``: a well-formed frame with the expected sequence number and a MAC under a
  key of its own, put in front of the real frame;
- ``corrupted``: one byte of the real frame's payload or MAC flipped;
- ``replayed``: the frame forwarded last in that direction, sent again in front;
- ``reordered``: the real frame held back and sent after the one that follows it.

:meth:`LinkProxy.partition` stalls both directions (nothing read, nothing written, new
connections held before they reach the secondary), like a cut cable whose TCP
connections have not timed out yet; :meth:`LinkProxy.heal` lets everything flow again
(with ``reset``, every connection of before is closed instead, as after a long cut).
:meth:`LinkProxy.hold_new` holds only new connections (a test reads the secondary's
state between a tamper and the primary's reconnection).

It also keeps what a test checks a tamper against: the highest epoch the secondary
acknowledged (:attr:`LinkProxy.max_ack`), per connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from kemari_suite.lab.netclient import enter_netns
from kemari_suite.protocol import tls, wire
from kemari_suite.protocol.fields import encode_payload

Direction = Literal["p2s", "s2p"]
Kind = Literal["forged", "corrupted", "replayed", "reordered"]
KINDS: tuple[Kind, ...] = ("forged", "corrupted", "replayed", "reordered")
#: What the receiver says about each tamper (a substring of its rejection).
REJECTION: dict[Kind, str] = {
    "forged": "MAC mismatch",
    "corrupted": "MAC mismatch",
    "replayed": "sequence number",
    "reordered": "sequence number",
}

_HEAD = struct.Struct("!4sBBHIQ")
_CRC = struct.Struct("!I")
_U64 = struct.Struct("!Q")
#: Messages whose payload starts with the epoch they belong to.
EPOCH_TYPES = frozenset(
    m.TYPE for m in (wire.EpochBegin, wire.Pages, wire.DeviceState, wire.IOLog, wire.EpochEnd)
)


def type_name(frame_type: int) -> str:
    cls = wire.MESSAGE_TYPES.get(frame_type)
    return cls.__name__ if cls is not None else f"{frame_type:#04x}"


@dataclass(frozen=True)
class Frame:
    """One whole frame as it crossed the relay."""

    raw: bytes

    @property
    def type(self) -> int:
        return self.raw[5]

    @property
    def seq(self) -> int:
        return int(_HEAD.unpack_from(self.raw)[5])

    @property
    def payload(self) -> bytes:
        return self.raw[wire.HEADER_SIZE : -wire.MAC_SIZE]

    @property
    def epoch(self) -> int | None:
        """The epoch an epoch message belongs to (an Ack's epoch too)."""
        if self.type in EPOCH_TYPES or self.type == wire.Ack.TYPE:
            return int(_U64.unpack_from(self.raw, wire.HEADER_SIZE)[0])
        return None


def forged_frame(seq: int) -> bytes:
    """A Heartbeat that is well formed in every respect (magic, version, header
    checksum, layout, the expected sequence number) but MACed with a key of our own."""
    payload, _ = encode_payload(wire.Heartbeat(seq=seq, sent_ns=time.time_ns(), role_state="x"))
    head = _HEAD.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.Heartbeat.TYPE, 0, len(payload), seq)
    header = head + _CRC.pack(zlib.crc32(head))
    mac = hmac.new(os.urandom(32), header + payload, hashlib.sha256).digest()
    return header + payload + mac


@dataclass
class Tamper:
    """One armed tamper, and what became of it."""

    kind: Kind
    direction: Direction
    #: Frame types it may hit (empty: any after the handshake).
    types: frozenset[int]
    applied: threading.Event = field(default_factory=threading.Event)
    #: The connection it hit, the frame it hit (type name, sequence, epoch).
    connection: int = -1
    target: str = ""
    seq: int = -1
    epoch: int | None = None
    at: float = 0.0


class _Conn:
    """One primary connection through the relay."""

    def __init__(self, index: int, down: socket.socket) -> None:
        self.index = index
        self.down = down  # to the primary
        self.up: socket.socket | None = None  # to the secondary
        self.closed = threading.Event()
        self.ended = {"p2s": threading.Event(), "s2p": threading.Event()}
        self.frames = {"p2s": 0, "s2p": 0}
        self.max_ack = -1

    def close(self) -> None:
        for s in (self.down, self.up):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self.closed.set()


class LinkProxy:
    """Relay ``listen`` (in namespace ``ns``) to ``upstream`` (reached from ``ns``)."""

    def __init__(self, ns: str, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.ns = ns
        self.listen = listen
        self.upstream = upstream
        self.conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._admit = threading.Event()
        self._admit.set()
        self._tampers: list[Tamper] = []
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        #: The highest epoch the secondary acknowledged, over every connection.
        self.max_ack = -1
        self.errors: list[str] = []

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> LinkProxy:
        self._server = self._in_ns(self._bind)
        self._spawn(self._accept_loop, "linkproxy-accept")
        return self

    def close(self) -> None:
        self._stop.set()
        self._flowing.set()
        self._admit.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
        for c in list(self.conns):
            c.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what tests ask --------------------------------------------------------------

    @property
    def current(self) -> _Conn | None:
        """The newest connection that is still open."""
        with self._lock:
            live = [c for c in self.conns if not c.closed.is_set() and c.up is not None]
        return live[-1] if live else None

    def wait_connection(self, after: int, timeout: float) -> _Conn:
        """The first connection with an index above ``after`` that carried frames both
        ways (its handshake went through).

        Raises:
            TimeoutError: none in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for c in self.conns:
                    if c.index > after and c.frames["p2s"] >= 2 and c.frames["s2p"] >= 2:
                        return c
            time.sleep(0.02)
        raise TimeoutError(f"no new replication connection through the relay in {timeout} s")

    def tamper(self, kind: Kind, direction: Direction, types: tuple[int, ...] = ()) -> Tamper:
        """Arm one tamper; it hits the next frame of one of ``types`` going ``direction``
        on a connection past its handshake."""
        t = Tamper(kind, direction, frozenset(types))
        with self._lock:
            self._tampers.append(t)
        return t

    def disarm(self) -> None:
        with self._lock:
            self._tampers.clear()

    def partition(self) -> None:
        """Stall both directions of every connection, and hold new ones."""
        self._flowing.clear()
        self._admit.clear()

    def heal(self, *, reset: bool = False) -> None:
        """Let frames flow again; with ``reset``, close every connection of before."""
        if reset:
            for c in list(self.conns):
                c.close()
        self._flowing.set()
        self._admit.set()

    def hold_new(self, hold: bool = True) -> None:
        """Hold (or release) new connections before they reach the secondary."""
        if hold:
            self._admit.clear()
        else:
            self._admit.set()

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    # ---- the relay ---------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _in_ns(self, fn: Callable[[], socket.socket]) -> socket.socket:
        """Run ``fn`` on a thread inside the namespace: its socket stays there."""
        result: dict[str, object] = {}

        def work() -> None:
            try:
                enter_netns(self.ns)
                result["sock"] = fn()
            except Exception as err:  # reported below
                result["error"] = err

        t = threading.Thread(target=work, name="linkproxy-netns", daemon=True)
        t.start()
        t.join(10)
        sock = result.get("sock")
        if not isinstance(sock, socket.socket):
            raise OSError(f"relay in {self.ns}: {result.get('error', 'timeout')}")
        return sock

    def _bind(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(self.listen)
        s.listen(8)
        s.settimeout(0.2)
        return s

    def _connect_up(self) -> socket.socket:
        s = socket.create_connection(self.upstream, timeout=5)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                down, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            down.settimeout(None)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = _Conn(len(self.conns), down)
                self.conns.append(conn)
            self._spawn(self._open, f"linkproxy-{conn.index}", conn)

    def _open(self, conn: _Conn) -> None:
        # A held connection waits here, before the secondary hears of it.
        while not self._admit.wait(0.05):
            if self._stop.is_set():
                conn.close()
                return
        try:
            conn.up = self._in_ns(self._connect_up)
        except OSError as err:
            self.errors.append(f"connection {conn.index}: {err}")
            conn.close()
            return
        self._spawn(self._pump, f"linkproxy-{conn.index}-p2s", conn, "p2s")
        self._spawn(self._pump, f"linkproxy-{conn.index}-s2p", conn, "s2p")

    def _pump(self, conn: _Conn, direction: Direction) -> None:
        assert conn.up is not None
        src, dst = (conn.down, conn.up) if direction == "p2s" else (conn.up, conn.down)
        last: bytes | None = None
        try:
            preamble = _read_exact(src, tls.PREAMBLE_SIZE)
            if preamble is None:
                return
            self._send(conn, dst, preamble)
            while not conn.closed.is_set():
                raw = self._read_frame(conn, direction, src)
                if raw is None:
                    return
                frame = Frame(raw)
                tamper = self._take(conn, direction, frame)
                if tamper is None:
                    self._send(conn, dst, raw)
                    last = raw
                    continue
                self._apply(conn, dst, src, tamper, frame, last)
                last = raw
        except OSError:
            return
        finally:
            conn.ended[direction].set()
            # Half-close: the other way still delivers what is in flight (the last
            # acknowledgements the secondary sent before it saw the end).
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            if conn.ended["p2s"].is_set() and conn.ended["s2p"].is_set():
                conn.close()

    def _take(self, conn: _Conn, direction: Direction, frame: Frame) -> Tamper | None:
        if frame.seq < 2:
            return None  # the handshake: tampering there is the handshake tests' job
        with self._lock:
            for t in self._tampers:
                if t.direction == direction and (not t.types or frame.type in t.types):
                    self._tampers.remove(t)
                    return t
        return None

    def _apply(
        self,
        conn: _Conn,
        dst: socket.socket,
        src: socket.socket,
        t: Tamper,
        frame: Frame,
        last: bytes | None,
    ) -> None:
        t.connection, t.target, t.seq = conn.index, type_name(frame.type), frame.seq
        t.epoch = frame.epoch
        t.at = time.monotonic()
        # What goes out first is the bad frame; the real one may follow it (and may find
        # the connection already closed by the receiver: the pump then ends).
        follow: bytes | None = frame.raw
        if t.kind == "forged":
            bad = forged_frame(frame.seq)
        elif t.kind == "corrupted":
            raw = bytearray(frame.raw)
            pos = random.randrange(wire.HEADER_SIZE, len(raw))
            raw[pos] ^= 1 << random.randrange(8)
            t.target += f" (byte {pos} of {len(raw)})"
            bad, follow = bytes(raw), None
        elif t.kind == "replayed":
            bad = last if last is not None else frame.raw
        else:  # reordered: the frame after it goes first
            after = self._read_frame(conn, t.direction, src)
            if after is None:
                return
            bad = after
        self._send(conn, dst, bad)
        t.applied.set()
        if follow is not None:
            self._send(conn, dst, follow)

    def _read_frame(self, conn: _Conn, direction: Direction, src: socket.socket) -> bytes | None:
        """The next whole frame from ``src`` (None at its end), counted, and an
        acknowledgement's epoch noted."""
        header = _read_exact(src, wire.HEADER_SIZE)
        if header is None:
            return None
        length = int(_HEAD.unpack_from(header)[4])
        rest = _read_exact(src, length + wire.MAC_SIZE)
        if rest is None:
            return None
        frame = Frame(header + rest)
        conn.frames[direction] += 1
        if direction == "s2p" and frame.type == wire.Ack.TYPE:
            epoch = frame.epoch
            assert epoch is not None
            conn.max_ack = max(conn.max_ack, epoch)
            with self._lock:
                self.max_ack = max(self.max_ack, epoch)
        return frame.raw

    def _send(self, conn: _Conn, dst: socket.socket, data: bytes) -> None:
        # A partition stalls the relay here: nothing written, and (since this thread
        # reads nothing more) nothing read.
        while not self._flowing.wait(0.05):
            if conn.closed.is_set() or self._stop.is_set():
                raise OSError("closed while partitioned")
        dst.sendall(data)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at the end of the stream (or a reset)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


__all__ = ["KINDS", "REJECTION", "Frame", "LinkProxy", "Tamper", "forged_frame"]
