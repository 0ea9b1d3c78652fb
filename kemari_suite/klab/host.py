"""One L1 host of the kernel lab: its QEMU command line, start, stop and power loss.

An L1 is a TCG VM (``-cpu max``, so nested SVM is visible) booting the lab image's
kernel with ``init=/sbin/klab-init`` (see :mod:`kemari_suite.klab.guestfiles`)::

    -device nvme      root: a qcow2 overlay of the cached image (one per host, discarded)
    -device virtio-blk   optional data disk (/dev/vda in the L1): a sparse raw file
    -device virtio-net   eth0: a QEMU socket netdev (the replication link, see pair.py)
    -device virtio-net   eth1 (``lan``): QEMU's user network; the host's 127.0.0.1 is
                         10.0.2.2 from the L1 (the witness listens there)
    vhost-user-fs-pci    (``share``) a host folder through virtiofsd (share.py), mounted
                         read-only at the same path in the L1: the suite's live tree
    virtserialport klab.agent   the control channel (agent.py <-> guestagent.py)

QEMU is started and stopped by :class:`kemari_suite.vm.qemu.VM` (by PID: SIGKILL for a
power loss; QMP ``quit`` otherwise), which also gives it a parent-death signal: an L1
never outlives the process that started it. The host's files live in
``<lab_dir>/<host>/``: ``root.qcow2``, ``data.img``, ``agent.sock``.
"""

from __future__ import annotations

import enum
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kemari_suite.errors import VMError
from kemari_suite.klab.agent import AgentClient, RunResult
from kemari_suite.klab.guestfiles import l1_cmdline
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.share import SHARE_TAG, SharedFolder, share_socket
from kemari_suite.klab.wire import Pong
from kemari_suite.vm.buildkit import need_tool, run_step
from kemari_suite.vm.qemu import VM, VMSpec, console_tail

AGENT_CHARDEV = "klabagent"
ROOT_DRIVE = "klabroot"
SHARE_CHARDEV = "klabfs"
LAN_NETDEV = "klablan"
#: L1 boot under TCG took 3-10 s here; a loaded host can stretch that a lot.
BOOT_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class L1Spec:
    """One L1 host.

    ``host`` is its host name inside (``uname -n``); ``ip`` its eth0 address
    (ADDR/PREFIX) on the replication link; ``netdev`` the QEMU ``-netdev`` options of
    that link without id (None: no NIC); ``data_disk_mib`` 0 for no data disk.
    """

    host: str
    ip: str = ""
    netdev: str | None = None
    mac: str = "52:54:00:6b:00:01"
    memory_mib: int = 768
    vcpus: int = 1
    data_disk_mib: int = 0
    #: A host folder given to the L1 through virtiofs (tag :data:`SHARE_TAG`); "": none.
    share: str = ""
    #: A second NIC on QEMU's user network (eth1), to reach the host's loopback.
    lan: bool = False
    #: Run the L1's QEMU in this network namespace (a host of the namespace lab): its
    #: link's UDP datagrams then cross that lab's shaped replication link.
    netns: str | None = None
    #: ``hostfwd`` rules of the ``lan`` NIC (QEMU's syntax, e.g.
    #: "tcp:10.3.1.2:2222-:22"): bound in the namespace QEMU runs in.
    lan_forwards: tuple[str, ...] = ()


def lan_mac(mac: str) -> str:
    """The MAC of the ``lan`` NIC: ``mac`` with its fourth byte changed (pure)."""
    parts = mac.split(":")
    parts[3] = "6c"
    return ":".join(parts)


class HostState(enum.Enum):
    NEW = "new"
    STARTED = "started"  # QEMU runs; the agent may not answer yet
    READY = "ready"  # the agent answered
    STOPPED = "stopped"  # QEMU quit or was killed


def l1_vm_spec(name: str, spec: L1Spec, image: HostImage, folder: Path) -> VMSpec:
    """The :class:`VMSpec` of an L1 (pure: nothing runs). ``folder`` holds its files."""
    devices = [
        f"nvme,serial={ROOT_DRIVE},drive={ROOT_DRIVE}",
        "virtio-serial-pci",
        f"virtserialport,chardev={AGENT_CHARDEV},name=klab.agent",
    ]
    extra = [
        "-cpu",
        "max",
        "-drive",
        f"if=none,id={ROOT_DRIVE},file={folder / 'root.qcow2'},format=qcow2",
        "-chardev",
        f"socket,id={AGENT_CHARDEV},path={folder / 'agent.sock'},server=on,wait=off",
    ]
    if spec.share:
        # The L1's RAM is a shared file already (vm.spec), as vhost-user needs.
        extra += ["-chardev", f"socket,id={SHARE_CHARDEV},path={share_socket(folder)}"]
        devices.append(f"vhost-user-fs-pci,chardev={SHARE_CHARDEV},tag={SHARE_TAG}")
    if spec.lan:
        forwards = "".join(f",hostfwd={rule}" for rule in spec.lan_forwards)
        extra += ["-netdev", f"user,id={LAN_NETDEV}{forwards}"]
        devices.append(f"virtio-net-pci,netdev={LAN_NETDEV},mac={lan_mac(spec.mac)},romfile=")
    return VMSpec(
        name=name,
        kernel=image.kernel,
        initrd=None,
        append=l1_cmdline(spec.host, spec.ip),
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        accel="tcg",
        netdev=spec.netdev,
        mac=spec.mac,
        blockdev=(
            f"driver=file,filename={folder / 'data.img'}" if spec.data_disk_mib > 0 else None
        ),
        devices=tuple(devices),
        extra_args=tuple(extra),
        netns=spec.netns,
    )


