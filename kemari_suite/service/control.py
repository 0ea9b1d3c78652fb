"""The agent's control socket: JSON-lines frames, one request then its reply.

``kemari status``, ``kemari checkpoint`` and ``kemari failover`` talk to a running agent
through ``<run_dir>/control.sock``. A request is ``{"cmd": NAME, ...args}``; the reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Frames are
:mod:`kemari_suite.protocol.framing`'s; a request may hold :data:`MAX_REQUEST` bytes, a
reply :data:`MAX_REPLY`. A malformed request is answered with an error and the
connection goes on; an oversized or truncated one is answered, then the connection is
closed (the stream is no longer between frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kemari_suite.errors import ConnectError, KemariError, ProtocolError
from kemari_suite.protocol import framing

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

#: Largest request frame, in bytes.
MAX_REQUEST = 1 << 20
#: Largest reply frame, in bytes (a status carries histories).
MAX_REPLY = 16 << 20


def _error(reason: str) -> dict[str, Any]:
    return {"ok": False, "error": reason}


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves control requests with the handlers given."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen at ``path``; a stale socket file (no one answers) is replaced.

        Raises:
            KemariError: a live agent already answers at ``path`` (a second agent for the
                same VM would cut the first one off from its operators).
        """
        if _answers(self.path):
            raise KemariError(f"another agent already answers at {self.path}: stop it first")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await framing.read_line(reader, MAX_REQUEST)
                except ProtocolError as err:
                    await framing.write_frame(writer, _error(f"bad request: {err.reason}"))
                    break
                if line is None:
                    break
                writer.write(await self.answer(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> bytes:
        """The reply frame to one request frame (given without its newline)."""
        try:
            req = framing.parse(line)
        except ProtocolError as err:
            return framing.encode(_error(f"bad request: {err.reason}"))
        try:
            cmd = req.get("cmd")
            if not isinstance(cmd, str):
                raise ValueError("a request is an object with a string 'cmd'")
            handler = self.handlers.get(cmd)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise ValueError(f"unknown command {cmd!r} (known: {known})")
            reply = {"ok": True, "result": await handler(req)}
        except (ValueError, KemariError) as err:
            return framing.encode(_error(str(err)), default=str)
        try:
            return framing.encode(reply, limit=MAX_REPLY, default=str)
        except ValueError as err:
            return framing.encode(_error(f"the result cannot be sent: {err}"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, cmd: str, *, timeout: float = 30.0, **args: Any) -> Any:
    """Send one control request and return its result (synchronous, for the CLI).

    Raises:
        ConnectError: no agent answers on ``path``, or it answers garbage.
        KemariError: the agent answered with an error.
        ValueError: ``args`` hold something JSON cannot.
    """
    frame = framing.encode({"cmd": cmd, **args}, limit=MAX_REQUEST)
    peer = f"agent at {path}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as err:
        s.close()
        raise ConnectError(peer, err.strerror or str(err)) from err
    decoder = framing.Decoder(MAX_REPLY)
    try:
        s.sendall(frame)
        while (reply := decoder.next_frame()) is None:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectError(peer, "closed the connection")
            decoder.feed(chunk)
    except ProtocolError as err:
        raise ConnectError(peer, f"bad reply: {err.reason}") from err
    except TimeoutError as err:
        raise ConnectError(peer, f"no answer in {timeout} s") from err
    except OSError as err:
        # The agent went away mid-request (it stopped, or changed roles).
        raise ConnectError(peer, err.strerror or str(err)) from err
    finally:
        s.close()
    if not reply.get("ok"):
        raise KemariError(str(reply.get("error")))
    return reply.get("result")
