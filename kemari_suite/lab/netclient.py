"""Talk TCP from inside a lab namespace without spawning a process.

``setns(CLONE_NEWNET)`` switches only the calling thread, so a short-lived thread enters
the namespace, opens the socket there, and the socket stays in that namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

from kemari_suite.errors import ConnectError, LabError

_CLONE_NEWNET = 0x40000000
#: SO_TIMESTAMPNS on Linux (not exported by Python's socket module).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns``; sockets it
    opens from then on live there.

    Raises:
        LabError: the namespace does not exist or setns failed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(ns, f"setns failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def tcp_request(ns: str, host: str, port: int, data: bytes = b"", timeout: float = 5.0) -> bytes:
    """Connect from namespace ``ns`` to ``host:port``, send ``data``, read until EOF.

    Raises:
        ConnectError: refused, unreachable or timed out.
        LabError: the namespace does not exist.
    """
    result: dict[str, object] = {}

    def work() -> None:
        try:
            enter_netns(ns)
            with socket.create_connection((host, port), timeout=timeout) as s:
                if data:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                chunks = []
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            result["data"] = b"".join(chunks)
        except (OSError, LabError) as err:
            result["error"] = err

    t = threading.Thread(target=work, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout + 1)
    err = result.get("error")
    if isinstance(err, LabError):
        raise err
    if err is not None or "data" not in result:
        raise ConnectError(f"{host}:{port} from {ns}", str(err) if err else "timeout")
    out = result["data"]
    assert isinstance(out, bytes)
    return out


def open_connection(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside namespace ``ns`` (the socket stays there).

    Raises:
        ConnectError: refused, unreachable or timed out.
    """
    result: dict[str, object] = {}

    def work() -> None:
        try:
            enter_netns(ns)
            result["sock"] = socket.create_connection((host, port), timeout=timeout)
        except (OSError, LabError) as err:
            result["error"] = err

    t = threading.Thread(target=work, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout + 1)
    sock = result.get("sock")
    if not isinstance(sock, socket.socket):
        raise ConnectError(f"{host}:{port} from {ns}", str(result.get("error", "timeout")))
    return sock


def open_packet_socket(ns: str, ifname: str) -> socket.socket:
    """A raw AF_PACKET socket on ``ifname`` inside ``ns``, with kernel receive
    timestamps (SO_TIMESTAMPNS): a packet capture, for tests that must not trust the
    proxy's own account of what it sent.

    Raises:
        LabError: the namespace or interface does not exist.
    """
    result: dict[str, object] = {}

    def work() -> None:
        try:
            enter_netns(ns)
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind((ifname, 0))
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            result["sock"] = s
        except (OSError, LabError) as err:
            result["error"] = err

    t = threading.Thread(target=work, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(5)
    sock = result.get("sock")
    if not isinstance(sock, socket.socket):
        raise LabError(ns, f"cannot capture on {ifname}: {result.get('error', 'timeout')}")
    return sock
