"""The frame proxy on a real TAP device in a lab namespace, with a fake guest (no QEMU).

The fake guest speaks QEMU's stream framing over the proxy's unix socket and asks, by
ARP, for the client namespace's address; the client's kernel answers through the LAN
bridge and the TAP. Labs use slots 10..19 of this worker, like test_tap_vm.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite import lab
from kemari_suite.errors import TapError
from kemari_suite.tap.events import TapMode
from kemari_suite.tap.net import FrameDecoder, FrameProxy, encode_frame
from kemari_suite.tap.tun import open_tap

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, TAP)"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
# test_tap_vm.py counts 10..; this file takes the top of the range.
_slots = itertools.count(19, -1)
GUEST_MAC = bytes.fromhex("525400aabbcc")


@pytest.fixture
def tun_lab() -> Iterator[lab.LabLayout]:
    lab_id = lab.worker_lab_id(WORKER, next(_slots))
    lab.down(lab_id)
    try:
        yield lab.up(lab_id, "unlimited")
    finally:
        lab.down(lab_id)


def ip4(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


def arp_request(src_ip: str, dst_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + ip4(src_ip)
    body += bytes(6) + ip4(dst_ip)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body


def is_arp_reply_for_guest(frame: bytes, from_ip: str) -> bool:
    return (
        frame[:6] == GUEST_MAC
        and frame[12:14] == b"\x08\x06"
        and frame[20:22] == b"\x00\x02"
        and frame[28:32] == ip4(from_ip)
    )


async def wait_arp_reply(
    reader: asyncio.StreamReader, dec: FrameDecoder, from_ip: str, timeout: float
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            data = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
        except TimeoutError:
            return False
        if not data:
            return False
        if any(is_arp_reply_for_guest(f, from_ip) for f in dec.feed(data)):
            return True
    return False


def test_real_tap_both_directions_and_output_commit(tun_lab: lab.LabLayout, tmp_path: Path) -> None:
    lay = tun_lab

    async def go() -> None:
        tap = open_tap(lay.tap_primary, netns=lay.ns_primary)
        # A single-queue TAP takes one descriptor: a second agent cannot attach.
        with pytest.raises(TapError, match="cannot attach"):
            open_tap(lay.tap_primary, netns=lay.ns_primary)
        proxy = FrameProxy(tmp_path / "net.sock", tap, epoch=1, mode=TapMode.PROTECTED)
        await proxy.start()
        try:
            await asyncio.to_thread(lab.wait_tap_forwarding, lay.lab_id, "primary")
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "net.sock"))
            dec = FrameDecoder()
            writer.write(encode_frame(arp_request(lay.guest_ip, lay.lan_client_ip)))
            await writer.drain()
            # Held: the client never sees the request, so no reply comes back.
            assert not await wait_arp_reply(reader, dec, lay.lan_client_ip, 1.0)
            assert proxy.stats.held_frames == 1
            assert proxy.release(1) == 1
            assert await wait_arp_reply(reader, dec, lay.lan_client_ip, 5.0)
            # Unprotected: straight through.
            proxy.set_unprotected()
            writer.write(encode_frame(arp_request(lay.guest_ip, lay.lan_client_ip)))
            await writer.drain()
            assert await wait_arp_reply(reader, dec, lay.lan_client_ip, 5.0)
            assert proxy.stats.tap_write_errors == 0
            writer.close()
        finally:
            await proxy.close()
        # Closed: the TAP is free again for the next agent (the secondary after failover).
        again = open_tap(lay.tap_primary, netns=lay.ns_primary)
        again.close()

    asyncio.run(go())
