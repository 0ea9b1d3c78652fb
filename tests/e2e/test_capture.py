"""No frame reaches the client before the epoch that produced it committed.

Checked from a packet capture in the client namespace (kernel timestamps), against the
secondary's commit times and the guest state each commit holds (the stream's probe,
read from the replica at commit), not from the proxy's own log.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.errors import KemariError
from kemari_suite.lab.netclient import SO_TIMESTAMPNS, open_connection, open_packet_socket
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]

PORT = 7002
_TS = struct.Struct("qq")


class Capture(threading.Thread):
    """TCP segments from the guest's stream port, with their kernel arrival times."""

    def __init__(self, sock: socket.socket, guest_ip: str) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.guest = socket.inet_aton(guest_ip)
        self.segments: list[tuple[float, int, bytes]] = []  # (time, seq, payload)
        self.isn: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.5)
        while not self.stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65535, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            ts = None
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TS.unpack(raw[: _TS.size])
                    ts = sec + nsec / 1e9
            if ts is None or len(data) < 14 + 20 + 20 or data[12:14] != b"\x08\x00":
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6 or ip[12:16] != self.guest:
                continue
            tcp = ip[ihl:]
            sport = struct.unpack("!H", tcp[0:2])[0]
            if sport != PORT:
                continue
            seq = struct.unpack("!I", tcp[4:8])[0]
            flags = tcp[13]
            if flags & 0x02:  # SYN-ACK: the initial sequence number
                self.isn = seq
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            payload = bytes(tcp[(tcp[12] >> 4) * 4 : total - ihl])
            if payload:
                self.segments.append((ts, seq, payload))

    def lines(self) -> list[tuple[int, float]]:
        """(line number, first arrival time of its newline), from the captured bytes."""
        assert self.isn is not None, "no SYN-ACK captured"
        end = max(((seq - self.isn - 1) % (1 << 32)) + len(p) for _t, seq, p in self.segments)
        stream = bytearray(end)
        first = np.full(end, np.inf)
        for ts, seq, p in sorted(self.segments):
            off = (seq - self.isn - 1) % (1 << 32)
            view = first[off : off + len(p)]
            fresh = view == np.inf
            view[fresh] = ts
            stream[off : off + len(p)] = p
        out = []
        start = 0
        for i, b in enumerate(stream):
            if b == 0x0A:
                if np.isinf(first[i]):
                    break
                out.append((int(stream[start:i]), float(first[i])))
                start = i + 1
        return out


def test_no_frame_before_its_epoch_committed(lab_factory, base_config: KemariConfig) -> None:
    lay = lab_factory()
    opts = PairOptions(
        tapped_net=True,
        workload=f"stream -p {PORT} 300",
        commit_probe="stream",
    )
    pair = LabPair(lay, base_config, opts)
    cap: Capture | None = None
    conn: socket.socket | None = None
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        cap = Capture(open_packet_socket(lay.ns_client, lay.client_bridge), lay.guest_ip)
        cap.start()
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = open_connection(lay.ns_client, lay.guest_ip, PORT)
                break
            except KemariError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        conn.settimeout(1)
        got = 0
        t_end = time.monotonic() + 4
        while time.monotonic() < t_end:
            with contextlib.suppress(TimeoutError):
                got += len(conn.recv(65536))
        assert got > 0
        time.sleep(0.5)
        cap.stop.set()
        cap.join(5)
        commits = []
        for f in (pair.run_dir("secondary") / "artifacts").glob("*/commits.jsonl"):
            commits += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        commits = [c for c in commits if c["probe"] is not None]
        commits.sort(key=lambda c: c["t"])
        assert len(commits) > 10
        times = [c["t"] for c in commits]
        lines = cap.lines()
        assert len(lines) > 100, f"only {len(lines)} lines captured"
        for n, t in lines:
            k = bisect.bisect_right(times, t) - 1
            committed = commits[k]["probe"] if k >= 0 else 0
            # The newest state committed before the line reached the client must be
            # one that had already handed line n to TCP.
            assert committed >= n + 1, (
                f"line {n} reached the client at {t:.6f}, but the newest checkpoint "
                f"committed by then had only sent lines below {committed}"
            )
    finally:
        if cap is not None:
            cap.stop.set()
        if conn is not None:
            conn.close()
        pair.stop()
