"""Field codecs of wire messages, and the :class:`Message` base they work on. No I/O.

A message declares its payload as data: ``TYPE`` (the frame's message type), ``LAYOUT``
(a tuple of ``(field, codec)`` in wire order) and ``MAX`` (its largest payload).
:func:`encode_payload` and :func:`decode_payload` turn one into bytes and back; the
messages themselves are in :mod:`~kemari_suite.protocol.messages`, the frame around
the payload in :mod:`~kemari_suite.protocol.wire`.

Codecs (network byte order)::

    codec        size      value
    u8 ... u64   1 ... 8   unsigned integer
    i64          8         signed integer
    f64          8         IEEE 754 double; NaN and infinities are refused both ways
    bool         1         0 or 1
    text         4 + n     u32 length, then UTF-8
    json         4 + n     text holding one JSON object (keys sorted, no NaN); a dict
    b32          32        exactly 32 bytes
    frames       4 + ...   u32 count, then each frame as u32 length and its bytes; a
                           tuple of bytes (the message checks each frame's length)
    an IntEnum   1         u8 holding a member of that enum (closed sets: Role, ...)
    blob         the rest  last field only; decoded as a read-only memoryview over the
                           frame's own buffer, without a copy

Decoding raises :class:`ProtocolError` (and nothing else) for every short, long or
out-of-range payload, naming the message and the field. Encoding a value that does not
fit its field raises ``ValueError``: that is the caller's bug, not the peer's.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import fields
from enum import IntEnum
from typing import Any, ClassVar, TypeAlias

from kemari_suite.errors import ProtocolError

#: Largest payload of Pages, DeviceState and IOLog frames. Larger page sets are split.
MAX_PAYLOAD = 64 << 20
#: Largest payload of every other message.
MAX_SMALL_PAYLOAD = 1 << 20

Blob: TypeAlias = bytes | bytearray | memoryview
Codec: TypeAlias = str | type[IntEnum]
Layout: TypeAlias = tuple[tuple[str, Codec], ...]


class Message:
    """Base of every wire message (each a frozen dataclass)."""

    TYPE: ClassVar[int]
    LAYOUT: ClassVar[Layout]
    MAX: ClassVar[int] = MAX_SMALL_PAYLOAD


_NUMBERS = {
    "u8": struct.Struct("!B"),
    "u16": struct.Struct("!H"),
    "u32": struct.Struct("!I"),
    "u64": struct.Struct("!Q"),
    "i64": struct.Struct("!q"),
    "f64": struct.Struct("!d"),
}
_U32 = _NUMBERS["u32"]
CODECS = frozenset((*_NUMBERS, "bool", "text", "json", "b32", "frames", "blob"))


def enum_label(enum: type[IntEnum]) -> str:
    """How errors name an enum: ``EpochKind`` -> ``epoch kind``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", enum.__name__).lower()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def encode_payload(msg: Message) -> tuple[bytes, memoryview | None]:
    """The payload as (fixed and text fields, blob or None); the blob is not copied.

    Raises:
        ValueError: a field's value does not fit its codec.
    """
    small = bytearray()
    blob: memoryview | None = None
    try:
        for name, codec in msg.LAYOUT:
            value: Any = getattr(msg, name)
            if isinstance(codec, type):
                small.append(codec(value))
            elif codec in _NUMBERS:
                if codec == "f64" and not math.isfinite(value):
                    raise ValueError(f"{name} is {value}, not a finite number")
                small += _NUMBERS[codec].pack(value)
            elif codec == "bool":
                if value not in (0, 1):
                    raise ValueError(f"{name} is {value!r}, not a bool")
                small.append(int(value))
            elif codec in ("text", "json"):
                if codec == "json":
                    if not isinstance(value, dict):
                        raise ValueError(f"{name} must be a dict, not {type(value).__name__}")
                    value = json.dumps(
                        value, sort_keys=True, separators=(",", ":"), allow_nan=False
                    )
                raw = value.encode("utf-8")
                small += _U32.pack(len(raw))
                small += raw
            elif codec == "b32":
                if len(value) != 32:
                    raise ValueError(f"{name} must be 32 bytes, not {len(value)}")
                small += value
            elif codec == "frames":
                small += _U32.pack(len(value))
                for frame in value:
                    small += _U32.pack(len(frame))
                    small += frame
            else:  # blob
                blob = memoryview(value).cast("B")
    except (struct.error, AttributeError, TypeError, ValueError, UnicodeEncodeError) as err:
        raise ValueError(f"cannot encode {type(msg).__name__}: {err}") from err
    return bytes(small), blob


