"""The replica on this host: the RAM file, the epoch receiver over it, the disk copy.

:class:`ReplicaStore` maps the replica RAM file (the file QEMU maps at failover), puts
an :class:`~kemari_suite.replica.receiver.EpochReceiver` over its pages, and owns the
apply lock: every change to the replica (a message of the open epoch, a rollback, the
failover's last look) happens under it, one at a time, with the CPU-bound parts in a
thread so that heartbeats go on. At each commit it writes the committed device state
to ``devstate.committed`` in the VM's run directory, and, with ``[testing]
commit_probe``, the guest's probe as the replica holds it to ``commits.jsonl`` in the
artifacts folder (:class:`~kemari_suite.testing.probes.CommitProbeLog`).

After a planned switchover the old primary's RAM file is *kept*: it holds exactly the
checkpoint the new primary resumed, so :meth:`ReplicaStore.open` maps it as it is (a
:class:`KeptRAM`), takes it as the receiver's baseline and computes its digest, which
:meth:`ReplicaStore.ram_state` tells every new primary connection. Anything unexpected
(no file, another size) and the store starts from zeros as usual.

The store keeps the replica's digest pieces (:class:`~kemari_suite.vm.guestram.RamDigests`,
marked by every write of the receiver) for the standby's half of a switchover: after
commits, at most every :data:`DIGEST_REFRESH_S`, :meth:`ReplicaStore.refresh_digests`
re-hashes the pieces written since (in a thread, beside the link), so that the digest of
the checkpoint a switchover resumes (:meth:`ReplicaStore.checkpoint_digest`) costs only
the pieces the last epochs wrote, not all of the guest's RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.files import mkdir_owner_only, write_owner_only
from kemari_suite.replica.receiver import CommitObserver, EpochReceiver, OpenEpoch
from kemari_suite.replica.replicadisk import BuiltinCopy
from kemari_suite.service.metrics import Artifacts
from kemari_suite.testing.probes import CommitProbeLog
from kemari_suite.vm import guestmem
from kemari_suite.vm.guestram import BACKGROUND_NICE, GuestRAM, RamDigests, create_ram_file

PAGE = 4096

#: How often, at most, the standby refreshes its digest pieces after a commit: a
#: switchover's resume then hashes about what this long of epochs wrote (a few MiB).
DIGEST_REFRESH_S = 1.0

#: Runs inside the apply lock right after a commit: (epoch, committed device state).
AfterCommit = Callable[[int, bytes], Awaitable[None]]


@dataclass(frozen=True)
class KeptRAM:
    """The RAM file of a guest this host handed over at switchover checkpoint ``epoch``
    (disk copy ``lineage``): the next standby's replica, if it is still whole."""

    path: Path
    epoch: int
    lineage: str


