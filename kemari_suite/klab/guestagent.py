"""The agent inside an L1 host: runs the host's commands and sends back how they ended.

This file runs inside the L1 (Debian's python3, standard library only, plus
:mod:`kemari_suite.errors` and :mod:`kemari_suite.klab.wire`, which the image builder
copies beside it). The L1's init starts it with::

    PYTHONPATH=/usr/local/lib/klab python3 -m kemari_suite.klab.guestagent

It finds the virtio-serial port named :data:`PORT_NAME`, then reads frames
(:mod:`kemari_suite.klab.wire`) from it forever. Each :class:`~kemari_suite.klab.wire.Run`
gets a thread: ``/bin/sh -c COMMAND`` in a new session, stdin from the message, stdout
and stderr captured (each capped at :data:`MAX_OUTPUT`), the whole process group
killed when the timeout passes. A command that starts a daemon must redirect the
daemon's output, or the command only ends when the daemon does.

A read of 0 bytes on the port means the host end is not connected (virtio-serial
reports it that way): the agent waits and reads again, with a fresh decoder. Garbage
also resets the decoder; the host, which starts each connection with a Ping, resyncs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kemari_suite.errors import ProtocolError
from kemari_suite.klab.wire import Decoder, Done, Message, Ping, Pong, Run, encode

PORT_NAME = "klab.agent"
MAX_OUTPUT = 4 << 20
#: Exit code reported for a command that could not be started at all.
NOT_STARTED = -1000


def find_port(sys_root: Path = Path("/sys/class/virtio-ports"), name: str = PORT_NAME) -> Path:
    """The /dev node of the virtio-serial port called ``name``.

    Raises:
        FileNotFoundError: no such port (virtio_console not loaded, or QEMU has none).
    """
    for entry in sorted(sys_root.glob("vport*")):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name} under {sys_root}")


def run_command(msg: Run) -> Done:
    """Run one command to its end (or its timeout); never raises."""
    t0 = time.monotonic()
    flags = 0
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", msg.command.decode("utf-8", "replace")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as err:
        return Done(msg.req_id, NOT_STARTED, 0, 0, b"", str(err).encode())
    timeout = msg.timeout_ms / 1000 if msg.timeout_ms else None
    try:
        out, err_out = proc.communicate(msg.stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        flags |= Done.TIMED_OUT
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err_out = proc.communicate()
    if len(out) > MAX_OUTPUT or len(err_out) > MAX_OUTPUT:
        flags |= Done.TRUNCATED
    duration_us = int((time.monotonic() - t0) * 1e6)
    return Done(
        msg.req_id, proc.returncode, duration_us, flags, out[:MAX_OUTPUT], err_out[:MAX_OUTPUT]
    )


class Agent:
    """Answers messages through ``send`` (which writes one whole frame)."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._lock = threading.Lock()

    def _reply(self, msg: Message) -> None:
        with self._lock:
            try:
                self._send(encode(msg))
            except OSError:
                pass  # host gone: it asks again after it reconnects

    def handle(self, msg: Message) -> None:
        if isinstance(msg, Ping):
            uptime_ms = int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)
            self._reply(Pong(msg.nonce, uptime_ms, os.uname().release.encode()))
        elif isinstance(msg, Run):
            threading.Thread(
                target=lambda: self._reply(run_command(msg)), daemon=True, name=f"run{msg.req_id}"
            ).start()
        # Pong and Done travel the other way: ignored.

    def serve(self, fd: int, *, reconnect_wait: float | None = 0.2) -> None:
        """Read frames from ``fd`` and handle them.

        On end of file: with ``reconnect_wait`` None return, else sleep that long and
        read again (the host end of a virtio-serial port comes and goes).
        """
        decoder = Decoder()
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                if reconnect_wait is None:
                    return
                decoder = Decoder()
                time.sleep(reconnect_wait)
                continue
            try:
                messages = decoder.feed(data)
            except ProtocolError:
                decoder = Decoder()
                continue
            for msg in messages:
                self.handle(msg)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def main() -> int:
    for _ in range(300):  # the port appears once virtio_console is loaded
        try:
            port = find_port()
            break
        except FileNotFoundError:
            time.sleep(0.1)
    else:
        print(f"klab agent: no port {PORT_NAME}", file=sys.stderr)
        return 1
    fd = os.open(port, os.O_RDWR)
    print(f"klab agent: serving on {port}", file=sys.stderr)
    Agent(lambda frame: write_all(fd, frame)).serve(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
