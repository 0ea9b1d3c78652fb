"""The control channel between the host and the agent inside an L1 host: frames, no I/O.

The host runs commands inside an L1 through a virtio-serial port (``klab.agent``) whose
QEMU end is a unix socket. This module is the whole protocol: messages as frozen
dataclasses, :func:`encode` and an incremental :class:`Decoder`. It imports only the
standard library and :mod:`kemari_suite.errors`, because the same file runs inside the
L1 (the image builder copies it there, see :mod:`kemari_suite.klab.image`).

Frame (little endian)::

    offset  size  field
    0       4     magic b"KLAB"
    4       1     message type (MESSAGE_TYPES)
    5       1     version (VERSION)
    6       2     0
    8       4     body length n (at most MAX_BODY)
    12      n     body: the message's fixed LAYOUT, then each of its BLOBS
                  as a u32 length and that many bytes

Exchange::

    host                                agent (in the L1)
    Ping(nonce)                 ->
                                <-      Pong(nonce, uptime_ms, release)
    Run(req_id, timeout_ms, command, stdin)  ->
                                <-      Done(req_id, exit_code, ...)

A Ping is answered at once; Runs run concurrently, each answered by one Done with its
``req_id``. The host sends Pings until one is answered after it connects: bytes the
agent wrote while nobody listened may be lost, and the Pong's nonce says which answer
belongs to this connection.

Errors: a bad magic, version, type or length raises
:class:`~kemari_suite.errors.ProtocolError`; the decoder is then FAILED (sticky) and the
connection must be dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, TypeAlias

from kemari_suite.errors import ProtocolError

MAGIC = b"KLAB"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
#: Commands' output is capped by the agent well below this.
MAX_BODY = 32 << 20
_BLOB_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class Ping:
    """Host -> agent: are you there? ``LAYOUT``: nonce u64."""

    TYPE: ClassVar[int] = 1
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")
    BLOBS: ClassVar[tuple[str, ...]] = ()

    nonce: int


@dataclass(frozen=True)
class Pong:
    """Agent -> host. ``LAYOUT``: nonce u64, uptime_ms u64; ``BLOBS``: release (uname -r)."""

    TYPE: ClassVar[int] = 2
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    BLOBS: ClassVar[tuple[str, ...]] = ("release",)

    nonce: int
    uptime_ms: int
    release: bytes


@dataclass(frozen=True)
class Run:
    """Host -> agent: run ``command`` with ``/bin/sh -c``, ``stdin`` as its input.

    ``LAYOUT``: req_id u32, timeout_ms u32 (0: none); ``BLOBS``: command, stdin.
    """

    TYPE: ClassVar[int] = 3
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")
    BLOBS: ClassVar[tuple[str, ...]] = ("command", "stdin")

    req_id: int
    timeout_ms: int
    command: bytes
    stdin: bytes = b""


@dataclass(frozen=True)
class Done:
    """Agent -> host: how a Run ended.

    ``LAYOUT``: req_id u32, exit_code i32 (negative: killed by that signal; -1000: could
    not start), duration_us u64, flags u8 (bit 0 timed out, bit 1 output truncated);
    ``BLOBS``: stdout, stderr.
    """

    TYPE: ClassVar[int] = 4
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IiQB")
    BLOBS: ClassVar[tuple[str, ...]] = ("stdout", "stderr")
    TIMED_OUT: ClassVar[int] = 1
    TRUNCATED: ClassVar[int] = 2

    req_id: int
    exit_code: int
    duration_us: int
    flags: int
    stdout: bytes
    stderr: bytes


Message: TypeAlias = Ping | Pong | Run | Done
MESSAGE_TYPES: dict[int, type[Message]] = {m.TYPE: m for m in (Ping, Pong, Run, Done)}


def encode(msg: Message) -> bytes:
    """One frame holding ``msg``. Raises ProtocolError if it is larger than MAX_BODY."""
    names = [f.name for f in fields(msg)]
    fixed = [getattr(msg, n) for n in names if n not in msg.BLOBS]
    parts = [msg.LAYOUT.pack(*fixed)]
    for name in msg.BLOBS:
        blob = getattr(msg, name)
        parts += [_BLOB_LEN.pack(len(blob)), blob]
    body = b"".join(parts)
    if len(body) > MAX_BODY:
        raise ProtocolError(f"L1 agent channel: message of {len(body)} bytes", msg.TYPE)
    return HEADER.pack(MAGIC, msg.TYPE, VERSION, 0, len(body)) + body


def decode_body(msg_type: int, body: bytes) -> Message:
    """The message of type ``msg_type`` in ``body``. Raises ProtocolError."""
    cls = MESSAGE_TYPES.get(msg_type)
    if cls is None:
        raise ProtocolError("L1 agent channel: unknown message type", msg_type)
    if len(body) < cls.LAYOUT.size:
        raise ProtocolError("L1 agent channel: truncated body", msg_type)
    values: list[object] = list(cls.LAYOUT.unpack_from(body, 0))
    at = cls.LAYOUT.size
    for _ in cls.BLOBS:
        if at + _BLOB_LEN.size > len(body):
            raise ProtocolError("L1 agent channel: truncated blob length", msg_type)
        (n,) = _BLOB_LEN.unpack_from(body, at)
        at += _BLOB_LEN.size
        if at + n > len(body):
            raise ProtocolError("L1 agent channel: truncated blob", msg_type)
        values.append(body[at : at + n])
        at += n
    if at != len(body):
        raise ProtocolError(f"L1 agent channel: {len(body) - at} trailing bytes", msg_type)
    return cls(*values)  # type: ignore[arg-type]


class Decoder:
    """Incremental: :meth:`feed` bytes as they arrive, get the complete messages back.

    Raises ProtocolError on garbage; after that every call raises (sticky FAILED).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.failed: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Message]:
        if self.failed is not None:
            raise self.failed
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= HEADER.size:
                magic, msg_type, version, zero, n = HEADER.unpack_from(self._buf, 0)
                if magic != MAGIC:
                    raise ProtocolError(f"L1 agent channel: bad magic {bytes(magic)!r}")
                if version != VERSION or zero != 0:
                    raise ProtocolError(f"L1 agent channel: version {version}", msg_type)
                if n > MAX_BODY:
                    raise ProtocolError(f"L1 agent channel: body of {n} bytes", msg_type)
                if len(self._buf) < HEADER.size + n:
                    break
                body = bytes(self._buf[HEADER.size : HEADER.size + n])
                del self._buf[: HEADER.size + n]
                out.append(decode_body(msg_type, body))
        except ProtocolError as err:
            self.failed = err
            raise
        return out


__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_BODY",
    "MESSAGE_TYPES",
    "VERSION",
    "Decoder",
    "Done",
    "Message",
    "Ping",
    "Pong",
    "Run",
    "decode_body",
    "encode",
]
