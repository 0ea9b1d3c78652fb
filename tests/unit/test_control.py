"""The control socket: requests and replies as JSON-lines frames."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.errors import ConnectError, KemariError, ReplicationError
from kemari_suite.service import control
from kemari_suite.service.control import ControlServer


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # A short directory: a unix socket path holds at most 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="kctl-", dir="/tmp"))
    try:
        yield d / "control.sock"
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def h_status(req: dict[str, Any]) -> Any:
    return {"state": "protected", "run_dir": Path("/run/kemari"), "args": req}


async def h_refuse(req: dict[str, Any]) -> Any:
    raise ReplicationError("not protected", epoch=3)


HANDLERS = {"status": h_status, "refuse": h_refuse}


def with_server(path: Path, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        server = ControlServer(path, dict(HANDLERS))
        await server.start()
        try:
            await body()
        finally:
            await server.close()
        assert not path.exists()

    asyncio.run(main())


def test_request_and_reply(sock_path: Path) -> None:
    async def body() -> None:
        result = await asyncio.to_thread(control.request, sock_path, "status", timeout=5, n=1)
        # Values JSON has no type for travel as strings.
        assert result == {
            "state": "protected",
            "run_dir": "/run/kemari",
            "args": {"cmd": "status", "n": 1},
        }
        with pytest.raises(KemariError, match="unknown command 'nope' \\(known: refuse, status"):
            await asyncio.to_thread(control.request, sock_path, "nope", timeout=5)
        with pytest.raises(KemariError, match="epoch 3: not protected"):
            await asyncio.to_thread(control.request, sock_path, "refuse", timeout=5)

    with_server(sock_path, body)


def test_a_second_agent_never_takes_a_live_agents_socket(sock_path: Path) -> None:
    async def body() -> None:
        second = ControlServer(sock_path, dict(HANDLERS))
        with pytest.raises(KemariError, match="another agent already answers"):
            await second.start()
        # The first agent still answers.
        result = await asyncio.to_thread(control.request, sock_path, "status", timeout=5)
        assert result["state"] == "protected"

    with_server(sock_path, body)


def test_a_stale_socket_file_is_replaced(sock_path: Path) -> None:
    # A crashed agent leaves its socket file behind; no one listens on it.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock_path))
    assert sock_path.exists()

    async def body() -> None:
        result = await asyncio.to_thread(control.request, sock_path, "status", timeout=5)
        assert result["state"] == "protected"

    with_server(sock_path, body)


async def exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, read reply lines until the agent hangs up or goes quiet."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    out = []
    try:
        while line := await asyncio.wait_for(reader.readline(), 5):
            out.append(json.loads(line))
    finally:
        writer.close()
    return out


def test_a_malformed_request_is_answered_and_the_connection_goes_on(sock_path: Path) -> None:
    async def body() -> None:
        replies = await exchange(
            sock_path, b'not json\n[1]\n{"cmd": 7}\n{"cmd":"status"}\n{"cmd":"st'
        )
        assert [r["ok"] for r in replies] == [False, False, False, True, False]
        assert "bad request" in replies[0]["error"] and "not JSON" in replies[0]["error"]
        assert "not an object" in replies[1]["error"]
        assert "string 'cmd'" in replies[2]["error"]
        assert replies[3]["result"]["state"] == "protected"
        assert "truncated" in replies[4]["error"]

    with_server(sock_path, body)


def test_an_oversized_request_is_answered_then_the_connection_closes(sock_path: Path) -> None:
    async def body() -> None:
        big = b'{"cmd":"status","x":"' + b"y" * control.MAX_REQUEST + b'"}\n'
        replies = await exchange(sock_path, big + b'{"cmd":"status"}\n')
        assert len(replies) == 1
        assert f"exceeds the limit of {control.MAX_REQUEST} bytes" in replies[0]["error"]

    with_server(sock_path, body)


def test_answer_without_a_socket() -> None:
    server = ControlServer(Path("/nonexistent/control.sock"), dict(HANDLERS))

    async def main() -> None:
        frame = await server.answer(b'{"cmd":"status"}')
        assert frame.endswith(b"\n") and frame.count(b"\n") == 1
        assert json.loads(frame)["ok"] is True

    asyncio.run(main())


def test_no_agent_is_a_connect_error(sock_path: Path) -> None:
    with pytest.raises(ConnectError, match="agent at"):
        control.request(sock_path, "status", timeout=2)


def fake_agent(path: Path, reply: bytes, body: Callable[[], Awaitable[None]]) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(path))
        try:
            await body()
        finally:
            server.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"", "closed the connection"),
        (b'{"ok":true', "closed the connection"),
        (b"garbage\n", "bad reply.*not JSON"),
        (b"[true]\n", "bad reply.*not an object"),
    ],
)
def test_a_bad_reply_is_a_connect_error(sock_path: Path, reply: bytes, match: str) -> None:
    async def body() -> None:
        with pytest.raises(ConnectError, match=match):
            await asyncio.to_thread(control.request, sock_path, "status", timeout=5)

    fake_agent(sock_path, reply, body)
