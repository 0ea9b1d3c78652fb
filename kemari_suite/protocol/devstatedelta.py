"""Device state sent as a change: the XOR with the previous epoch's, compressed.

QEMU's device state for a small pc guest is about 400 KB, most of it firmware and
option ROMs and the registers of idle devices: the same bytes at every sync point. The
XOR with the previous epoch's device state is zeros there and compresses to a few
kilobytes, so :class:`~kemari_suite.protocol.messages.DeviceStateDelta` carries that
instead of the whole state whenever the previous epoch's state has the same length.
The receiver applies it to the device state it committed last, which is exactly the
previous epoch's (epochs arrive in order on one connection); any other base is a
protocol error, and the link starts again from a full synchronization.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kemari_suite.errors import ProtocolError

#: A delta is sent only when it is smaller than this share of the full state.
WORTH_IT = 0.5


def encode_delta(base: bytes, state: bytes) -> bytes | None:
    """The compressed XOR of ``state`` with ``base``; None when they differ in length
    or the delta would not be much smaller than ``state`` itself."""
    if len(base) != len(state) or not state:
        return None
    xor = np.bitwise_xor(np.frombuffer(state, np.uint8), np.frombuffer(base, np.uint8))
    data = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(xor.tobytes())
    return data if len(data) < WORTH_IT * len(state) else None


def apply_delta(base: bytes, data: bytes | bytearray | memoryview, size: int) -> bytes:
    """The device state that ``data`` (from :func:`encode_delta`) makes of ``base``.

    Raises:
        ProtocolError: the base has another length, or ``data`` does not decompress
            to exactly ``size`` bytes.
    """
    if len(base) != size:
        raise ProtocolError(f"device state delta of {size} bytes on a base of {len(base)}")
    try:
        xor = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)
    except zstandard.ZstdError as err:
        raise ProtocolError(f"device state delta does not decompress: {err}") from err
    if len(xor) != size:
        raise ProtocolError(f"device state delta of {len(xor)} bytes, expected {size}")
    out = np.bitwise_xor(np.frombuffer(xor, np.uint8), np.frombuffer(base, np.uint8))
    return out.tobytes()


__all__ = ["apply_delta", "encode_delta"]
