"""Device state alone, through QEMU's own migration with ``x-ignore-shared``.

Guest RAM lives in a shared file that both the agent and QEMU map, so with the
``x-ignore-shared`` capability a ``migrate`` to a unix socket owned by the agent carries
only device state, RAM block headers and the small RAM blocks outside the shared file
(BIOS and option ROMs): about 320 KB for a small pc guest.

Capture (primary, VM already stopped): the first ones (:data:`WARM_MIGRATIONS`) as
whole migrations: listen, ``migrate uri=unix:PATH``, read to EOF, wait for the migration
to report ``completed``.
Every later one through ``xen-save-devices-state`` (``live`` false), QEMU's save of the
device sections alone (the one COLO uses for its checkpoints): no migration thread, no
dirty logging started and stopped, no RAM blocks, one QMP command, about 13 KB. Its
stream lacks the migration's configuration section (machine type, capabilities), which
the restoring QEMU requires, so it is given the one the first capture carried: the
result is a migration stream whose only missing sections are RAM's, which
``x-ignore-shared`` never loads anyway. That is only the same state when every RAM
block outside the shared guest RAM is firmware the guest cannot write (BIOS, option ROMs,
fw_cfg blobs, which the restoring QEMU makes the same from the same command line): a VM
with video memory (``vga.vram``, QXL's) is captured by migration every time, as is one
whose QEMU lacks the command. :attr:`DeviceStateCapturer.method` and ``.why`` say which.

Restore (secondary, QEMU started with ``-incoming defer`` on the replica RAM file):
``migrate-incoming uri=unix:PATH``, write the saved bytes, wait until QEMU leaves
``inmigrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import socket
import time
from pathlib import Path

from kemari_suite.errors import ReplicationError, VMError
from kemari_suite.vm.qemu import AsyncVM

IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
#: A migration stream opens with "QEVM" and version 3.
STREAM_HEADER = b"QEVM\x00\x00\x00\x03"
#: QEMU_VM_CONFIGURATION: the byte after the header when the configuration is sent.
CONFIGURATION = 0x07
#: The section that follows the configuration in a migration: RAM's start (section
#: type 1, a 4-byte id, the name "ram", instance 0, version 4).
_RAM_SECTION = re.compile(rb"\x01.{4}\x03ram\x00\x00\x00\x00\x00\x00\x00\x04", re.DOTALL)
SAVE_COMMAND = "xen-save-devices-state"
#: The first captures of a VM are whole migrations even where the device sections alone
#: would do: a migration turns dirty logging on, which flushes every vCPU's software TLB
#: under TCG and lets it grow to the guest's working set (about five are needed; see
#: docs/benchmarks.md, "The trap"). A save alone flushes nothing, so without these a
#: protected TCG guest would stay as cold as one never captured.
WARM_MIGRATIONS = 8


def firmware_block(name: str) -> bool:
    """A RAM block the guest cannot write and the restoring QEMU fills the same:
    BIOS, option ROMs (``*.rom``), fw_cfg blobs (``/rom@...``)."""
    return name == "pc.bios" or name.endswith(".rom") or name.startswith("/rom@")


def ram_blocks(info: str) -> list[str]:
    """The block names in HMP ``info ramblock`` output."""
    names = []
    for line in info.splitlines():
        words = line.split()
        if words and words[0] != "Block" and len(words) >= 2:
            names.append(words[0])
    return names


def unsaved_blocks(blocks: list[str], shared: set[str]) -> list[str]:
    """The blocks that only a migration carries and the guest may write: neither shared
    guest RAM (``x-ignore-shared`` skips it) nor firmware."""
    return [b for b in blocks if b not in shared and not firmware_block(b)]


def stream_prefix(stream: bytes) -> bytes:
    """The header and configuration section of migration ``stream`` (the header alone
    when it carries no configuration).

    Raises:
        ReplicationError: not a migration stream, or no RAM section after the
            configuration (not a stream of ``x-ignore-shared`` migration).
    """
    if not stream.startswith(STREAM_HEADER):
        raise ReplicationError(f"not a QEMU migration stream (starts {stream[:8]!r})")
    if len(stream) <= len(STREAM_HEADER) or stream[len(STREAM_HEADER)] != CONFIGURATION:
        return STREAM_HEADER
    m = _RAM_SECTION.search(stream, len(STREAM_HEADER) + 1)
    if m is None:
        raise ReplicationError("no RAM section after the migration's configuration")
    return stream[: m.start()]


def with_prefix(prefix: bytes, saved: bytes) -> bytes:
    """The device sections ``saved`` by ``xen-save-devices-state``, after ``prefix``
    (:func:`stream_prefix` of a migration of the same QEMU).

    Raises:
        ReplicationError: ``saved`` is not a stream of device sections.
    """
    if not saved.startswith(STREAM_HEADER) or len(saved) <= len(STREAM_HEADER):
        raise ReplicationError(f"not a QEMU device-state stream (starts {saved[:8]!r})")
    return prefix + saved[len(STREAM_HEADER) :]


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
        #: Where QEMU saves device sections (its run directory: QEMU may write there,
        #: as its own user); made owner-only first, as the socket.
        self.save_path = sock_path.with_name(sock_path.name + ".sections")
        with contextlib.suppress(FileNotFoundError):
            self.save_path.unlink()
        fd = os.open(self.save_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        if runas:
            os.chown(self.save_path, pw.pw_uid, pw.pw_gid)
        #: The first migration's header and configuration; None until then, or when
        #: this QEMU has no :data:`SAVE_COMMAND` (then every capture migrates).
        self.prefix: bytes | None = None
        self._can_save: bool | None = None
        #: Why captures migrate every time ("" while they need not).
        self.why = ""
        #: Whole migrations so far (the first :data:`WARM_MIGRATIONS` always are).
        self.migrations = 0

    @property
    def method(self) -> str:
        """How captures run once the first ones are done: ``"migrate"`` or
        :data:`SAVE_COMMAND`."""
        return SAVE_COMMAND if self.prefix is not None else "migrate"

    async def capture(self) -> bytes:
        """Return the device state of the (stopped) VM, as a migration stream.

        Raises:
            ReplicationError: QEMU refused the save or the migration, closed early or
                timed out.
        """
        if self.prefix is not None and self.migrations >= WARM_MIGRATIONS:
            return await self._save()
        stream = await self._migrate()
        self.migrations += 1
        if self._can_save is None:
            self._can_save = await self._has_save_command()
        if self._can_save:
            self.prefix = stream_prefix(stream)
        return stream

    async def _has_save_command(self) -> bool:
        """Whether this QEMU can save the device state alone (:attr:`why` if not)."""
        try:
            commands = await self.vm.execute("query-commands")
            if not any(c.get("name") == SAVE_COMMAND for c in commands):
                self.why = f"QEMU has no {SAVE_COMMAND}"
                return False
            memdevs = await self.vm.execute("query-memdev")
            info = await self.vm.execute("human-monitor-command", {"command-line": "info ramblock"})
        except VMError as err:
            self.why = f"cannot list QEMU's RAM blocks: {err}"
            return False
        shared = {str(m.get("id")) for m in memdevs if m.get("share")}
        blocks = ram_blocks(str(info))
        extra = unsaved_blocks(blocks, shared)
        if not blocks or extra:
            self.why = f"RAM blocks only a migration carries: {', '.join(extra) or 'none listed'}"
            return False
        return True

    async def _save(self) -> bytes:
        assert self.prefix is not None
        try:
            # live false: a "live" save would inactivate the disks for another host.
            await self.vm.execute(SAVE_COMMAND, {"filename": str(self.save_path), "live": False})
        except VMError as err:
            raise ReplicationError(f"device-state save refused: {err}") from err
        try:
            with open(self.save_path, "rb") as f:
                saved = f.read()
        except OSError as err:
            raise ReplicationError(f"device-state save unreadable: {err}") from err
        return with_prefix(self.prefix, saved)

    async def _migrate(self) -> bytes:
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
        for path in (self.sock_path, self.save_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


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
