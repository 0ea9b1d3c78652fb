"""The guest disk as an NBD export served by the agent, in front of the block tap.

:class:`NBDServer` speaks NBD on a unix socket (wire format in
:mod:`kemari_suite.tap.nbdproto`) and turns requests into
:class:`~kemari_suite.tap.blocktap.BlockTap` calls (the data path: epoch log, overlay,
applier). Unsupported options get ``NBD_REP_ERR_UNSUP``, bad requests ``EINVAL`` (or
``ENOSPC`` for writes past the end), backend failures ``EIO``. A malformed stream (bad
magic, oversized payload) closes that connection with a logged
:class:`~kemari_suite.errors.ProtocolError`; the server keeps serving.

``BlockTap`` and ``BlockTapStats`` are re-exported here (their old import path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import KemariError, ProtocolError, TapError
from kemari_suite.tap import nbdproto as p
from kemari_suite.tap.blocktap import BlockTap, BlockTapStats
from kemari_suite.tap.events import TapMode

log = logging.getLogger(__name__)

#: Largest READ or WRITE payload accepted (QEMU's NBD client sends at most 32 MiB).
MAX_REQUEST = 32 << 20
PREFERRED_BLOCK = 4096


@dataclass
class NBDServerStats:
    connections: int = 0
    requests: int = 0
    protocol_errors: int = 0
    einval: int = 0
    eio: int = 0
    option_errors: int = 0


class NBDServer:
    """One NBD export of a :class:`BlockTap` on a unix socket.

    ``await start()`` listens (a stale socket file is replaced); ``await close()`` stops
    listening and drops the connections.
    """

    def __init__(
        self,
        tap: BlockTap,
        path: Path | str,
        *,
        export_name: str = "disk0",
        description: str = "",
        max_request: int = MAX_REQUEST,
    ) -> None:
        self.tap = tap
        self.path = Path(path)
        self.export_name = export_name
        self.description = description
        self.max_request = max_request
        self.stats = NBDServerStats()
        #: The last malformed-stream error (tests and status).
        self.last_protocol_error: ProtocolError | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on ``path``. Raises TapError if the socket cannot be created."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        except OSError as err:
            raise TapError(self.tap.name, f"cannot listen on {self.path}: {err}") from err

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.stats.connections += 1
        try:
            await _Connection(self, reader, writer).run()
        except ProtocolError as err:
            self.stats.protocol_errors += 1
            self.last_protocol_error = err
            log.warning("%s: closing an NBD connection: %s", self.tap.name, err)
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            log.info("%s: NBD client went away: %s", self.tap.name, type(err).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: NBD connection failed", self.tap.name)
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


class _Done(Exception):
    """The client ended the session (ABORT or DISC)."""


class _Connection:
    """One client: the option haggling, then the transmission loop."""

    def __init__(
        self, server: NBDServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.tap = server.tap
        self.reader = reader
        self.writer = writer

    async def run(self) -> None:
        try:
            if await self.negotiate():
                await self.transmission()
        except _Done:
            pass

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    # ---- negotiation -------------------------------------------------------------------

    async def negotiate(self) -> bool:
        """Return True when the client moved on to transmission."""
        await self._send(p.greeting())
        flags = p.parse_client_flags(await self.reader.readexactly(p.CLIENT_FLAGS.size))
        no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        while True:
            hdr = p.parse_option_header(await self.reader.readexactly(p.OPTION_HEADER.size))
            data = await self.reader.readexactly(hdr.length) if hdr.length else b""
            opt = hdr.option
            if opt == p.Opt.EXPORT_NAME:
                if data.decode(errors="replace") not in (self.server.export_name, ""):
                    # No error reply exists for this option: the protocol says close.
                    raise ProtocolError(f"NBD: unknown export {data[:64]!r}")
                await self._send(p.export_name_answer(self.tap.size, no_zeroes=no_zeroes))
                return True
            if opt == p.Opt.ABORT:
                await self._send(p.option_reply(opt, p.Rep.ACK))
                raise _Done
            if opt == p.Opt.LIST:
                if data:
                    await self._opt_error(opt, p.Rep.ERR_INVALID, "LIST takes no data")
                    continue
                await self._send(
                    p.option_reply(opt, p.Rep.SERVER, p.rep_server(self.server.export_name))
                    + p.option_reply(opt, p.Rep.ACK)
                )
                continue
            if opt in (p.Opt.INFO, p.Opt.GO):
                if await self._info(opt, data):
                    return True
                continue
            await self._opt_error(opt, p.Rep.ERR_UNSUP, f"option {opt} is not supported")

    async def _opt_error(self, opt: int, rep: p.Rep, message: str) -> None:
        self.server.stats.option_errors += 1
        await self._send(p.option_error(opt, rep, message))

    async def _info(self, opt: int, data: bytes) -> bool:
        try:
            req = p.parse_info_request(data)
        except ProtocolError as err:
            await self._opt_error(opt, p.Rep.ERR_INVALID, err.reason)
            return False
        if req.name not in (self.server.export_name, ""):
            await self._opt_error(opt, p.Rep.ERR_UNKNOWN, f"no export named {req.name!r}")
            return False
        out = [p.option_reply(opt, p.Rep.INFO, p.info_export(self.tap.size))]
        if p.Info.BLOCK_SIZE in req.requests:
            info = p.info_block_size(1, PREFERRED_BLOCK, self.server.max_request)
            out.append(p.option_reply(opt, p.Rep.INFO, info))
        if p.Info.NAME in req.requests:
            out.append(p.option_reply(opt, p.Rep.INFO, p.info_name(self.server.export_name)))
        if p.Info.DESCRIPTION in req.requests and self.server.description:
            desc = p.info_description(self.server.description)
            out.append(p.option_reply(opt, p.Rep.INFO, desc))
        out.append(p.option_reply(opt, p.Rep.ACK))
        await self._send(b"".join(out))
        return opt == p.Opt.GO

    # ---- transmission ------------------------------------------------------------------

    async def transmission(self) -> None:
        while True:
            req = p.parse_request(await self.reader.readexactly(p.REQUEST.size))
            self.server.stats.requests += 1
            payload = b""
            if req.type == p.Cmd.WRITE:
                if req.length > self.server.max_request:
                    raise ProtocolError(
                        f"NBD: write of {req.length} bytes (at most {self.server.max_request})"
                    )
                payload = await self.reader.readexactly(req.length) if req.length else b""
            if req.type == p.Cmd.DISC:
                raise _Done
            err, data = await self.handle(req, payload)
            if err == p.Errno.EINVAL:
                self.server.stats.einval += 1
            elif err == p.Errno.EIO:
                self.server.stats.eio += 1
            await self._send(p.simple_reply(req.cookie, err) + (data if err == 0 else b""))

    async def handle(self, req: p.Request, payload: bytes) -> tuple[int, bytes]:
        """Run one request; return (errno, read data)."""
        allowed = p.ALLOWED_FLAGS.get(req.type)
        if allowed is None or req.flags & ~allowed:
            return p.Errno.EINVAL, b""
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        end = req.offset + req.length
        size = self.tap.size
        try:
            if req.type == p.Cmd.READ:
                if req.length > self.server.max_request or end > size:
                    return p.Errno.EINVAL, b""
                return 0, await self.tap.read(req.offset, req.length)
            if req.type == p.Cmd.WRITE:
                if end > size:
                    return p.Errno.ENOSPC, b""
                await self.tap.write(req.offset, payload, fua=fua)
            elif req.type == p.Cmd.FLUSH:
                if req.offset or req.length:
                    return p.Errno.EINVAL, b""
                await self.tap.flush()
            elif req.type == p.Cmd.TRIM:
                if end > size:
                    return p.Errno.EINVAL, b""
                await self.tap.trim(req.offset, req.length, fua=fua)
            elif req.type == p.Cmd.WRITE_ZEROES:
                if end > size:
                    return p.Errno.ENOSPC, b""
                await self.tap.write_zeroes(req.offset, req.length, fua=fua)
            else:  # pragma: no cover - ALLOWED_FLAGS lists exactly the commands above
                return p.Errno.EINVAL, b""
        except KemariError as err:
            log.error(
                "%s: NBD %s at %d+%d: %s",
                self.tap.name,
                p.Cmd(req.type).name,
                req.offset,
                req.length,
                err,
            )
            return p.Errno.EIO, b""
        return 0, b""


__all__ = [
    "MAX_REQUEST",
    "BlockTap",
    "BlockTapStats",
    "NBDServer",
    "NBDServerStats",
    "TapMode",
]
