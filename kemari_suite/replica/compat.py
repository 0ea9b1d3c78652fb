"""Can the secondary run this VM? Checked at protect time, before protection is declared.

Two stages:

1. **Profile** (before the initial synchronization): the primary sends the
   host-independent part of its VM (:func:`kemari_suite.vm.profile.vm_profile`: machine
   type, vCPUs, memory, NIC, disk size, kernel and initrd content, QEMU version). The
   secondary compares it with the VM its own configuration describes and refuses,
   naming each differing field, before a single page is copied. A different QEMU
   version is a note, not a refusal: stage 2 decides.
2. **Trial restore** (after the first committed checkpoint): the secondary starts a
   throw-away QEMU from its own command line, with ``-incoming defer``, and loads the
   committed device state into it. This proves what a failover needs: this QEMU accepts
   the command line and the machine type, and the device state of the primary's QEMU
   loads. The trial maps the replica RAM through a hard link, never runs a vCPU, and is
   stopped at once; its NIC and disk are stand-ins (a hub port, a null block device of
   the same size), so it touches neither the TAP nor the disk copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kemari_suite.config import KemariConfig

# The profile itself lives with the VM (the primary sends it and must not import this
# package); re-exported here for the callers that still take it from compat.
from kemari_suite.disk import guest_disk_size
from kemari_suite.errors import KemariError, ReplicationError
from kemari_suite.protocol.files import mkdir_owner_only, open_owner_only
from kemari_suite.protocol.link import Link
from kemari_suite.replica import verbs
from kemari_suite.service.metrics import Artifacts
from kemari_suite.vm.devstate import restore
from kemari_suite.vm.profile import file_digest, qemu_version, vm_profile
from kemari_suite.vm.qemu import AsyncVM, VMPaths, VMSpec

#: Profile fields that must be equal on both hosts, with the config key that sets each.
FIELDS: dict[str, str] = {
    "machine": "vm.machine",
    "vcpus": "vm.vcpus",
    "memory_mib": "vm.memory_mib",
    "accel": "vm.accel",
    "mac": "vm.mac",
    "nic": "vm.netdev / tap.host_tap",
    "append": "vm.append / vm.run / vm.ip (kernel command line)",
    "kernel": "image.kernel (content)",
    "initrd": "image.initrd (content)",
    "display": "display",
    "devices": "device",
    "disk_size": "disk.path (size)",
    "disk_backend": "disk.backend",
}


@dataclass(frozen=True)
class Comparison:
    """What differs between the primary's VM and the one this host would start."""

    differences: list[str]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


def compare(primary: dict[str, Any], here: dict[str, Any]) -> Comparison:
    """Compare a primary's profile with this host's; differences name the config key."""
    diffs: list[str] = []
    notes: list[str] = []
    for name, key in FIELDS.items():
        a, b = primary.get(name), here.get(name)
        if name == "disk_size" and b == -1:
            diffs.append(f"{key}: the disk is missing on this host")
            continue
        if a != b:
            diffs.append(f"{key}: primary has {a!r}, this host {b!r}")
    qa, qb = primary.get("qemu", "unknown"), here.get("qemu", "unknown")
    if qa != qb:
        notes.append(
            f"QEMU {qa} on the primary, {qb} here: compatible only if the trial restore "
            "of the first checkpoint succeeds"
        )
    return Comparison(diffs, notes)


def _trial_spec(cfg: KemariConfig, spec: VMSpec) -> VMSpec:
    """This host's command line with stand-ins for the NIC backend and the disk."""
    netdev: str | None = None
    if cfg.tap.host_tap:
        # The failover start puts the NIC on the frame proxy's stream socket (no
        # vnet_hdr): a hub port is an equivalent stand-in.
        netdev = "hubport,hubid=0"
    elif spec.netdev and spec.netdev.split(",", 1)[0] in ("tap", "bridge"):
        # The device state of a NIC on a TAP records vnet_hdr=on: the stand-in must be a
        # TAP too. A fresh, unattached one (QEMU creates it and it goes with QEMU).
        netdev = f"tap,ifname=kchk{os.getpid() % 100000:05d},script=no,downscript=no"
    elif spec.netdev:
        netdev = "hubport,hubid=0"
    size = guest_disk_size(cfg)
    blockdev = f"driver=null-co,size={size}" if size > 0 else None
    return spec.replace(name=f"{spec.name}-check", incoming=True, netdev=netdev, blockdev=blockdev)


def profile_here(cfg: KemariConfig, spec: VMSpec) -> dict[str, Any]:
    """This host's VM profile (:func:`~kemari_suite.vm.profile.vm_profile`)."""
    return vm_profile(cfg, spec, disk_size=guest_disk_size(cfg))


def trial_ram_path(cfg: KemariConfig, spec: VMSpec) -> Path:
    """Where the caller puts the copy of the replica RAM the trial runs on."""
    return VMPaths.for_vm(f"{spec.name}-check", cfg.paths.run_dir, cfg.paths.shm_dir).ram


def copy_replica(src: Path, dst: Path) -> None:
    """Copy the replica RAM file (tmpfs to tmpfs, in the kernel) to a new file ``dst``,
    mode 0600 (it is guest memory), in a folder made 0700 if missing."""
    mkdir_owner_only(dst.parent)
    with open(src, "rb") as fsrc, open_owner_only(dst, "wb") as fdst:
        size = os.fstat(fsrc.fileno()).st_size
        done = 0
        while done < size:
            n = os.sendfile(fdst.fileno(), fsrc.fileno(), done, size - done)
            if n == 0:
                break
            done += n