class _Reader:
    """Reads one payload; every shortfall or bad value is a ProtocolError."""

    def __init__(self, view: memoryview, frame_type: int, name: str) -> None:
        self._view = view
        self._pos = 0
        self._type = frame_type
        self._name = name
        self._field = ""

    def fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._name} payload: {what}", self._type)

    def take(self, n: int) -> memoryview:
        end = self._pos + n
        if end > len(self._view):
            raise self.fail(f"{self._field} needs {end} bytes, has {len(self._view)}")
        out = self._view[self._pos : end]
        self._pos = end
        return out

    def field(self, name: str, codec: Codec) -> Any:
        self._field = name
        if isinstance(codec, type):
            b = self.take(1)[0]
            try:
                return codec(b)
            except ValueError:
                raise self.fail(f"unknown {enum_label(codec)} {b} in field {name}") from None
        if codec in _NUMBERS:
            st = _NUMBERS[codec]
            value = st.unpack(self.take(st.size))[0]
            if codec == "f64" and not math.isfinite(value):
                raise self.fail(f"{name} is {value}, not a finite number")
            return value
        if codec == "bool":
            b = self.take(1)[0]
            if b > 1:
                raise self.fail(f"{name} is {b}, not 0 or 1")
            return bool(b)
        if codec in ("text", "json"):
            n = _U32.unpack(self.take(4))[0]
            raw = self.take(n)
            try:
                text = str(raw, "utf-8")
            except UnicodeDecodeError as err:
                raise self.fail(f"{name} is not UTF-8") from err
            return text if codec == "text" else self._json(name, text)
        if codec == "b32":
            return bytes(self.take(32))
        if codec == "frames":
            return self._frames(name)
        # blob: the rest, read-only, no copy
        return self.take(len(self._view) - self._pos).toreadonly()

    def _json(self, name: str, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:
            # RecursionError: a megabyte of "[" nests deeper than the parser goes.
            raise self.fail(f"{name} is not JSON ({type(err).__name__})") from None
        if not isinstance(value, dict):
            raise self.fail(f"{name} is a JSON {type(value).__name__}, not an object")
        return value

    def _frames(self, name: str) -> tuple[bytes, ...]:
        count = _U32.unpack(self.take(4))[0]
        left = len(self._view) - self._pos
        if count * 4 > left:
            raise self.fail(f"{name} says {count} frames, {left} bytes cannot hold them")
        out = []
        for i in range(count):
            self._field = f"{name}[{i}]"
            n = _U32.unpack(self.take(4))[0]
            out.append(bytes(self.take(n)))
        return tuple(out)

    def done(self) -> None:
        if self._pos != len(self._view):
            raise self.fail(f"{len(self._view) - self._pos} trailing bytes")


def decode_payload(cls: type[Message], payload: memoryview) -> Message:
    """A ``cls`` from its payload.

    Raises:
        ProtocolError: short, long, or a field out of range (the error names it).
    """
    reader = _Reader(payload, cls.TYPE, cls.__name__)
    values = {name: reader.field(name, codec) for name, codec in cls.LAYOUT}
    reader.done()
    try:
        return cls(**values)
    except ValueError as err:  # the message's own check, beyond its fields' codecs
        raise reader.fail(str(err)) from None


def message_fields(msg: Message) -> dict[str, Any]:
    """The message's fields as a dict (blobs as bytes), for logs and tests."""
    out: dict[str, Any] = {}
    for f in fields(msg):  # type: ignore[arg-type]
        value = getattr(msg, f.name)
        out[f.name] = bytes(value) if isinstance(value, memoryview | bytearray) else value
    return out
