"""The agent channel without QEMU: frames, the decoder, the agent and the client through
in-memory sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.errors import ProtocolError
from kemari_suite.klab import wire
from kemari_suite.klab.agent import AgentClient, AgentError, ChannelState
from kemari_suite.klab.guestagent import Agent, find_port, run_command, write_all
from kemari_suite.klab.wire import Decoder, Done, Ping, Pong, Run, encode

SAMPLES: list[wire.Message] = [
    Ping(2**64 - 1),
    Pong(7, 12345, b"6.1.0-57-cloud-amd64"),
    Run(1, 5000, b"echo hi", b""),
    Run(2**32 - 1, 0, b"cat", b"\x00" * 70000),
    Done(3, -9, 10**9, Done.TIMED_OUT | Done.TRUNCATED, b"out", b"err"),
    Done(4, 0, 0, 0, b"", b""),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: wire.Message) -> None:
    assert Decoder().feed(encode(msg)) == [msg]


def test_decoder_takes_bytes_one_at_a_time() -> None:
    stream = b"".join(encode(m) for m in SAMPLES)
    dec = Decoder()
    got: list[wire.Message] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == SAMPLES


def test_header_layout_is_the_documented_one() -> None:
    frame = encode(Ping(1))
    assert frame[:4] == b"KLAB" and frame[4] == Ping.TYPE and frame[5] == wire.VERSION
    assert int.from_bytes(frame[8:12], "little") == 8 and len(frame) == 12 + 8


@pytest.mark.parametrize(
    "frame",
    [
        b"XLAB" + encode(Ping(1))[4:],
        encode(Ping(1))[:4] + bytes([99]) + encode(Ping(1))[5:],
        encode(Ping(1))[:5] + bytes([9]) + encode(Ping(1))[6:],
        wire.HEADER.pack(wire.MAGIC, Ping.TYPE, wire.VERSION, 0, wire.MAX_BODY + 1),
        wire.HEADER.pack(wire.MAGIC, Ping.TYPE, wire.VERSION, 0, 4) + b"abcd",
        wire.HEADER.pack(wire.MAGIC, Pong.TYPE, wire.VERSION, 0, 20) + b"\0" * 16 + b"\xff" * 4,
        wire.HEADER.pack(wire.MAGIC, Ping.TYPE, wire.VERSION, 0, 9) + b"\0" * 9,
    ],
    ids=["magic", "type", "version", "oversize", "short", "blob", "trailing"],
)
def test_garbage_fails_and_the_failure_sticks(frame: bytes) -> None:
    dec = Decoder()
    with pytest.raises(ProtocolError):
        dec.feed(frame)
    with pytest.raises(ProtocolError):
        dec.feed(encode(Ping(1)))


def test_run_command_reports_code_output_and_input() -> None:
    done = run_command(Run(5, 10_000, b"cat; echo err >&2; exit 3", b"in"))
    assert (done.req_id, done.exit_code, done.stdout, done.stderr) == (5, 3, b"in", b"err\n")
    assert done.flags == 0


def test_run_command_kills_the_whole_group_on_timeout() -> None:
    done = run_command(Run(6, 300, b"sleep 30 & sleep 30; echo never", b""))
    assert done.flags & Done.TIMED_OUT
    assert done.duration_us < 10_000_000
    assert b"never" not in done.stdout


def test_find_port_by_name(tmp_path: Path) -> None:
    for name, port in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "klab.agent")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "name").write_text(port + "\n")
    assert find_port(tmp_path) == Path("/dev/vport1p1")
    with pytest.raises(FileNotFoundError):
        find_port(tmp_path, "other")


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket served by the guest agent's own code (what QEMU's chardev is)."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            Agent(lambda frame: write_all(conn.fileno(), frame)).serve(
                conn.fileno(), reconnect_wait=None
            )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    server.close()


def test_client_runs_commands_through_the_agent(agent_socket: Path) -> None:
    client = AgentClient("l1x", agent_socket)
    pong = client.wait_ready(timeout=10)
    assert pong.release
    assert client.run("echo hello").stdout == "hello\n"
    assert client.run("exit 4", check=False).exit_code == 4
    with pytest.raises(AgentError) as info:
        client.run("echo bad >&2; exit 2")
    assert info.value.exit_code == 2 and "bad" in info.value.stderr
    client.put_file(str(agent_socket.parent / "sub" / "f.txt"), "content\n", mode=0o600)
    assert (agent_socket.parent / "sub" / "f.txt").read_text() == "content\n"
    assert client.run("exit 0", timeout=5).ok
    client.close()
    assert client.state_history == [ChannelState.NEW, ChannelState.READY, ChannelState.CLOSED]
    with pytest.raises(AgentError):
        client.run("true")


def test_client_fails_every_call_when_the_channel_drops(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer_once_then_hang_up() -> None:
        conn, _ = server.accept()
        with conn:
            (ping,) = Decoder().feed(conn.recv(100))
            assert isinstance(ping, Ping)
            conn.sendall(encode(Pong(ping.nonce, 1, b"x")))
            conn.recv(100)  # the Run: never answered

    t = threading.Thread(target=answer_once_then_hang_up, daemon=True)
    t.start()
    client = AgentClient("l1x", path)
    client.wait_ready(timeout=10)
    with pytest.raises(AgentError, match="channel closed"):
        client.run("true")
    assert client.state is ChannelState.FAILED
    with pytest.raises(AgentError, match="not ready"):
        client.run("true")
    server.close()


def test_wait_ready_stops_when_qemu_is_gone(tmp_path: Path) -> None:
    client = AgentClient("l1x", tmp_path / "nothing.sock", alive=lambda: False)
    with pytest.raises(AgentError, match="QEMU exited"):
        client.wait_ready(timeout=30)


def test_a_large_input_reaches_a_slow_reader(tmp_path: Path) -> None:
    """Regression: 8 MiB of stdin to an L1 that stalls 3 s before reading must not time
    out the send (the read loop's 1 s timeout once leaked into it)."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def stall_then_serve() -> None:
        conn, _ = server.accept()
        with conn:
            dec = Decoder()
            (ping,) = dec.feed(conn.recv(100))
            assert isinstance(ping, Ping)
            conn.sendall(encode(Pong(ping.nonce, 1, b"x")))
            time.sleep(3)
            while True:
                for msg in dec.feed(conn.recv(1 << 16)):
                    assert isinstance(msg, Run)
                    conn.sendall(encode(run_command(msg)))
                    return

    t = threading.Thread(target=stall_then_serve, daemon=True)
    t.start()
    client = AgentClient("l1x", path)
    client.wait_ready(timeout=10)
    data = bytes(range(256)) * (8 << 12)  # 8 MiB
    assert client.run("wc -c", stdin=data, timeout=60).stdout.strip() == str(len(data))
    client.close()
    server.close()
