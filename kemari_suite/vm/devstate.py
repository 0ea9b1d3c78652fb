"""Device state alone, through QEMU's own migration with ``x-ignore-shared``.

Guest RAM lives in a shared file that both the agent and QEMU map, so with the
``x-ignore-shared`` capability a ``migrate`` to a unix socket owned by the agent carries
only device state, RAM block headers and the small RAM blocks outside the shared file
(BIOS and option ROMs): about 320 KB for a small pc guest.

Capture (primary, VM already stopped): listen, ``migrate uri=unix:PATH``, read to EOF,
wait for the migration to report ``completed``. Restore (secondary, QEMU started with
``-incoming defer`` on the replica RAM file): ``migrate-incoming uri=unix:PATH``, write
the saved bytes, wait until QEMU leaves ``inmigrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import time
from pathlib import Path

from kemari_suite.errors import ReplicationError, VMError
from kemari_suite.vm.qemu import AsyncVM

IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


async def enable_ignore_shared(vm: AsyncVM) -> None:
    """Turn on ``x-ignore-shared`` so migrations skip the shared RAM file."""
    await vm.execute("migrate-set-capabilities", {"capabilities": IGNORE_SHARED})


class DeviceStateCapturer:
    """Captures device state from a stopped VM, reusing one listening socket."""

    def __init__(self, vm: AsyncVM, sock_path: Path, *, timeout: float = 30.0) -> None:
        """Raises:
        KeyError: ``vm.spec.runas`` names no user.
        OSError: the socket cannot be made.
        """
        self.vm = vm
        self.sock_path = sock_path
        self.timeout = timeout
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(sock_path))
        # Connecting needs write permission: only the owner may feed or read this
        # socket (device state is guest data). Before listen(), so nobody got in. A
        # QEMU running as another user (-runas) is that owner.
        os.chmod(sock_path, 0o600)
        runas = getattr(getattr(vm, "spec", None), "runas", "")
        if runas:
            pw = pwd.getpwnam(runas)
            os.chown(sock_path, pw.pw_uid, pw.pw_gid)
        self._srv.listen(1)
        self._srv.setblocking(False)
        self._buf = bytearray(1 << 20)

    async def capture(self) -> bytes:
        """Return the device state of the (stopped) VM.

        Raises:
            ReplicationError: QEMU refused the migration, closed early or timed out.
        """
        loop = asyncio.get_running_loop()
        try:
            await self.vm.execute("migrate", {"uri": f"unix:{self.sock_path}"})
        except VMError as err:
            raise ReplicationError(f"device-state capture refused: {err}") from err
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self._srv), self.timeout)
        except TimeoutError as err:
            raise ReplicationError("QEMU did not connect to the device-state socket") from err
        out = bytearray()
        view = memoryview(self._buf)
        try:
            while True:
                n = await asyncio.wait_for(loop.sock_recv_into(conn, view), self.timeout)
                if n == 0:
                    break
                out += view[:n]
        except TimeoutError as err:
            raise ReplicationError("device-state stream stalled") from err
        finally:
            conn.close()
        # EOF means QEMU wrote everything; the status flips to completed right after.
        deadline = time.monotonic() + self.timeout
        while True:
            info = await self.vm.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise ReplicationError(
                    f"device-state capture {status}: {info.get('error-desc', '')}"
                )
            if time.monotonic() > deadline:
                raise ReplicationError(f"migration stuck in {status!r}")
            await asyncio.sleep(0.0002)
        if not out:
            raise ReplicationError("empty device state")
        return bytes(out)

    def close(self) -> None:
        self._srv.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()


async def restore(vm: AsyncVM, state: bytes, sock_path: Path, *, timeout: float = 30.0) -> float:
    """Load ``state`` into a VM started with ``-incoming defer``; return the seconds taken.

    Leaves the VM paused; the caller runs ``cont``.

    Raises:
        ReplicationError: QEMU rejected the state (its stderr tail is included).
    """
    t0 = time.monotonic()
    await enable_ignore_shared(vm)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    await vm.execute("migrate-incoming", {"uri": f"unix:{sock_path}"})
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while not sock_path.exists():
        if time.monotonic() > deadline:
            raise ReplicationError("QEMU did not open the incoming socket")
        await asyncio.sleep(0.001)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        await loop.sock_connect(s, str(sock_path))
        await loop.sock_sendall(s, state)
    finally:
        s.close()
    while True:
        try:
            status = await vm.status()
        except VMError as err:
            raise ReplicationError(
                f"QEMU died loading the device state: {vm._stderr_text().strip()[-800:]}"
            ) from err
        if status != "inmigrate":
            break
        if time.monotonic() > deadline:
            raise ReplicationError("device-state load did not finish")
        await asyncio.sleep(0.001)
    if status not in ("paused", "postmigrate", "prelaunch"):
        raise ReplicationError(f"unexpected state after load: {status}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    return time.monotonic() - t0
