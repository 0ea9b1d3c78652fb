"""JSON-lines framing, driven through in-memory streams: no sockets."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import framing
from kemari_suite.protocol.framing import Decoder

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stream(data: bytes, *, eof: bool = True, limit: int = 2**16) -> asyncio.StreamReader:
    """An in-memory StreamReader holding ``data`` (then the end of the stream)."""
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


class MemoryWriter:
    """The half of an asyncio.StreamWriter that write_frame uses, into a bytearray."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.drains = 0

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        self.drains += 1


def read_all(data: bytes, **kw: int) -> list[dict[str, object] | None]:
    async def main() -> list[dict[str, object] | None]:
        reader = stream(data, limit=kw.pop("reader_limit", 2**16))
        out: list[dict[str, object] | None] = []
        while (obj := await framing.read_frame(reader, **kw)) is not None:
            out.append(obj)
        return out

    return asyncio.run(main())


# --- encode ---------------------------------------------------------------------------------


def test_encode_is_compact_json_and_one_newline() -> None:
    assert framing.encode({"cmd": "status", "n": [1, 2.5, None]}) == (
        b'{"cmd":"status","n":[1,2.5,null]}\n'
    )
    # Newlines inside strings are escaped: a frame is always one line.
    assert framing.encode({"s": "a\nb"}).count(b"\n") == 1
    assert framing.encode({"p": object}, default=lambda o: "x") == b'{"p":"x"}\n'


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2], "JSON object, not list"),
        ({"x": math.nan}, "cannot encode"),
        ({"x": object()}, "cannot encode"),
        ({"x": "y" * 100}, "exceeds the limit of 64 bytes"),
    ],
)
def test_encode_refuses_what_is_not_a_frame(obj: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        framing.encode(obj, limit=64)  # type: ignore[arg-type]


# --- Decoder (sans I/O) ---------------------------------------------------------------------


def test_decoder_yields_frames_as_they_complete() -> None:
    dec = Decoder(limit=100)
    dec.feed(b'{"a":1}\n{"b"')
    assert dec.next_frame() == {"a": 1}
    assert dec.next_frame() is None
    assert not dec.at_boundary
    dec.feed(b":2}\n")
    assert dec.next_frame() == {"b": 2}
    assert dec.next_frame() is None
    assert dec.at_boundary
    dec.eof()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"[1]", "a JSON list, not an object"),
        (b'"x"', "a JSON str, not an object"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b'{"a": NaN}', "not JSON"),
        (b"\xff{}", "not UTF-8"),
        (b"[" * 50_000, "not JSON"),
    ],
)
def test_a_malformed_line_fails_alone(line: bytes, match: str) -> None:
    dec = Decoder()
    dec.feed(b'{"before":1}\n' + line + b'\n{"after":2}\n')
    assert dec.next_frame() == {"before": 1}
    with pytest.raises(ProtocolError, match=match):
        dec.next_frame()
    assert dec.failure is None
    assert dec.next_frame() == {"after": 2}


def test_an_oversized_frame_fails_the_decoder_before_its_newline() -> None:
    dec = Decoder(limit=10)
    dec.feed(b'{"a":"0123')
    assert dec.next_frame() is None  # 10 bytes: still possible
    dec.feed(b"4")
    with pytest.raises(ProtocolError, match="exceeds the limit of 10 bytes"):
        dec.next_frame()
    assert dec.failure is not None
    # Sticky: the stream is not between frames any more.
    with pytest.raises(ProtocolError, match=r"failed earlier.*limit of 10 bytes"):
        dec.feed(b'"}\n{}\n')
    with pytest.raises(ProtocolError, match="failed earlier"):
        dec.next_frame()


def test_an_oversized_complete_line_is_refused_too() -> None:
    dec = Decoder(limit=8)
    dec.feed(b'{"a":123}\n')  # 9 bytes before the newline
    with pytest.raises(ProtocolError, match="limit of 8 bytes"):
        dec.next_frame()
    ok = Decoder(limit=9)
    ok.feed(b'{"a":123}\n')
    assert ok.next_frame() == {"a": 123}


