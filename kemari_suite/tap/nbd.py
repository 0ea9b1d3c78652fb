"""The block tap: the guest disk as an NBD export served by the agent.

Two layers:

* :class:`BlockTap` holds the policy of the data path. In PROTECTED mode a write (trim,
  write-zeroes, flush) is logged in the open epoch of the :class:`EpochLog` and
  acknowledged at once, so QMP ``stop`` (which drains in-flight I/O and flushes) never
  waits on a checkpoint; it reports ``on_event(kind, epoch)``. Once the primary calls
  :meth:`BlockTap.commit_epoch`, a single applier task writes the committed epochs to the
  backend on a worker thread, in order, flushing after every epoch that had a FLUSH or a
  FUA write. Reads see pending writes through the log's overlay. In UNPROTECTED mode
  (no secondary) every logged epoch is applied and flushed first; from then on a write
  is applied, and on FLUSH/FUA flushed, before it is acknowledged.
* :class:`NBDServer` speaks NBD on a unix socket (wire format in
  :mod:`kemari_suite.tap.nbdproto`) and turns requests into :class:`BlockTap` calls.
  Unsupported options get ``NBD_REP_ERR_UNSUP``, bad requests ``EINVAL`` (or
  ``ENOSPC`` for writes past the end), backend failures ``EIO``. A malformed stream
  (bad magic, oversized payload) closes that connection with a logged
  :class:`~kemari_suite.errors.ProtocolError`; the server keeps serving.

Guarantees the primary relies on::

    durable(e)       every write logged in an epoch <= e is on the backend, and
                     flushed if its epoch had a FLUSH or FUA write
    output_ready(e)  every epoch <= e that had a FLUSH or FUA write is durable:
                     with the acknowledgement of e, the output rule for e's frames
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kemari_suite.errors import DiskError, KemariError, ProtocolError, TapError
from kemari_suite.tap import nbdproto as p
from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.epochs import EpochLog, IOOp, OpKind, ops_to_writes
from kemari_suite.tap.events import EpochSource, EventSink, IOEvent, TapMode
from kemari_suite.tap.overlay import Piece, assemble

log = logging.getLogger(__name__)

#: Largest READ or WRITE payload accepted (QEMU's NBD client sends at most 32 MiB).
MAX_REQUEST = 32 << 20
PREFERRED_BLOCK = 4096


@dataclass
class BlockTapStats:
    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0
    trims: int = 0
    write_zeroes: int = 0
    flushes: int = 0
    fua_writes: int = 0
    written_through: int = 0
    epochs_applied: int = 0
    backend_flushes: int = 0
    errors: int = 0


class BlockTap:
    """Log, overlay and applier between NBD requests and the disk backend.

    ``epoch_source()`` gives the primary's open epoch; ``on_event(kind, epoch)`` is told of
    each write and flush in PROTECTED mode; ``on_durable(epoch)`` is told when every write
    of epochs ``<= epoch`` is applied and flushed (the secondary may drop those logs).
    Use from one event loop; ``close()`` at the end.
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        epoch_source: EpochSource,
        mode: TapMode,
        on_event: EventSink | None = None,
        on_durable: Callable[[int], None] | None = None,
        name: str = "block",
    ) -> None:
        self.backend = backend
        self.name = name
        self.epoch_source = epoch_source
        self.on_event = on_event
        self.on_durable = on_durable
        self.log = EpochLog()
        self.mode = mode
        self.stats = BlockTapStats()
        #: Set when the backend failed; from then on writes get EIO and waiters fail.
        self.error: TapError | None = None
        #: Every write of epochs <= this is applied and flushed.
        self.flushed_through = -1
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-apply")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-read")
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._draining = False
        if mode is TapMode.UNPROTECTED:
            self._drained.set()
        self._unflushed = False
        #: Writes applied since the last backend flush (apply thread only).
        self._dirty = False
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._applier: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return int(self.backend.size)

    # ---- guest I/O ---------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TapError(self.name, f"{offset}+{length} outside the {self.size}-byte disk")

    async def read(self, offset: int, length: int) -> bytes:
        """The guest's view of ``[offset, offset + length)``, pending writes included.

        Raises:
            TapError: outside the disk, or the backend failed.
        """
        self._check_range(offset, length)
        self.stats.reads += 1
        self.stats.read_bytes += length
        pieces = self.log.read_pieces(offset, length)
        gaps = [x for x in pieces if x.source == "backend"]
        got: dict[int, bytes] = {}
        if gaps:
            loop = asyncio.get_running_loop()
            try:
                got = await loop.run_in_executor(self._readers, self._read_gaps, gaps)
            except (DiskError, OSError) as err:
                self.stats.errors += 1
                raise TapError(self.name, f"read {offset}+{length}: {err}") from err
        return assemble(pieces, got)

    def _read_gaps(self, gaps: list[Piece]) -> dict[int, bytes]:
        return {g.offset: self.backend.read(g.offset, g.length) for g in gaps}

    def _event(self, kind: IOEvent, epoch: int) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, epoch)
            except Exception:  # a broken sink must not fail the guest's I/O
                log.exception("%s: on_event(%s, %d) failed", self.name, kind, epoch)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """A guest write: logged (PROTECTED) or written through (UNPROTECTED).

        Raises:
            TapError: outside the disk, a log misuse, or the backend failed.
        """
        self._check_range(offset, len(data))
        self.stats.writes += 1
        self.stats.write_bytes += len(data)
        self.stats.fua_writes += int(fua)
        if not data:
            return
        if self.mode is TapMode.PROTECTED:
            epoch = self.epoch_source()
            self.log.record_write(epoch, offset, data, fua=fua)
            self._event(IOEvent.WRITE, epoch)
            if fua:
                self._event(IOEvent.FLUSH, epoch)
            return
        await self._write_through([(offset, bytes(data))], flush=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """A guest trim; reads as zeros afterwards. Raises TapError as :meth:`write`."""
        self._check_range(offset, length)
        self.stats.trims += 1
        await self._zero(offset, length, fua=fua, trim=True)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        """A guest write-zeroes. Raises TapError as :meth:`write`."""
        self._check_range(offset, length)
        self.stats.write_zeroes += 1
        await self._zero(offset, length, fua=fua, trim=False)

    async def _zero(self, offset: int, length: int, *, fua: bool, trim: bool) -> None:
        if length == 0:
            return
        if self.mode is TapMode.PROTECTED:
            epoch = self.epoch_source()
            if trim:
                self.log.record_trim(epoch, offset, length, fua=fua)
            else:
                self.log.record_write_zeroes(epoch, offset, length, fua=fua)
            self._event(IOEvent.WRITE, epoch)
            if fua:
                self._event(IOEvent.FLUSH, epoch)
            return
        writes = ops_to_writes([IOOp(OpKind.WRITE_ZEROES, offset, length)])
        await self._write_through(writes, flush=fua)

    async def flush(self) -> None:
        """A guest flush: logged (PROTECTED) or a backend flush (UNPROTECTED).

        Raises:
            TapError: a log misuse, or the backend failed.
        """
        self.stats.flushes += 1
        if self.mode is TapMode.PROTECTED:
            epoch = self.epoch_source()
            self.log.record_flush(epoch)
            self._event(IOEvent.FLUSH, epoch)
            return
        await self._write_through([], flush=True)

    async def _write_through(self, writes: list[tuple[int, bytes]], *, flush: bool) -> None:
        # Logged epochs first: their overlay must be gone before this write is visible.
        await self._drained.wait()
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, self._apply_sync, writes, flush)
        except (DiskError, OSError) as err:
            self.stats.errors += 1
            raise TapError(self.name, f"write-through: {err}") from err
        self.stats.written_through += 1

    def _apply_sync(self, writes: list[tuple[int, bytes]], flush: bool) -> None:
        # Runs on the single apply thread only, so _dirty needs no lock.
        if writes:
            self.backend.apply(writes)
            self._dirty = True
        # QEMU's `stop` flushes every disk, so nearly every epoch carries a FLUSH; a
        # flush with nothing applied since the last one is skipped.
        if flush and self._dirty:
            self.backend.flush()
            self._dirty = False
            self.stats.backend_flushes += 1

    # ---- the primary's side -----------------------------------------------------------

    def io_log(self, epoch: int) -> bytes:
        """Epoch ``epoch``'s IOLog payload: pass as ``PrimaryAgent.io_log_provider``."""
        return self.log.serialize(epoch)

    def commit_epoch(self, epoch: int) -> None:
        """The secondary acknowledged ``epoch``: apply every logged epoch ``<= epoch``.

        Returns at once; await :meth:`durable` or :meth:`output_ready` for the result.
        Ignored in UNPROTECTED mode (everything is written through there).
        """
        if self.mode is TapMode.UNPROTECTED:
            return
        self.log.committed(epoch)
        self._kick()

    async def durable(self, epoch: int) -> None:
        """Resolve once every write of epochs ``<= epoch`` is applied (and flushed where
        its epoch had a FLUSH or FUA write).

        Raises:
            TapError: the backend failed or the tap was closed.
        """

        def done() -> bool:
            return not self.log.pending_through(epoch)

        await self._wait(done)

    async def output_ready(self, epoch: int) -> None:
        """Resolve once every epoch ``<= epoch`` that had a FLUSH or a FUA write is durable.

        Together with the acknowledgement of ``epoch`` this is the output rule: the
        network tap may then release ``epoch``'s frames.

        Raises:
            TapError: the backend failed or the tap was closed.
        """

        def done() -> bool:
            return not any(r.needs_flush for r in self.log.pending_through(epoch))

        await self._wait(done)

    async def _wait(self, done: Callable[[], bool]) -> None:
        if done():
            return
        if self.error is not None:
            raise self.error
        if self._closed:
            raise TapError(self.name, "closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((done, fut))
        await fut

    def _check_waiters(self) -> None:
        keep = []
        for done, fut in self._waiters:
            if fut.done():
                continue
            if done():
                fut.set_result(None)
            elif self.error is not None:
                fut.set_exception(self.error)
            else:
                keep.append((done, fut))
        self._waiters = keep

    async def set_unprotected(self) -> None:
        """No secondary: apply and flush every logged epoch, then write through.

        Returns once the log is drained. Raises TapError if the backend failed.
        """
        if self.mode is TapMode.PROTECTED:
            log.info(
                "%s: unprotected: writing %d logged epochs through",
                self.name,
                len(self.log.pending_epochs()),
            )
            self.mode = TapMode.UNPROTECTED
            self._draining = True
            self._drained.clear()
            self._kick()
        await self._drained.wait()
        if self.error is not None:
            raise self.error

    def set_protected(self) -> None:
        """A secondary takes over: from now on writes are logged in the open epoch.

        Call it where the primary's open epoch is the first one the secondary will get
        (writes logged earlier than that epoch closes are shipped with it).

        Raises:
            TapError: the log is still being drained (await ``set_unprotected()`` first).
        """
        if self.mode is TapMode.PROTECTED:
            return
        if not self._drained.is_set():
            raise TapError(self.name, "still writing the log through")
        self.mode = TapMode.PROTECTED

    # ---- applier -----------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closed:
            return
        if self._applier is None or self._applier.done():
            self._applier = asyncio.get_running_loop().create_task(
                self._apply_loop(), name=f"{self.name}-applier"
            )
        self._wake.set()

    async def _apply_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            rec = self.log.next_to_apply(include_uncommitted=self._draining)
            if rec is None:
                if (self._unflushed or self._draining) and not await self._flush_idle(loop):
                    return
                if self._draining:
                    self._draining = False
                    self._drained.set()
                self._check_waiters()
                self._wake.clear()
                await self._wake.wait()
                continue
            n_ops = len(rec.ops)
            writes = ops_to_writes(rec.ops)
            try:
                await loop.run_in_executor(self._io, self._apply_sync, writes, rec.needs_flush)
            except (DiskError, OSError) as err:
                self._fail(TapError(self.name, f"applying epoch {rec.epoch}: {err}"))
                return
            if len(rec.ops) != n_ops:
                self._fail(TapError(self.name, f"epoch {rec.epoch} grew while it was applied"))
                return
            self.log.applied(rec.epoch, force=self._draining)
            self.stats.epochs_applied += 1
            if rec.needs_flush:
                self._unflushed = False
                self._set_flushed(rec.epoch)
            else:
                self._unflushed = True
            self._check_waiters()

    async def _flush_idle(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Caught up: make what was applied durable so the secondary can drop its logs.
        Returns False if the backend failed."""
        through = self.log.applied_through
        try:
            await loop.run_in_executor(self._io, self._apply_sync, [], True)
        except (DiskError, OSError) as err:
            self._fail(TapError(self.name, f"flush: {err}"))
            return False
        self._unflushed = False
        self._set_flushed(through)
        return True

    def _set_flushed(self, epoch: int) -> None:
        if epoch > self.flushed_through:
            self.flushed_through = epoch
            if self.on_durable is not None:
                try:
                    self.on_durable(epoch)
                except Exception:
                    log.exception("%s: on_durable(%d) failed", self.name, epoch)

    def _fail(self, err: TapError) -> None:
        log.error("%s: %s", self.name, err)
        self.stats.errors += 1
        self.error = err
        self._draining = False
        self._drained.set()  # write-through waiters see the error
        self._check_waiters()

    # ---- status and teardown -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "pending_epochs": self.log.pending_epochs(),
            "pending_bytes": self.log.pending_bytes(),
            "committed_through": self.log.committed_through,
            "applied_through": self.log.applied_through,
            "flushed_through": self.flushed_through,
            "error": str(self.error) if self.error else None,
            **asdict(self.stats),
        }

    async def close(self) -> None:
        """Stop the applier (pending writes stay unapplied: the secondary holds them) and
        fail every waiter."""
        self._closed = True
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._applier
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(TapError(self.name, "closed"))
        self._waiters.clear()
        self._drained.set()
        self._io.shutdown(wait=True)
        self._readers.shutdown(wait=True)


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
