"""A real primary agent on a real QEMU (TCG, firmware only: no kernel, no guest disk
image to boot) with the built-in disk behind its block tap, replicating over an
authenticated in-memory link into a real EpochReceiver that acknowledges each epoch.

"Guest output" is a write handed to the block tap exactly as the NBD server hands it
one: it is held (logged in the open epoch) until its epoch is acknowledged, and the disk
image shows whether it was released.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kemari_suite.checkpoint.peer import PeerSession
from kemari_suite.checkpoint.primary import PrimaryAgent
from kemari_suite.checkpoint.sender import EpochSender
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.config import (
    AlertConfig,
    DiskConfig,
    KemariConfig,
    PathsConfig,
    ReplicationConfig,
    VMConfig,
)
from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link, _handshake
from kemari_suite.replica.receiver import EpochReceiver
from kemari_suite.vm.qemu import VMSpec

KEY = "k" * 32
PAGE = 4096
MEMORY_MIB = 16
DISK_MIB = 8
#: Where the test's "guest output" goes on the disk.
OUT_OFFSET = 1 << 20
_names = itertools.count()


def guest_spec(tag: str) -> VMSpec:
    """A firmware-only TCG guest: QEMU runs its BIOS, nothing boots (none is needed)."""
    name = f"wf{os.getpid() % 100000}-{tag}-{next(_names)}"
    return VMSpec(name=name, kernel=None, initrd=None, memory_mib=MEMORY_MIB, accel="tcg")


def make_config(
    tmp: Path, paths: PathsConfig, *, mode: str, qmp_timeout_ms: int = 4000, **rep: Any
) -> KemariConfig:
    image = tmp / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    # The sockets live in the run folder: a pytest folder under an xdist worker is too
    # long a path for AF_UNIX (108 bytes). A short one of our own, removed by Rig.close.
    short = Path(tempfile.mkdtemp(prefix="kwf-", dir="/tmp"))
    return KemariConfig(
        paths=dataclasses.replace(paths, run_dir=short),
        vm=VMConfig(qmp_timeout_ms=qmp_timeout_ms),
        replication=dataclasses.replace(
            ReplicationConfig(),
            key=KEY,
            peer="127.0.0.1:9",
            mode=mode,  # type: ignore[arg-type]
            **{
                "tracker": "compare",
                "heartbeat_interval_ms": 100,
                "heartbeat_timeout_ms": 2000,
                **rep,
            },
        ),
        disk=DiskConfig(backend="builtin", path=str(image), size_mib=DISK_MIB),
        alerts=AlertConfig(syslog=False),
    )


async def link_pair() -> tuple[Link, Link]:
    """An authenticated primary/secondary Link pair over an in-memory socket pair."""
    import socket

    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    key = KEY.encode()
    sp = wire.Session(
        key, role=wire.Role.PRIMARY, node_id="p", initiator=True, accept_roles={wire.Role.SECONDARY}
    )
    ss = wire.Session(
        key,
        role=wire.Role.SECONDARY,
        node_id="s",
        initiator=False,
        accept_roles={wire.Role.PRIMARY},
    )
    return await asyncio.gather(_handshake(ra, wa, sp, "s", 5.0), _handshake(rb, wb, ss, "p", 5.0))


class Replica:
    """The secondary's side: frames into a real EpochReceiver, an Ack at each commit, a
    heartbeat answered with one.

    ``before_ack(epoch)`` runs before each Ack (a test may stall or break things there);
    ``ack`` false stops acknowledging (a secondary that hangs while applying).
    """

    def __init__(self, link: Link, n_pages: int) -> None:
        self.link = link
        self.rx = EpochReceiver(np.zeros((n_pages, PAGE), dtype=np.uint8))
        self.acked: list[int] = []
        self.ack = True
        self.before_ack: Callable[[int], None] | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        rx = self.rx
        table: dict[type[wire.Message], Callable[[Any], Any]] = {
            wire.EpochBegin: rx.begin,
            wire.Pages: rx.receive_pages,
            wire.DeviceState: rx.device_state,
            wire.DeviceStateDelta: rx.device_state_delta,
            wire.IOLog: rx.io_log,
        }
        await self.link.send(wire.DiskState(lineage="", epoch=wire.NO_EPOCH))
        try:
            while True:
                msg = await self.link.recv()
                if isinstance(msg, wire.EpochEnd):
                    epoch = rx.end(msg)
                    if self.before_ack is not None:
                        self.before_ack(epoch)
                    if self.ack:
                        self.acked.append(epoch)
                        await self.link.send(wire.Ack(epoch=epoch))
                elif isinstance(msg, wire.Heartbeat) and self.ack:
                    # Alive while idle, as a real secondary's monitor is.
                    await self.link.send(dataclasses.replace(msg, role_state="protected"))
                elif type(msg) in table:
                    table[type(msg)](msg)
        except (ConnectionError, ProtocolError, asyncio.IncompleteReadError):
            rx.rollback()

    async def close(self) -> None:
        self.link.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class Rig:
    """A protected primary (real QEMU) and its in-memory secondary."""

    def __init__(self, cfg: KemariConfig, spec: VMSpec, artifacts: Path) -> None:
        self.cfg = cfg
        self.agent = PrimaryAgent(cfg, spec, artifacts=artifacts)
        self.replica: Replica | None = None
        self.image = Path(cfg.disk.path)

    async def start(self) -> None:
        a = self.agent
        await a.start_vm()
        plink, slink = await link_pair()
        assert a.ram is not None
        self.replica = Replica(slink, a.ram.n_pages)
        self.replica.start()
        a.session = session = PeerSession(
            plink,
            a._handlers,
            heartbeat_interval_s=a.rcfg.heartbeat_interval_ms / 1000,
            heartbeat_timeout_s=a.rcfg.heartbeat_timeout_ms / 1000,
            role_state=lambda: a.state.value,
        )
        a.sender = EpochSender(plink.send, a.encoder, n_pages=a.ram.n_pages)
        a.peer.reset(session)
        a.set_state(PrimaryState.SYNCING, "test rig")
        session.start()
        await a.syncs.initial_sync()
        a.set_state(PrimaryState.PROTECTED, "test rig")

    async def guest_writes(self, data: bytes, offset: int = OUT_OFFSET) -> int:
        """A guest write through the block tap; returns the epoch it was logged in."""
        io = self.agent.io
        assert io is not None and io.block is not None
        epoch = io.epoch
        await io.block.write(offset, data)
        return epoch

    def on_disk(self, data: bytes, offset: int = OUT_OFFSET) -> bool:
        """Has the write reached the disk image (released)?"""
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(len(data)) == data

    def held(self, epoch: int) -> bool:
        io = self.agent.io
        assert io is not None and io.block is not None
        return epoch in io.block.log.pending_epochs()

    async def qemu_status(self) -> str:
        return await asyncio.wait_for(self.agent.vm.status(), 10)

    def events(self) -> list[dict[str, Any]]:
        import json

        path = self.agent.artifacts.root / "events.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    async def close(self) -> None:
        a = self.agent
        if a.session is not None:
            await a.session.close()
            a.session.link.close()
            a.session = None
        if self.replica is not None:
            await self.replica.close()
        if a.vm.pid is not None:
            # Never leave a SIGSTOPped QEMU behind: SIGCONT first (harmless if running).
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.vm.pid, signal.SIGCONT)
        await a.shutdown()
        shutil.rmtree(self.cfg.paths.run_dir, ignore_errors=True)