class L1Host:
    """One L1 host: :meth:`start`, :meth:`wait_ready`, :meth:`run`, :meth:`kill` / :meth:`stop`.

    ``name`` must be unique on this machine (it names QEMU's run folder and RAM file).
    """

    def __init__(
        self,
        name: str,
        spec: L1Spec,
        image: HostImage,
        *,
        lab_dir: Path,
        run_root: Path,
        shm_dir: Path,
    ) -> None:
        self.name = name
        self.spec = spec
        self.image = image
        self.folder = Path(lab_dir) / spec.host
        self.run_root = Path(run_root)
        self.shm_dir = Path(shm_dir)
        self.vm: VM | None = None
        self.agent: AgentClient | None = None
        self.share: SharedFolder | None = None
        self.state = HostState.NEW
        self.state_history: list[HostState] = [HostState.NEW]
        #: Seconds from QEMU's start to the agent's first answer.
        self.boot_s: float | None = None
        self._started_at = 0.0

    def _set_state(self, state: HostState) -> None:
        self.state = state
        self.state_history.append(state)

    @property
    def pid(self) -> int | None:
        return self.vm.pid if self.vm is not None else None

    @property
    def data_disk(self) -> Path:
        return self.folder / "data.img"

    def alive(self) -> bool:
        return self.vm is not None and self.vm.alive()

    def prepare(self, *, fresh_data: bool = True) -> None:
        """Make the root overlay (always new) and the data disk (new unless kept).

        Raises:
            ImageError: qemu-img failed.
            OSError: the folder cannot be written.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        overlay = self.folder / "root.qcow2"
        overlay.unlink(missing_ok=True)
        qemu_img = need_tool("qemu-img", "qemu-utils")
        run_step(
            [qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.disk),
             str(overlay)],
            "qemu-img create",
        )  # fmt: skip
        if self.spec.data_disk_mib > 0 and (fresh_data or not self.data_disk.exists()):
            with self.data_disk.open("wb") as fh:
                fh.truncate(self.spec.data_disk_mib << 20)

    def start(self, *, fresh_data: bool = True) -> None:
        """Start QEMU (the L1 boots; :meth:`wait_ready` waits for its agent).

        ``fresh_data=False`` keeps the data disk of an earlier run (a restart after a
        power loss).

        Raises:
            VMError: already started, or QEMU could not start (QEMUStartError).
            ImageError: the overlay could not be made.
        """
        if self.state not in (HostState.NEW, HostState.STOPPED):
            raise VMError(self.name, f"cannot start from state {self.state.value}")
        self.prepare(fresh_data=fresh_data)
        if self.spec.share:
            self.share = SharedFolder(Path(self.spec.share), share_socket(self.folder))
            self.share.start()
        vm = VM(
            l1_vm_spec(self.name, self.spec, self.image, self.folder),
            run_root=self.run_root,
            shm_dir=self.shm_dir,
        )
        self._started_at = time.monotonic()
        try:
            vm.start()
        except BaseException:
            vm.close()
            if self.share is not None:
                self.share.stop()
            raise
        self.vm = vm
        self.agent = AgentClient(self.spec.host, self.folder / "agent.sock", alive=self.alive)
        self._set_state(HostState.STARTED)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_S) -> Pong:
        """Wait for the agent's first answer; records :attr:`boot_s`.

        Raises:
            VMError: not started.
            AgentError: no answer in time or QEMU exited (the console's tail attached).
        """
        if self.agent is None:
            raise VMError(self.name, "not started")
        try:
            pong = self.agent.wait_ready(timeout)
        except VMError as err:
            raise VMError(self.name, f"{err.reason}\nconsole:\n{self.console_tail()}") from err
        self.boot_s = time.monotonic() - self._started_at
        self._set_state(HostState.READY)
        return pong

    def run(
        self, command: str, *, timeout: float = 120.0, stdin: bytes = b"", check: bool = True
    ) -> RunResult:
        """Run ``command`` inside the L1 (see :meth:`AgentClient.run`). Raises AgentError."""
        if self.agent is None:
            raise VMError(self.name, "not started")
        return self.agent.run(command, timeout=timeout, stdin=stdin, check=check)

    def console_tail(self, n: int = 30) -> str:
        if self.vm is None:
            return ""
        return console_tail(self.vm.paths.console, n)

    def _save_console(self) -> None:
        """Keep the console log in the host's folder (QEMU's run folder is removed)."""
        if self.vm is not None:
            try:
                shutil.copyfile(self.vm.paths.console, self.folder / "console.log")
            except OSError:
                pass

    def saved_console(self) -> str:
        """The console log kept by the last :meth:`kill` or :meth:`stop`."""
        try:
            return (self.folder / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    def _finish(self) -> None:
        if self.agent is not None:
            self.agent.close()
        if self.share is not None:
            self.share.stop()
        self._set_state(HostState.STOPPED)

    def kill(self) -> None:
        """Power loss: SIGKILL the L1's QEMU (its page cache dies with it)."""
        self._save_console()
        if self.vm is not None:
            try:
                self.vm.kill()
            finally:
                self.vm.close()
        self._finish()

    def stop(self) -> None:
        """Quit QEMU (QMP quit, then SIGTERM, then SIGKILL); the data disk is kept."""
        self._save_console()
        if self.vm is not None:
            self.vm.shutdown()
        self._finish()

    def remove_files(self) -> None:
        """Remove the host's folder (overlay, data disk, socket). Call after a stop."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["BOOT_TIMEOUT_S", "HostState", "L1Host", "L1Spec", "l1_vm_spec"]
