"""The NBD wire format the block tap speaks (server side), without any I/O.

Fixed newstyle negotiation, simple replies only (no structured replies), as in the NBD
protocol document (doc/proto.md of the NetworkBlockDevice project). All integers are
big-endian.

Handshake::

    server  !QQH   NBDMAGIC, IHAVEOPT, handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
    client  !I     client flags (C_FIXED_NEWSTYLE, C_NO_ZEROES; anything else: close)
    client  !QII   IHAVEOPT, option, length, then ``length`` bytes of option data
    server  !QIII  REPLY_MAGIC, option, reply type, length, then the reply data

    NBD_OPT_INFO / NBD_OPT_GO data:  !I name length, name, !H n, n x !H info type
    NBD_REP_INFO data:  !HQH  INFO_EXPORT, size, transmission flags
                        !HIII INFO_BLOCK_SIZE, minimum, preferred, maximum
                        !H    INFO_NAME, then the name
    NBD_OPT_EXPORT_NAME answer (no reply header): !QH size, flags (+124 zeros unless
                        NO_ZEROES was agreed)

Transmission::

    request  !IHHQQI  REQUEST_MAGIC, command flags, type, cookie, offset, length
                      (WRITE: followed by ``length`` bytes)
    reply    !IIQ     SIMPLE_REPLY_MAGIC, error (errno), cookie
                      (successful READ: followed by ``length`` bytes)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kemari_suite.errors import ProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
#: What the tap serves: flush, FUA, trim, write-zeroes.
TRANSMISSION_FLAGS = (
    TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
)

# Command flags.
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: Longest export name accepted (the protocol's limit).
MAX_NAME = 4096
#: Longest option payload read; a longer one closes the connection.
MAX_OPTION_DATA = 64 * 1024

SERVER_GREETING = struct.Struct("!QQH")
CLIENT_FLAGS = struct.Struct("!I")
OPTION_HEADER = struct.Struct("!QII")
OPTION_REPLY = struct.Struct("!QIII")
REQUEST = struct.Struct("!IHHQQI")
SIMPLE_REPLY = struct.Struct("!IIQ")


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class Errno(enum.IntEnum):
    """The error values NBD puts in replies (Linux numbering, fixed by the protocol)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: Command flags each command accepts; any other flag is answered with EINVAL.
ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CMD_FLAG_FUA,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}


def greeting() -> bytes:
    """The server's first bytes."""
    return SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def parse_client_flags(data: bytes) -> int:
    """The client flags.

    Raises:
        ProtocolError: unknown flags, or a client that is not fixed-newstyle.
    """
    (flags,) = CLIENT_FLAGS.unpack(data)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise ProtocolError(f"NBD: unknown client flags {flags:#x}")
    if not flags & FLAG_C_FIXED_NEWSTYLE:
        raise ProtocolError("NBD: client does not speak fixed newstyle negotiation")
    return int(flags)


@dataclass(frozen=True)
class OptionHeader:
    option: int
    length: int


def parse_option_header(data: bytes) -> OptionHeader:
    """Raises ProtocolError on a bad magic or an oversized option."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"NBD: bad option magic {magic:#x}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"NBD: option {option} carries {length} bytes")
    return OptionHeader(int(option), int(length))


def option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, rep, len(data)) + data


def option_error(option: int, rep: Rep, message: str) -> bytes:
    """An error reply carrying a UTF-8 message (shown by clients such as qemu-img)."""
    return option_reply(option, rep, message.encode()[:4096])


@dataclass(frozen=True)
class InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO: the export name and the information types asked for."""

    name: str
    requests: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    """Raises ProtocolError (answered with NBD_REP_ERR_INVALID) when malformed."""
    if len(data) < 6:
        raise ProtocolError(f"NBD: info request of {len(data)} bytes")
    (nlen,) = struct.unpack_from("!I", data, 0)
    if nlen > MAX_NAME or 4 + nlen + 2 > len(data):
        raise ProtocolError(f"NBD: export name length {nlen} in a {len(data)}-byte request")
    try:
        name = data[4 : 4 + nlen].decode()
    except UnicodeDecodeError as err:
        raise ProtocolError(f"NBD: export name is not UTF-8: {err}") from err
    (n,) = struct.unpack_from("!H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * n:
        raise ProtocolError(f"NBD: {n} info requests do not fit {len(data)} bytes")
    reqs = struct.unpack_from(f"!{n}H", data, 4 + nlen + 2)
    return InfoRequest(name, tuple(int(r) for r in reqs))


def info_export(size: int, flags: int = TRANSMISSION_FLAGS) -> bytes:
    return struct.pack("!HQH", Info.EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack("!HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return struct.pack("!H", Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack("!H", Info.DESCRIPTION) + text.encode()[:4096]


def rep_server(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("!I", len(raw)) + raw


def export_name_answer(size: int, *, no_zeroes: bool, flags: int = TRANSMISSION_FLAGS) -> bytes:
    return struct.pack("!QH", size, flags) + (b"" if no_zeroes else bytes(124))


@dataclass(frozen=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(data: bytes) -> Request:
    """Raises ProtocolError on a bad request magic (the stream cannot be trusted after)."""
    magic, flags, typ, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"NBD: bad request magic {magic:#x}")
    return Request(int(flags), int(typ), int(cookie), int(offset), int(length))


def encode_request(req: Request) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


__all__ = [
    "ALLOWED_FLAGS",
    "IHAVEOPT",
    "NBDMAGIC",
    "REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "TRANSMISSION_FLAGS",
    "Cmd",
    "Errno",
    "Info",
    "InfoRequest",
    "Opt",
    "Rep",
    "Request",
]