def test_eof_inside_a_frame_is_truncation() -> None:
    dec = Decoder()
    dec.feed(b'{"a":1}')
    assert dec.next_frame() is None
    with pytest.raises(ProtocolError, match="truncated"):
        dec.eof()


frames = st.lists(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
        max_size=5,
    ),
    max_size=6,
)


@given(frames, st.data())
@FUZZ
def test_any_fragmentation_gives_the_same_frames(
    objs: list[dict[str, object]], data: st.DataObject
) -> None:
    wire = b"".join(framing.encode(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    dec = Decoder()
    got: list[dict[str, object]] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        dec.feed(wire[prev:cut])
        prev = cut
        while (obj := dec.next_frame()) is not None:
            got.append(obj)
    assert got == objs
    dec.eof()


@given(st.binary(max_size=300))
@FUZZ
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    dec = Decoder(limit=64)
    try:
        dec.feed(data)
        while dec.next_frame() is not None:
            pass
        dec.eof()
    except ProtocolError:
        pass


# --- asyncio helpers ------------------------------------------------------------------------


def test_write_then_read_through_memory() -> None:
    async def main() -> None:
        writer = MemoryWriter()
        await framing.write_frame(writer, {"cmd": "status"})
        await framing.write_frame(writer, {"cmd": "stop", "why": "ü"})
        assert writer.drains == 2
        reader = stream(bytes(writer.data))
        assert await framing.read_frame(reader) == {"cmd": "status"}
        assert await framing.read_frame(reader) == {"cmd": "stop", "why": "ü"}
        assert await framing.read_frame(reader) is None
        assert await framing.read_frame(reader) is None

    asyncio.run(main())


def test_write_frame_sends_nothing_it_cannot_encode() -> None:
    async def main() -> None:
        writer = MemoryWriter()
        with pytest.raises(ValueError, match="limit of 16 bytes"):
            await framing.write_frame(writer, {"x": "y" * 20}, limit=16)
        assert writer.data == b""

    asyncio.run(main())


def test_read_frame_limit_is_its_own_not_the_readers() -> None:
    big = framing.encode({"x": "y" * 5000})  # longer than the reader's own 1 KiB limit
    assert read_all(big + b'{"n":2}\n', reader_limit=1024) == [{"x": "y" * 5000}, {"n": 2}]
    with pytest.raises(ProtocolError, match="exceeds the limit of 4096 bytes"):
        read_all(big, reader_limit=1024, limit=4096)
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 bytes"):
        read_all(big, reader_limit=1 << 16, limit=100)
    # Exactly at the limit is fine.
    assert read_all(big, limit=len(big) - 1) == [{"x": "y" * 5000}]


def test_read_frame_errors() -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        read_all(b'{"a":1}\n{"b":')
    with pytest.raises(ProtocolError, match="exceeds the limit of 8 bytes"):
        read_all(b'{"a":"0123456789"', limit=8)  # cut short, but too long anyway
    with pytest.raises(ProtocolError, match="not an object"):
        read_all(b"[]\n")


def test_a_malformed_line_leaves_the_stream_between_frames() -> None:
    async def main() -> None:
        reader = stream(b'{"a":1}\nnot json\n{"b":2}\n')
        assert await framing.read_frame(reader) == {"a": 1}
        line = await framing.read_line(reader)
        assert line == b"not json"
        with pytest.raises(ProtocolError, match="not JSON"):
            framing.parse(line)
        assert await framing.read_frame(reader) == {"b": 2}

    asyncio.run(main())


def test_read_frame_times_out() -> None:
    async def main() -> None:
        reader = stream(b'{"a":', eof=False)
        with pytest.raises(TimeoutError):
            await framing.read_frame(reader, timeout=0.05)

    asyncio.run(main())
