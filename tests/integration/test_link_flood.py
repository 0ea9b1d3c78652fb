"""A flood of idle and garbage connections on the secondary's replication listener does
not keep a real primary out: it connects, authenticates (TLS on) and is answered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from kemari_suite.errors import ConnectError
from kemari_suite.protocol import link as linkmod
from kemari_suite.protocol import tls, wire
from kemari_suite.protocol.link import Link, connect, serve

KEY = b"f" * 32
#: Idle connections the flood keeps open at any time (several times the bound).
IDLE = 4 * linkmod.MAX_PENDING


#: The flood, run in a process of its own (a thread would share the GIL with the
#: listener and stall). argv: port, status file, the opening (hex) to send before
#: garbage, IDLE. It opens connections as fast as it can: half stay idle (the oldest is
#: dropped beyond IDLE), half send garbage, every other one after a valid opening. It
#: writes how many it opened to the status file.
FLOOD = """
import os, socket, sys, time
from collections import deque
port, status, idle_max = int(sys.argv[1]), sys.argv[2], int(sys.argv[4])
preamble = bytes.fromhex(sys.argv[3])
idle, opened, last = deque(), 0, 0.0
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError:
        continue
    opened += 1
    if opened % 2:
        idle.append(s)
        while len(idle) > idle_max:
            idle.popleft().close()
    else:
        try:
            s.sendall((preamble if opened % 4 == 0 else b"") + os.urandom(256))
        except OSError:
            pass
        s.close()
    if time.monotonic() - last > 0.1:
        last = time.monotonic()
        with open(status + ".tmp", "w") as f:
            f.write(str(opened))
        os.replace(status + ".tmp", status)
"""


class Flood:
    """The flood process (see ``FLOOD``); stopped by its PID. ``opening``: the valid
    start some of its garbage connections send (the link preamble by default;
    ``test_witness_flood`` gives a witness request with a wrong MAC)."""

    def __init__(self, port: int, status: Path, opening: bytes | None = None) -> None:
        self.status = status
        if opening is None:
            opening = tls.Preamble(tls=True).encode()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(port), str(status), opening.hex(), str(IDLE)]
        )

    @property
    def opened(self) -> int:
        try:
            return int(self.status.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_a_real_primary_connects_through_a_flood(tmp_path: Path) -> None:
    async def main() -> None:
        rejects: list[str] = []
        answered: list[str] = []

        async def on_link(link: Link) -> None:
            try:
                msg = await link.recv()
                if isinstance(msg, wire.DeviceState):
                    await link.send(wire.Ack(epoch=msg.epoch))
                    answered.append(link.peer)
                await link.recv()
            except (ConnectionError, wire.ProtocolError):
                pass
            finally:
                link.close()

        server = await serve(
            "127.0.0.1",
            0,
            key=KEY,
            node_id="sec",
            on_link=on_link,
            on_reject=lambda _peer, err: rejects.append(str(err)),
        )
        port = server.sockets[0].getsockname()[1]
        flood = Flood(port, tmp_path / "flood-status")
        try:
            while flood.opened < 200:  # the flood is on and the bound is reached
                assert flood.proc.poll() is None, "the flood process ended"
                await asyncio.sleep(0.1)
            rejects_before = len(rejects)
            attempts = 0
            errors: list[str] = []
            deadline = time.monotonic() + 60
            link: Link | None = None
            while link is None and time.monotonic() < deadline:
                attempts += 1
                try:
                    link = await connect(f"127.0.0.1:{port}", key=KEY, node_id="pri", timeout=5)
                except (ConnectError, ConnectionError) as err:
                    # The primary agent retries the same way (after 1 s).
                    errors.append(str(err))
                    await asyncio.sleep(0.2)
            assert link is not None, f"never connected in {attempts} attempts: {errors[-3:]}"
            try:
                await link.send(wire.DeviceState(epoch=5, data=b"x" * 100))
                while not isinstance(msg := await asyncio.wait_for(link.recv(), 20), wire.Ack):
                    pass
                assert msg.epoch == 5
                assert link.tls_version == "TLSv1.3"
            finally:
                link.close()
            # The flood was on before (200 connections) and is still on after: the
            # listener goes on refusing its connections; the bound and the garbage
            # checks acted.
            after = len(rejects)
            for _ in range(100):
                if len(rejects) > after + 10:
                    break
                await asyncio.sleep(0.05)
            assert len(rejects) > after + 10, "the flood was over before the primary got in"
            assert flood.proc.poll() is None
            assert any("unauthenticated connections" in r for r in rejects)
            assert any("preamble" in r for r in rejects)
            assert answered
            refused = after - rejects_before
            print(f"primary in after {attempts} attempt(s) {errors}; {refused} refused meanwhile")
        finally:
            flood.stop()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 120))
