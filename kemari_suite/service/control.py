"""The agent's control socket: one JSON object per line, request then reply.

``kemari status``, ``kemari checkpoint`` and ``kemari failover`` talk to a running agent
through ``<run_dir>/control.sock``. A request is ``{"cmd": NAME, ...args}``; the reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kemari_suite.errors import ConnectError, KemariError

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Serves control requests with the handlers given."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply: dict[str, Any]
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("a request is an object with a string 'cmd'")
                    handler = self.handlers.get(req["cmd"])
                    if handler is None:
                        known = ", ".join(sorted(self.handlers))
                        raise ValueError(f"unknown command {req['cmd']!r} (known: {known})")
                    reply = {"ok": True, "result": await handler(req)}
                except (ValueError, KemariError) as err:
                    reply = {"ok": False, "error": str(err)}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

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
        ConnectError: no agent answers on ``path``.
        KemariError: the agent answered with an error.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as err:
        s.close()
        raise ConnectError(f"agent at {path}", err.strerror or str(err)) from err
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectError(f"agent at {path}", "closed the connection")
            buf += chunk
    except TimeoutError as err:
        raise ConnectError(f"agent at {path}", f"no answer in {timeout} s") from err
    except OSError as err:
        # The agent went away mid-request (it stopped, or changed roles).
        raise ConnectError(f"agent at {path}", err.strerror or str(err)) from err
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise KemariError(str(reply.get("error")))
    return reply.get("result")
