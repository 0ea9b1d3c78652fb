"""The replication protocol between primary and secondary: frames, handshake, no I/O.

A :class:`Session` is the whole pure protocol state of one connection: the handshake,
the per-direction session keys and sequence numbers. Bytes go in through
:meth:`Session.feed` (or the :class:`Decoder`'s ``get_buffer``/``buffer_updated`` pair,
which fits ``asyncio.BufferedProtocol`` and reads large frames without an extra copy),
frames out of :meth:`Session.encode` / :meth:`Session.encode_parts`. No sockets here.

The protocol in modules, each importable through this one (``wire.Pages``...)::

    fields.py    field codecs and the Message base: how a payload is laid out
    messages.py  every message class, MESSAGE_TYPES, CONTROL_MESSAGES
    digest.py    EpochDigest, the content hash that EpochEnd carries
    wire.py      frames, handshake, Session and Decoder (this module)

Frame (network byte order)::

    offset  size  field
    0       4     magic b"KMRI"
    4       1     protocol version (PROTOCOL_VERSION)
    5       1     message type
    6       2     flags (none defined; must be 0)
    8       4     payload length (at most MAX_PAYLOAD; 1 MiB for non-blob messages)
    12      8     sequence number, per direction, +1 per frame starting at 0
    20      4     crc32 of bytes 0..19: garbage is rejected before any buffering
    24      n     payload (the message's layout, see each message class)
    24+n    32    HMAC-SHA256 over bytes 0..24+n

Handshake. Both ends send :class:`Hello` (sequence 0) with a fresh 32-byte random
nonce; its MAC is keyed with ``HMAC(psk, "kemari-v1 hello")``, so a peer without the
pre-shared key fails on the first frame. Both derive::

    session_key = HMAC(psk, "kemari-v1" + nonce_initiator + nonce_responder)
    key_i2r     = HMAC(session_key, "i2r")     # frames initiator -> responder
    key_r2i     = HMAC(session_key, "r2i")

(on the replication link the primary connects, so nonce_initiator is the primary's)
and each sends :class:`HelloProof` (sequence 1), an HMAC with its sending key over a
hash of both Hello payloads and, when the link runs inside TLS, of the channel binding
(:meth:`Session.bind_channel`: the secondary's certificate, see ``tls.py``)::

    transcript = "kemari-v1 proof" + sha256(len(hello_i) hello_i len(hello_r) hello_r
                                            [ "channel" len(binding) binding ])

Both ends must bind the same bytes: a relay that terminates TLS makes them differ, and
both proofs fail. Every later frame is MACed with the sender's direction key. A recorded
session cannot be replayed: the other end's nonce is fresh, so the keys differ.
Reflection fails: a node rejects its own nonce and the two directions use different
keys. Sequence numbers must increase by exactly one; a gap, a replay or a reorder is an
:class:`AuthError`.

Errors: every decoding problem raises :class:`ProtocolError` (:class:`AuthError` for
MAC, handshake and sequence failures) and nothing else. Errors are sticky: after one,
the session is FAILED and every later call raises; close the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

import numpy as np

from kemari_suite.errors import AuthError, ConfigError, ProtocolError
from kemari_suite.protocol.digest import EpochDigest
from kemari_suite.protocol.fields import (
    MAX_PAYLOAD,
    MAX_SMALL_PAYLOAD,
    Blob,
    Message,
    decode_payload,
    encode_payload,
    message_fields,
)
from kemari_suite.protocol.messages import (
    CONTROL_MESSAGES,
    MESSAGE_TYPES,
    NO_EPOCH,
    Ack,
    Bye,
    CompatStage,
    CompatVerdict,
    DeviceState,
    DeviceStateDelta,
    DiskCopy,
    DiskCopyMode,
    DiskState,
    Durable,
    EpochBegin,
    EpochEnd,
    EpochKind,
    GuestEvent,
    GuestFrames,
    Heartbeat,
    Hello,
    HelloProof,
    IOLog,
    Nack,
    Pages,
    RamState,
    Resync,
    Role,
    Switched,
    SwitchOutcome,
    SwitchoverRequest,
    VmProfile,
)

__all__ = [
    "CONTROL_MESSAGES",
    "DIGEST_SIZE",
    "HEADER_SIZE",
    "MAC_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_SMALL_PAYLOAD",
    "MESSAGE_TYPES",
    "NONCE_SIZE",
    "NO_EPOCH",
    "PROTOCOL_VERSION",
    "Ack",
    "Blob",
    "Bye",
    "CompatStage",
    "CompatVerdict",
    "Decoder",
    "DeviceState",
    "DeviceStateDelta",
    "DiskCopy",
    "DiskCopyMode",
    "DiskState",
    "Durable",
    "EpochBegin",
    "EpochDigest",
    "EpochEnd",
    "EpochKind",
    "GuestEvent",
    "GuestFrames",
    "Heartbeat",
    "Hello",
    "HelloProof",
    "IOLog",
    "Message",
    "Nack",
    "Pages",
    "Part",
    "PeerInfo",
    "RamState",
    "Resync",
    "Role",
    "Session",
    "SessionState",
    "SwitchOutcome",
    "Switched",
    "SwitchoverRequest",
    "VmProfile",
    "message_fields",
]

PROTOCOL_VERSION = 1
MAGIC = b"KMRI"
HEADER_SIZE = 24
MAC_SIZE = 32
NONCE_SIZE = 32
DIGEST_SIZE = 32

_HEAD = struct.Struct("!4sBBHIQ")  # the header without its crc32
_CRC = struct.Struct("!I")
_U32 = struct.Struct("!I")
_LABEL = b"kemari-v1"
_HANDSHAKE_TYPES = (Hello.TYPE, HelloProof.TYPE)
_SMALL = 64 << 10  # frames up to this size are read into a bytearray

Part: TypeAlias = bytes | memoryview


class SessionState(Enum):
    """Lifecycle of a :class:`Session`."""

    NEW = "new"  # nothing sent or received
    HANDSHAKE = "handshake"  # a Hello went one way or the other
    ESTABLISHED = "established"  # both proofs checked: application messages flow
    CLOSED = "closed"  # a Bye was sent or received
    FAILED = "failed"  # a protocol error happened; every call now raises


def _mac(key: bytes, parts: Iterable[Part]) -> bytes:
    h = hmac.new(key, digestmod="sha256")
    for p in parts:
        h.update(p)
    return h.digest()


def _frame_parts(msg: Message, seq: int, key: bytes) -> list[Part]:
    small, blob = encode_payload(msg)
    length = len(small) + (blob.nbytes if blob is not None else 0)
    if length > msg.MAX:
        raise ValueError(
            f"{type(msg).__name__} payload of {length} bytes exceeds the limit of {msg.MAX}"
        )
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, msg.TYPE, 0, length, seq)
    header = head + _CRC.pack(zlib.crc32(head))
    if blob is None:
        return [header + small + _mac(key, (header, small))]
    return [header + small, blob, _mac(key, (header, small, blob))]


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


@dataclass(frozen=True)
class PeerInfo:
    """Who the other end said it was in its (authenticated) Hello."""

    role: Role
    node_id: str
    version: int


class Session:
    """Protocol state of one connection: handshake, keys, sequence numbers.

    Usage (the caller owns the socket)::

        s = Session(psk, role=Role.PRIMARY, node_id="a", initiator=True)
        s.start()
        sock.sendall(s.data_to_send())
        while s.state is not SessionState.ESTABLISHED:
            msgs = s.feed(sock.recv(65536))   # application messages, if any arrived
            sock.sendall(s.data_to_send())    # the HelloProof, once the peer's Hello is in
        sock.sendmsg(s.encode_parts(Pages(epoch, blob)))

    Frames must be sent in the order they were encoded (each takes the next sequence
    number). Not thread-safe: one sender and one receiver, or a lock around each.
    """

    def __init__(
        self,
        psk: bytes | str,
        *,
        role: Role,
        node_id: str,
        initiator: bool,
        accept_roles: Iterable[Role] | None = None,
        nonce: bytes | None = None,
    ) -> None:
        """Raises ConfigError for an empty key, ValueError for a bad node id or nonce."""
        key = psk.encode("utf-8") if isinstance(psk, str) else bytes(psk)
        if not key:
            raise ConfigError("the replication key is empty", key="replication.key")
        if len(node_id.encode("utf-8")) > 255:
            raise ValueError("node_id longer than 255 bytes")
        self._psk = key
        self._hello_key = _hmac(key, _LABEL + b" hello")
        self.role = role
        self.node_id = node_id
        self.initiator = initiator
        self.accept_roles = frozenset(accept_roles) if accept_roles is not None else None
        self.nonce = os.urandom(NONCE_SIZE) if nonce is None else bytes(nonce)
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self.peer: PeerInfo | None = None
        self.decoder = Decoder(self)
        self._send_seq = 0
        self._recv_seq = 0
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._own_hello: bytes | None = None  # the Hello payload we sent
        self._transcript = b""
        #: The channel binding both proofs cover (empty: none); see :meth:`bind_channel`.
        self._binding = b""
        self._proof_ok = False
        self._bye_sent = False
        self._bye_received = False
        self._failure: ProtocolError | None = None
        self._outbox: list[Part] = []

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        if self._failure is not None:
            return SessionState.FAILED
        if self._bye_sent or self._bye_received:
            return SessionState.CLOSED
        if self._proof_ok and self._send_key is not None:
            return SessionState.ESTABLISHED
        if self._own_hello is not None or self.peer is not None:
            return SessionState.HANDSHAKE
        return SessionState.NEW

    @property
    def established(self) -> bool:
        return self.state is SessionState.ESTABLISHED

    @property
    def failure(self) -> ProtocolError | None:
        """The error that failed the session, if any."""
        return self._failure

    def bind_channel(self, binding: bytes) -> None:
        """Cover ``binding`` (what this end saw of the channel underneath, e.g. the TLS
        certificate's fingerprint) by the handshake proofs: the peer must bind the same.

        Raises:
            ValueError: the peer's Hello is already in (the proof is computed from it).
        """
        if self.peer is not None or self._failure is not None:
            raise ValueError("bind the channel before the peer's Hello is fed")
        self._binding = bytes(binding)

    # -- sending --------------------------------------------------------------------------

    def start(self) -> None:
        """Queue this end's Hello (see :meth:`data_to_send`). Idempotent."""
        if self._own_hello is not None:
            return
        hello = Hello(PROTOCOL_VERSION, self.role, self.initiator, self.nonce, self.node_id)
        self._own_hello = encode_payload(hello)[0]
        self._queue(hello, self._hello_key)

    def data_to_send(self) -> bytes:
        """Handshake bytes the session queued (Hello, HelloProof); empty when none."""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def encode_parts(self, msg: Message) -> list[Part]:
        """Frame ``msg`` as parts for ``sendmsg``/``writelines``; a blob is not copied.

        The blob must not change until the parts are sent.

        Raises:
            ProtocolError: the session is not ESTABLISHED (or failed, or closed).
            ValueError: a handshake message, or a field that does not fit its layout.
        """
        if isinstance(msg, Hello | HelloProof):
            raise ValueError("handshake messages are sent by the session itself")
        state = self.state
        if state is not SessionState.ESTABLISHED:
            detail = f": {self._failure.reason}" if self._failure is not None else ""
            raise ProtocolError(
                f"cannot send {type(msg).__name__}: session is {state.value}{detail}", msg.TYPE
            )
        assert self._send_key is not None
        parts = _frame_parts(msg, self._send_seq, self._send_key)
        self._send_seq += 1
        if isinstance(msg, Bye):
            self._bye_sent = True
        return parts

    def encode(self, msg: Message) -> bytes:
        """Frame ``msg`` as one bytes object (copies a blob once; see :meth:`encode_parts`)."""
        return b"".join(self.encode_parts(msg))

    def _queue(self, msg: Message, key: bytes) -> None:
        self._outbox.extend(_frame_parts(msg, self._send_seq, key))
        self._send_seq += 1

    # -- receiving ------------------------------------------------------------------------

    def feed(self, data: Blob) -> list[Message]:
        """Feed received bytes; returns the application messages completed by them.

        Raises:
            ProtocolError: malformed or unexpected frame (the session is then FAILED).
            AuthError: MAC, handshake, or sequence failure.
        """
        return self.decoder.feed(data)

    def _fail(self, err: ProtocolError) -> None:
        if self._failure is None:
            self._failure = err

    def _check_live(self) -> None:
        if self._failure is not None:
            raise ProtocolError(
                f"session failed earlier: {self._failure.reason}", self._failure.frame_type
            )

    def _check_header(self, frame_type: int, length: int, seq: int) -> None:
        """Everything that can be judged before the payload is buffered."""
        cls = MESSAGE_TYPES[frame_type]
        name = cls.__name__
        if length > cls.MAX:
            raise ProtocolError(
                f"{name} payload of {length} bytes exceeds the limit of {cls.MAX}", frame_type
            )
        if self._bye_received:
            raise ProtocolError(f"{name} after Bye", frame_type)
        if seq != self._recv_seq:
            raise AuthError(
                f"expected sequence number {self._recv_seq}, got {seq}"
                " (replayed, reordered or lost frame)",
                frame_type,
            )
        expected = _HANDSHAKE_TYPES[seq] if seq < len(_HANDSHAKE_TYPES) else None
        if expected is not None and frame_type != expected:
            raise AuthError(
                f"{name} where the handshake expects {MESSAGE_TYPES[expected].__name__}",
                frame_type,
            )
        if expected is None and frame_type in _HANDSHAKE_TYPES:
            raise ProtocolError(f"{name} after the handshake", frame_type)

    def _accept(self, frame_type: int, header: bytes, body: memoryview) -> Message | None:
        """Authenticate and decode a complete frame; None for handshake frames."""
        payload = body[:-MAC_SIZE]
        key = self._hello_key if frame_type == Hello.TYPE else self._recv_key
        assert key is not None  # _check_header admits HelloProof only after the Hello
        if not hmac.compare_digest(_mac(key, (header, payload)), body[-MAC_SIZE:]):
            raise AuthError(
                "frame MAC mismatch (wrong pre-shared key, or a forged or corrupted frame)",
                frame_type,
            )
        msg = decode_payload(MESSAGE_TYPES[frame_type], payload)
        self._recv_seq += 1
        if isinstance(msg, Hello):
            self._on_hello(msg, bytes(payload))
            return None
        if isinstance(msg, HelloProof):
            self._on_proof(msg)
            return None
        if isinstance(msg, Bye):
            self._bye_received = True
        return msg

    def _on_hello(self, hello: Hello, payload: bytes) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer {hello.node_id!r} speaks protocol version {hello.version},"
                f" this node speaks version {PROTOCOL_VERSION}",
                Hello.TYPE,
            )
        if hello.initiator == self.initiator:
            which = "the initiator" if self.initiator else "the responder"
            raise ProtocolError(f"both ends claim to be {which}", Hello.TYPE)
        if hmac.compare_digest(hello.nonce, self.nonce):
            raise AuthError("peer sent this node's own nonce (reflected handshake)", Hello.TYPE)
        if self.accept_roles is not None and hello.role not in self.accept_roles:
            raise ProtocolError(
                f"peer {hello.node_id!r} has role {hello.role.name.lower()}, not accepted here",
                Hello.TYPE,
            )
        self.peer = PeerInfo(role=hello.role, node_id=hello.node_id, version=hello.version)
        self.start()
        assert self._own_hello is not None
        if self.initiator:
            nonces = self.nonce + hello.nonce
            hellos = (self._own_hello, payload)
        else:
            nonces = hello.nonce + self.nonce
            hellos = (payload, self._own_hello)
        session_key = _hmac(self._psk, _LABEL + nonces)
        i2r = _hmac(session_key, b"i2r")
        r2i = _hmac(session_key, b"r2i")
        self._send_key, self._recv_key = (i2r, r2i) if self.initiator else (r2i, i2r)
        t = hashlib.sha256()
        for h in hellos:
            t.update(_U32.pack(len(h)))
            t.update(h)
        if self._binding:
            t.update(b"channel" + _U32.pack(len(self._binding)) + self._binding)
        self._transcript = _LABEL + b" proof" + t.digest()
        self._queue(HelloProof(_hmac(self._send_key, self._transcript)), self._send_key)

    def _on_proof(self, proof: HelloProof) -> None:
        assert self._recv_key is not None
        if not hmac.compare_digest(proof.mac, _hmac(self._recv_key, self._transcript)):
            raise AuthError(
                "handshake proof mismatch (wrong key, a replayed handshake, or a different"
                " TLS channel on each end: a relay in the middle)",
                HelloProof.TYPE,
            )
        self._proof_ok = True