async def trial_restore(cfg: KemariConfig, spec: VMSpec, devstate: bytes) -> float:
    """Start a throw-away QEMU from ``spec`` on the RAM copy at :func:`trial_ram_path`
    and load ``devstate`` into it; the copy is removed afterwards. Returns the seconds.

    Raises:
        ReplicationError: QEMU would not start or rejected the device state; the
            message carries QEMU's own words.
    """
    tspec = _trial_spec(cfg, spec)
    vm = AsyncVM(tspec, run_root=cfg.paths.run_dir, shm_dir=cfg.paths.shm_dir, keep_ram=True)
    t0 = time.monotonic()
    try:
        try:
            await vm.start()
        except KemariError as err:
            raise ReplicationError(f"this host's QEMU would not start the VM: {err}") from err
        await restore(vm, devstate, vm.paths.run_dir / "check.sock")
        return time.monotonic() - t0
    finally:
        with contextlib.suppress(Exception):
            await vm.kill()
        with contextlib.suppress(FileNotFoundError):
            vm.paths.ram.unlink()


async def run_trial(cfg: KemariConfig, spec: VMSpec, devstate: bytes) -> dict[str, Any]:
    """:func:`trial_restore` as a verdict for the wire: ``{"ok", "ms" | "reason"}``."""
    try:
        secs = await asyncio.wait_for(trial_restore(cfg, spec, devstate), 120)
    except (ReplicationError, TimeoutError) as err:
        return {"ok": False, "stage": "restore", "reason": str(err) or "timed out"}
    return {"ok": True, "stage": "restore", "ms": round(secs * 1e3, 1), "qemu": qemu_version()}


class CompatCheck:
    """The secondary's side of both stages, and their results (``results``, in status).

    :meth:`answer_profile` answers the primary's profile; after an accepted profile
    ``trial_pending`` is set, and the caller runs :meth:`start_trial` right after the
    first commit, while nothing writes the replica. Verdicts go to the primary as they
    are reached; ``on_problem`` hears why this host cannot run the VM.
    """

    def __init__(
        self,
        cfg: KemariConfig,
        spec: VMSpec,
        replica_path: Path,
        artifacts: Artifacts,
        *,
        on_problem: Callable[[str], None] = lambda _why: None,
    ) -> None:
        self.on_problem = on_problem
        self.cfg = cfg
        self.spec = spec
        self.replica_path = replica_path
        self.artifacts = artifacts
        #: ``{"profile": "ok" | "refused", "differences", ["notes"], ["restore": verdict]}``
        self.results: dict[str, Any] = {}
        self.trial_pending = False
        self._task: asyncio.Task[None] | None = None

    def check_profile(self, theirs: dict[str, Any]) -> dict[str, Any]:
        """Compare the primary's profile with this host's; returns the verdict for the
        wire, ``{"ok", "stage": "profile", "reason" | "notes"}``."""
        cmp = compare(theirs, profile_here(self.cfg, self.spec))
        self.results = {"profile": "ok" if cmp.ok else "refused", "differences": cmp.differences}
        if cmp.notes:
            self.results["notes"] = cmp.notes
        if not cmp.ok:
            reason = "; ".join(cmp.differences)
            self.artifacts.event("compat-refused", stage="profile", reason=reason)
            return {"ok": False, "stage": "profile", "reason": reason}
        self.trial_pending = True
        return {"ok": True, "stage": "profile", "notes": cmp.notes}

    async def answer_profile(self, link: Link, theirs: dict[str, Any]) -> None:
        """:meth:`check_profile`, answered on ``link``.

        Raises:
            ConnectionError: the VMs differ (after the refusal was sent).
        """
        verdict = self.check_profile(theirs)
        await verbs.send_compat(link, verdict)
        if not verdict["ok"]:
            self.on_problem(f"cannot run the primary's VM: {verdict['reason']}")
            raise ConnectionError(f"VM mismatch: {verdict['reason']}")

    @property
    def restore_failure(self) -> str | None:
        """Why the trial restore failed, or None (passed, or not run yet)."""
        verdict = self.results.get("restore", {})
        return str(verdict.get("reason")) if verdict.get("ok") is False else None

    async def start_trial(self, link: Link, devstate: bytes) -> None:
        """Copy the replica now (the caller keeps it still) and run the trial restore
        of ``devstate`` beside the link; the verdict goes to the primary on ``link``."""
        self.trial_pending = False
        copy = trial_ram_path(self.cfg, self.spec)
        # The replica is a shared mapping of this file: the copy sees every applied
        # page. Off the event loop, so heartbeats go on.
        await asyncio.to_thread(copy_replica, self.replica_path, copy)

        async def trial() -> None:
            try:
                verdict = await run_trial(self.cfg, self.spec, devstate)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    copy.unlink()
            self.results["restore"] = verdict
            self.artifacts.event("compat", **verdict)
            if not verdict["ok"]:
                self.on_problem(f"trial restore failed: {verdict['reason']}")
            with contextlib.suppress(Exception):
                await verbs.send_compat(link, verdict)

        self._task = asyncio.create_task(trial())

    async def close(self) -> None:
        """Cancel a trial still running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


__all__ = [
    "FIELDS",
    "Comparison",
    "CompatCheck",
    "compare",
    "copy_replica",
    "file_digest",
    "profile_here",
    "qemu_version",
    "run_trial",
    "trial_ram_path",
    "trial_restore",
    "vm_profile",
]