class ReplicaStore:
    """The replica RAM file, its receiver and the disk copy; see the module docstring."""

    def __init__(
        self,
        cfg: KemariConfig,
        ram_path: Path,
        run_dir: Path,
        n_pages: int,
        artifacts: Artifacts,
        kept: KeptRAM | None = None,
    ) -> None:
        self.cfg = cfg
        self.ram_path = ram_path
        self.run_dir = run_dir
        self.n_pages = n_pages
        self.artifacts = artifacts
        self.lock = asyncio.Lock()
        #: The mapping of the RAM file (None before :meth:`open` and after unmapping).
        self.ram: GuestRAM | None = None
        self.receiver: EpochReceiver | None = None
        #: The built-in replicated disk: this host's copy, kept at the last committed epoch.
        self.disk: BuiltinCopy | None = None
        self.commit_probe = _commit_probe_log(cfg, artifacts.root)
        #: The RAM file of a switchover, to take as the baseline at :meth:`open`.
        self._offered = kept
        #: The kept switchover checkpoint and its digest, once taken as the baseline.
        self.kept: KeptRAM | None = None
        self.kept_digest = b""
        #: The replica's digest pieces, marked by every write (None before :meth:`open`).
        self.digests: RamDigests | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._next_refresh = 0.0

    def open(self, observers: Sequence[CommitObserver] = ()) -> None:
        """Map the RAM file, open the disk copy, start receiving. The RAM file is created
        (zeros, 0600, the run directory 0700 if created here), or, when a kept one was
        given, is that file as it is, the receiver's baseline (its digest is computed
        here: about 100 ms for 256 MiB).

        Raises:
            ReplicationError: the RAM file cannot be mapped.
            ConfigError, DiskError: the disk copy is missing or cannot be opened.
        """
        mkdir_owner_only(self.run_dir)
        self.ram = self._map_kept(self._offered) if self._offered is not None else None
        if self.ram is None:
            # Guest memory and device state: readable by their owner alone (0600, 0700).
            create_ram_file(self.ram_path, self.n_pages * PAGE)
            self.ram = GuestRAM(self.ram_path, writable=True)
        self.disk = BuiltinCopy.open(self.cfg)
        if self.digests is None:
            self.digests = RamDigests(self.ram.pages)
        self.receiver = EpochReceiver(self.ram.pages, disk=self.disk)
        self.receiver.written = self.digests.touched
        if self.kept is not None:
            self.receiver.adopt_baseline(self.kept.epoch)
            self.artifacts.event(
                "kept-checkpoint", epoch=self.kept.epoch, digest=self.kept_digest.hex()
            )
        for fn in observers:
            self.receiver.on_commit(fn)
        if self.commit_probe is not None:
            self.receiver.on_commit(self.commit_probe)

    def _map_kept(self, kept: KeptRAM) -> GuestRAM | None:
        """Map the kept RAM file and hash it; None (and an event saying why) if unusable."""
        why = ""
        if kept.path != self.ram_path:
            why = f"kept RAM {kept.path} is not this replica's file {self.ram_path}"
        elif not kept.path.exists() or kept.path.stat().st_size != self.n_pages * PAGE:
            why = f"kept RAM {kept.path} is missing or not {self.n_pages * PAGE} bytes"
        if why:
            self.artifacts.event("kept-checkpoint-dropped", reason=why)
            return None
        # Not populated here: the digest below reads every page, at a low priority.
        ram = GuestRAM(self.ram_path, writable=True, populate=False)
        self.kept = kept
        # Hashed through the pieces: they are current from here on, should this host
        # take the VM back soon.
        self.digests = RamDigests(ram.pages)
        # At a low priority: the new primary's guest has just resumed beside us (in the
        # lab, on the same CPUs); the new primary waits for this only to protect it.
        self.kept_digest = self.digests.digest(nice=BACKGROUND_NICE)
        return ram

    def refresh_digests(self) -> None:
        """After a commit: re-hash the digest pieces written since the last refresh, in
        a thread (one core) beside the link; at most every :data:`DIGEST_REFRESH_S`, one
        at a time."""
        digests = self.digests
        if digests is None or self._refreshing is not None:
            return
        if time.monotonic() < self._next_refresh:
            return

        async def run() -> None:
            try:
                await asyncio.to_thread(digests.refresh, nice=BACKGROUND_NICE)
            finally:
                self._refreshing = None
                self._next_refresh = time.monotonic() + DIGEST_REFRESH_S

        self._refreshing = asyncio.create_task(run())

    def checkpoint_digest(self) -> bytes:
        """:func:`~kemari_suite.vm.guestram.ram_digest` of the replica as it is; the
        caller keeps it still (the receiver closed or the lock held, QEMU not running).
        Hashes only the pieces written since :meth:`refresh_digests` last ran (after
        a refresh still running: one at a time)."""
        if self.digests is None:
            raise ProtocolError("no replica to hash")
        return self.digests.digest(threads=2)

    def ram_state(self) -> tuple[int, str, bytes]:
        """The switchover checkpoint held as a baseline: (epoch, lineage, digest), or
        (-1, "", b"") once an epoch was committed (or none was kept)."""
        r = self.receiver
        if self.kept is None or r is None or r.baseline_epoch != self.kept.epoch:
            return -1, "", b""
        return self.kept.epoch, self.kept.lineage, self.kept_digest

    def kept_status(self) -> dict[str, Any] | None:
        """The kept switchover checkpoint for status, while it is the baseline."""
        epoch, lineage, digest = self.ram_state()
        if epoch < 0:
            return None
        return {"epoch": epoch, "lineage": lineage, "digest": digest.hex()}

    def synchronization(self, msg: wire.EpochBegin) -> str:
        """What synchronization ``msg`` opens ("" for an ordinary DELTA): a FULL epoch,
        or the first DELTA on the kept switchover checkpoint."""
        if msg.kind is wire.EpochKind.FULL:
            return f"full synchronization, epoch {msg.epoch}"
        if self.ram_state()[0] >= 0:
            return f"delta synchronization, epoch {msg.epoch} on the kept switchover checkpoint"
        return ""

    @property
    def resumable(self) -> bool:
        """Whether a failover could resume a committed checkpoint (not a baseline)."""
        return self.receiver is not None and self.receiver.resumable

    @property
    def committed_epoch(self) -> int:
        return self.receiver.committed_epoch if self.receiver is not None else -1

    @property
    def epochs_committed(self) -> int:
        return self.receiver.epochs_committed if self.receiver is not None else 0

    @property
    def open_epoch(self) -> OpenEpoch | None:
        return self.receiver.open if self.receiver is not None else None

    def disk_state(self) -> dict[str, Any]:
        """Which disk copy this host holds (the sidecar), {} without a built-in disk."""
        return self.disk.state() if self.disk is not None else {}

    def copy_generation(self) -> int | None:
        """The tiebreaker generation the disk copy records (None: none, or no copy)."""
        return self.disk.generation() if self.disk is not None else None

    def _receiver(self) -> EpochReceiver:
        if self.receiver is None:
            raise ProtocolError("no replica to receive into")
        return self.receiver

    # ---- the open epoch, under the apply lock ----------------------------------------

    async def begin(self, msg: wire.EpochBegin) -> None:
        async with self.lock:
            self._receiver().begin(msg)

    async def pages(self, msg: wire.Pages) -> None:
        async with self.lock:
            await asyncio.to_thread(self._receiver().receive_pages, msg)

    async def device_state(self, msg: wire.DeviceState) -> None:
        async with self.lock:
            self._receiver().device_state(msg)

    async def device_state_delta(self, msg: wire.DeviceStateDelta) -> None:
        async with self.lock:
            await asyncio.to_thread(self._receiver().device_state_delta, msg)

    async def io_log(self, msg: wire.IOLog) -> None:
        async with self.lock:
            # A disk copy in progress writes the log into its file at once.
            await asyncio.to_thread(self._receiver().io_log, msg)

    async def disk_copy(self, lineage: str, *, incremental: bool) -> int:
        async with self.lock:
            epoch = self._receiver().disk_copy(lineage, incremental=incremental)
        mode = "incremental" if incremental else "full"
        self.artifacts.event("disk-copy", mode=mode, epoch=epoch)
        return epoch

    async def end(self, msg: wire.EpochEnd, after: AfterCommit) -> int:
        """Commit the open epoch, persist its device state, run ``after`` (still under
        the lock: the replica does not change meanwhile); returns the epoch."""
        async with self.lock:
            receiver = self._receiver()
            epoch = receiver.end(msg)
            devstate = receiver.committed_devstate
            assert devstate is not None
            write_owner_only(self.run_dir / "devstate.committed", devstate)
            await after(epoch, devstate)
        return epoch

    def durable(self, epoch: int) -> None:
        self._receiver().durable(epoch)

    async def roll_back(self, why: str) -> None:
        """Drop the open epoch, if any (logged as a ``rollback`` event)."""
        async with self.lock:
            self.roll_back_locked(why)

    def roll_back_locked(self, why: str) -> None:
        """:meth:`roll_back` for a caller that holds the lock."""
        ep = self.receiver.rollback() if self.receiver is not None else None
        if ep is not None:
            self.artifacts.event("rollback", epoch=ep.epoch, pages=ep.pages, reason=why)

    # ---- the end -------------------------------------------------------------------

    def unmap(self) -> None:
        """Take no more epochs and drop the mapping (QEMU maps the file from here on)."""
        if self.receiver is not None:
            self.receiver.close()
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def close(self, *, keep_file: bool) -> None:
        """Unmap, close the disk copy, and remove the RAM file unless ``keep_file``."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self.digests is not None:
            # The refresh runs on a thread the task's cancel does not stop.
            self.digests.stop()
        self.unmap()
        self.digests = None
        if self.disk is not None:
            self.disk.close()
        if self.commit_probe is not None:
            self.commit_probe.close()
        if not keep_file:
            with contextlib.suppress(FileNotFoundError):
                self.ram_path.unlink()


def _commit_probe_log(cfg: KemariConfig, folder: Path) -> CommitProbeLog | None:
    """The ``[testing] commit_probe`` observer of every commit, or None (production)."""
    if cfg.testing.commit_probe != "stream":
        return None
    return CommitProbeLog(
        folder / "commits.jsonl",
        guestmem.STREAM_MAGIC,
        locate=guestmem.locate_probes,
        read_value=guestmem.read_value,
    )


__all__ = ["AfterCommit", "KeptRAM", "ReplicaStore"]
