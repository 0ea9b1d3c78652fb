"""JSON lines: the framing of the control socket and of the witness.

A frame is one JSON object, UTF-8, on one line::

    {"cmd":"status"}\\n

:func:`encode` makes one; :func:`parse` reads the line without its newline. Both
protocols go through here, so a frame means the same on each: an object (never a list
or a bare value), at most ``limit`` bytes before the newline (each stream says how
many), no NaN or Infinity.

Two ways to read frames:

- sans I/O, a :class:`Decoder` fed with bytes (``feed``, then ``next_frame`` until it
  returns None), for blocking sockets and tests;
- from an ``asyncio.StreamReader``, :func:`read_frame` (or :func:`read_line` and
  :func:`parse` apart, to answer a malformed frame and go on).

Errors: reading raises :class:`ProtocolError` and nothing else. A frame that is over the
limit, or cut short by the end of the stream, leaves the stream between frames no more:
the decoder fails for good (sticky, like a wire session) and a stream should be closed.
A complete line that is not a JSON object is an error for that frame only; the next one
reads fine. Encoding a value that JSON cannot hold, or a frame over the limit, raises
``ValueError``: that is the caller's bug, not the peer's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kemari_suite.errors import ProtocolError

#: Default largest frame, in bytes before the newline.
MAX_FRAME = 1 << 20


class FrameWriter(Protocol):
    """What :func:`write_frame` needs of a stream (``asyncio.StreamWriter`` has it)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_long(limit: int) -> ProtocolError:
    return ProtocolError(f"JSON-lines frame exceeds the limit of {limit} bytes")


def encode(
    obj: Mapping[str, Any],
    *,
    limit: int = MAX_FRAME,
    default: Callable[[Any], Any] | None = None,
) -> bytes:
    """One frame: ``obj`` as compact JSON and a newline.

    ``default`` turns values JSON has no type for into ones it has (as in ``json.dumps``).

    Raises:
        ValueError: ``obj`` is not a mapping, holds something JSON cannot (NaN
            included), or its frame exceeds ``limit``.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"a frame is a JSON object, not {type(obj).__name__}")
    try:
        text = json.dumps(dict(obj), separators=(",", ":"), allow_nan=False, default=default)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"cannot encode a frame: {err}") from err
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"a frame of {len(raw)} bytes exceeds the limit of {limit} bytes")
    return raw + b"\n"


def parse(line: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The object of one frame, given without its newline.

    Raises:
        ProtocolError: not UTF-8, not JSON, or not an object.
    """
    try:
        value = json.loads(bytes(line).decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise ProtocolError(f"JSON-lines frame is not UTF-8 (byte {err.start})") from None
    except (ValueError, RecursionError) as err:
        # RecursionError: a line of "[" nests deeper than the parser goes.
        raise ProtocolError(f"JSON-lines frame is not JSON ({type(err).__name__})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"JSON-lines frame is a JSON {type(value).__name__}, not an object")
    return value


class Decoder:
    """Incremental frame reader: bytes in, objects out. No I/O.

    Usage::

        dec = Decoder(limit=4096)
        dec.feed(sock.recv(65536))
        while (obj := dec.next_frame()) is not None:
            handle(obj)
    """

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._failure: ProtocolError | None = None

    @property
    def failure(self) -> ProtocolError | None:
        """The error that failed the decoder for good, if any."""
        return self._failure

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return not self._buf

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; read the frames they complete with :meth:`next_frame`.

        Raises:
            ProtocolError: the decoder failed earlier.
        """
        self._check_live()
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        """The next complete frame, or None until more bytes are fed.

        Raises:
            ProtocolError: a frame over the limit (the decoder then fails for good), or
                a complete line that is not a JSON object (consumed; call again).
        """
        self._check_live()
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if self._scanned > self.limit:
                raise self._failed(_too_long(self.limit))
            return None
        if end > self.limit:
            raise self._failed(_too_long(self.limit))
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        return parse(line)

    def eof(self) -> None:
        """The peer closed the stream.

        Raises:
            ProtocolError: the stream ended inside a frame (truncated).
        """
        self._check_live()
        if self._buf:
            raise self._failed(ProtocolError("stream ended inside a JSON-lines frame (truncated)"))

    def _failed(self, err: ProtocolError) -> ProtocolError:
        self._failure = err
        self._buf.clear()
        return err

    def _check_live(self) -> None:
        if self._failure is not None:
            raise ProtocolError(f"JSON-lines stream failed earlier: {self._failure.reason}")


async def read_line(
    reader: asyncio.StreamReader, limit: int = MAX_FRAME, timeout: float | None = None
) -> bytes | None:
    """The next frame's bytes without the newline; None at a clean end of the stream.

    Works with any ``limit`` of the reader itself: a longer line is read in pieces.

    Raises:
        ProtocolError: the line exceeds ``limit``, or the stream ended inside it.
        TimeoutError: no whole line within ``timeout`` seconds.
    """
    return await asyncio.wait_for(_read_line(reader, limit), timeout)


async def _read_line(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    buf = bytearray()
    while True:
        try:
            buf += await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as err:
            # Over the reader's own limit: take what it holds and look further.
            buf += await reader.readexactly(err.consumed)
            if len(buf) > limit:
                raise _too_long(limit) from None
            continue
        except asyncio.IncompleteReadError as err:
            if not buf and not err.partial:
                return None
            if len(buf) + len(err.partial) > limit:
                raise _too_long(limit) from None
            raise ProtocolError("stream ended inside a JSON-lines frame (truncated)") from None
        if len(buf) - 1 > limit:
            raise _too_long(limit)
        return bytes(buf[:-1])


async def read_frame(
    reader: asyncio.StreamReader, limit: int = MAX_FRAME, timeout: float | None = None
) -> dict[str, Any] | None:
    """The next frame's object; None at a clean end of the stream.

    Raises:
        ProtocolError: see :func:`read_line` and :func:`parse`.
        TimeoutError: no whole frame within ``timeout`` seconds.
    """
    line = await read_line(reader, limit, timeout)
    return None if line is None else parse(line)


async def write_frame(
    writer: FrameWriter,
    obj: Mapping[str, Any],
    *,
    limit: int = MAX_FRAME,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Send one frame and wait until the stream takes it.

    Raises:
        ValueError: see :func:`encode` (nothing was sent).
        ConnectionError: the stream is gone.
    """
    writer.write(encode(obj, limit=limit, default=default))
    await writer.drain()
