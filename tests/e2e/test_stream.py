"""Output commit on the network: a TCP connection to a guest service survives the
death of the primary, and the byte stream the client received has no gap, no duplicate
and no rewind, also when the client reads slowly (backpressure)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.netclient import open_connection
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

PORT = 7002


class Reader(threading.Thread):
    """Reads numbered lines and checks each is the previous plus one."""

    def __init__(self, sock: socket.socket, slow: bool) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.slow = slow
        self.expected = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.last_rx = time.monotonic()
        self.longest_gap = 0.0

    def run(self) -> None:
        self.sock.settimeout(1.0)
        buf = b""
        while not self.stop.is_set():
            try:
                data = self.sock.recv(64 if self.slow else 65536)
            except TimeoutError:
                continue
            except OSError as err:
                self.errors.append(f"connection failed: {err}")
                return
            if not data:
                self.errors.append("connection closed by the guest")
                return
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - self.last_rx)
            self.last_rx = now
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                n = int(line)
                if n != self.expected:
                    kind = "rewind/duplicate" if n < self.expected else "gap"
                    self.errors.append(f"{kind}: got {n}, expected {self.expected}")
                    return
                self.expected += 1
            if self.slow:
                time.sleep(0.01)


@pytest.mark.parametrize("slow", [False, True], ids=["fast-reader", "slow-reader"])
@pytest.mark.parametrize("run", range(int(os.environ.get("KEMARI_KILLS_PER_POINT", "1"))))
def test_tcp_stream_survives_failover(
    run: int, slow: bool, lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    opts = PairOptions(tapped_net=True, workload=f"stream -p {PORT} 500")
    pair = LabPair(lay, base_config, opts)
    reader: Reader | None = None
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        deadline = time.monotonic() + 120
        while True:
            try:
                sock = open_connection(lay.ns_client, lay.guest_ip, PORT)
                break
            except KemariError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        reader = Reader(sock, slow)
        reader.start()
        time.sleep(random.uniform(2.0, 5.0))
        assert not reader.errors, reader.errors
        before = reader.expected
        assert before > 50, f"only {before} lines before the kill"
        pair.kill("primary")
        pair.wait_state("secondary", {"active"}, 60)
        # The stream goes on from the resumed guest, on the same connection.
        deadline = time.monotonic() + 60
        while reader.expected < before + 200 and time.monotonic() < deadline:
            assert not reader.errors, reader.errors
            time.sleep(0.2)
        assert not reader.errors, reader.errors
        assert reader.expected >= before + 200, "the stream did not resume after failover"
    finally:
        if reader is not None:
            reader.stop.set()
            with contextlib.suppress(OSError):
                reader.sock.close()
        pair.stop()