class Decoder:
    """Incremental frame parser of a :class:`Session`.

    Either :meth:`feed` bytes, or (for ``asyncio.BufferedProtocol``) read straight into
    :meth:`get_buffer` and call :meth:`buffer_updated`: each frame's payload is read into
    its own buffer once, and blob fields of the decoded message are views of it.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._header = bytearray(HEADER_SIZE)
        self._buf: memoryview = memoryview(self._header)
        self._frame_header = b""
        self._frame_type = 0
        self._in_body = False
        self._filled = 0

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return not self._in_body and self._filled == 0

    def eof(self) -> None:
        """The peer closed the stream.

        Raises:
            ProtocolError: the stream ended inside a frame.
        """
        if not self.at_boundary:
            err = ProtocolError("stream ended inside a frame (truncated)")
            self._session._fail(err)
            raise err

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """The free part of the buffer the next bytes belong to (never empty)."""
        return self._buf[self._filled :]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``nbytes`` were written into the last :meth:`get_buffer`; see :meth:`feed`."""
        out: list[Message] = []
        self._guarded(nbytes, out)
        return out

    def feed(self, data: Blob) -> list[Message]:
        """Feed received bytes; returns the application messages they complete.

        If a later frame fails, messages decoded earlier in the call are dropped.

        Raises:
            ProtocolError: malformed or unexpected frame (the session is then FAILED).
            AuthError: MAC, handshake, or sequence failure.
        """
        view = memoryview(data).cast("B")
        out: list[Message] = []
        pos = 0
        total = len(view)
        self._session._check_live()
        while pos < total:
            buf = self._buf[self._filled :]
            n = min(len(buf), total - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
            self._guarded(n, out)
        return out

    def _guarded(self, nbytes: int, out: list[Message]) -> None:
        self._session._check_live()
        try:
            self._advance(nbytes, out)
        except ProtocolError as err:
            self._session._fail(err)
            raise

    def _advance(self, nbytes: int, out: list[Message]) -> None:
        if nbytes < 0 or self._filled + nbytes > len(self._buf):
            raise ValueError("buffer_updated beyond the buffer from get_buffer")
        self._filled += nbytes
        if self._filled < len(self._buf):
            return
        if not self._in_body:
            self._start_body()
            return
        msg = self._session._accept(self._frame_type, self._frame_header, self._buf)
        self._in_body = False
        self._buf = memoryview(self._header)
        self._filled = 0
        if msg is not None:
            out.append(msg)

    def _start_body(self) -> None:
        header = bytes(self._header)
        magic, version, frame_type, flags, length, seq = _HEAD.unpack_from(header)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}: not a Kemari replication stream")
        if _CRC.unpack_from(header, 20)[0] != zlib.crc32(header[:20]):
            raise ProtocolError("frame header checksum mismatch (corrupted stream)")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol version {version}, this node speaks version"
                f" {PROTOCOL_VERSION}",
                frame_type,
            )
        if frame_type not in MESSAGE_TYPES:
            raise ProtocolError(f"unknown message type {frame_type:#04x}", frame_type)
        if flags != 0:
            raise ProtocolError(f"unknown frame flags {flags:#06x}", frame_type)
        self._session._check_header(frame_type, length, seq)
        self._frame_header = header
        self._frame_type = frame_type
        self._in_body = True
        # One buffer per frame: the decoded message's blob views stay valid. Large ones
        # come from numpy uninitialized (all of it is received before it is read).
        size = length + MAC_SIZE
        self._buf = np.empty(size, np.uint8).data if size > _SMALL else memoryview(bytearray(size))
        self._filled = 0
