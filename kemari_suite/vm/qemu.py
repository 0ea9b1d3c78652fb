"""QEMU control: launch, QMP, teardown.

The asyncio core is :class:`AsyncVM`; :class:`VM` is a thin synchronous wrapper that runs
it on a private event loop thread (for the CLI and tests). The command line comes from
:mod:`kemari_suite.vm.spec` (:func:`qemu_argv`, re-exported here with the spec).

Every VM owns a run directory ``<run_dir>/kemari-<name>/`` (QMP socket, pid file,
console log, QEMU's stderr) and a RAM file ``<shm_dir>/kemari-<name>.ram``. Stopping a VM
removes both; starting a VM whose previous controller crashed removes the stale ones
first (after checking that no QEMU still runs from them). QEMU is started with a
parent-death signal so that it dies with the process that controls it: no guest outlives
the agent that holds its replication state.

Every file here holds guest data or leads to it (RAM, console, QMP), so all of them are
readable by their owner alone: the folders and the files this module writes are made
through :mod:`kemari_suite.protocol.files` (0700, 0600), and QEMU runs with umask 0o077,
so the files it creates itself (pid file, console log, a RAM file nobody prepared, the
sockets) are 0600 too. QEMU runs under its seccomp filter unless ``spec.sandbox`` is off,
and as ``spec.runas`` when set (see :data:`kemari_suite.vm.spec.SANDBOX` and
docs/security.md); such a QEMU is given its run directory, where it makes its incoming
migration socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import enum
import grp
import logging
import os
import pwd
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError as _QMPExecuteError
from qemu.qmp import QMPClient

from kemari_suite.errors import QEMUStartError, QMPCommandError, VMError
from kemari_suite.protocol.files import (
    OWNER_ONLY_UMASK,
    mkdir_owner_only,
    open_owner_only,
    write_owner_only,
)

# The command line and the spec live in spec.py; they are part of this module's API.
from kemari_suite.vm.spec import (
    QEMU_BINARY,
    IOPaths,
    VMPaths,
    VMSpec,
    choose_accel,
    io_paths,
    qemu_argv,
    qemu_env,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class VMState(enum.Enum):
    """Lifecycle of a VM object (not of the guest)."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"  # QEMU process up and QMP connected (the guest may be paused)
    STOPPING = "stopping"
    STOPPED = "stopped"  # process gone, files removed


def _set_pdeathsig() -> None:
    """Runs in the child between fork and exec: die with the parent, and create every
    file owner-only (the agent sets this umask at start too; a library caller or a test
    may not have)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()
    os.umask(OWNER_ONLY_UMASK)


def _give_run_dir(run_dir: Path, user: str) -> None:
    """Make ``run_dir`` (mode 0700) the ``-runas`` user's: QEMU, once it has changed its
    user, creates its incoming migration socket there and reaches the agent's sockets.
    Every folder above it must let that user pass (search permission); this is checked
    here, so that a folder in the way fails the start and not the first checkpoint.

    Raises:
        KeyError: no such user.
        OSError: the folder cannot be changed.
        PermissionError: a folder above ``run_dir`` does not let the user pass.
    """
    pw = pwd.getpwnam(user)
    for folder in run_dir.resolve().parents:
        st = folder.stat()
        if st.st_uid == pw.pw_uid:
            passes = bool(st.st_mode & 0o100)
        elif st.st_gid == pw.pw_gid or user in _group_members(st.st_gid):
            passes = bool(st.st_mode & 0o010)
        else:
            passes = bool(st.st_mode & 0o001)
        if not passes:
            raise PermissionError(
                f"vm.runas user {user} cannot pass through {folder} (mode "
                f"{st.st_mode & 0o7777:04o}); it must reach {run_dir}: give it search "
                f"permission only (chmod o+x {folder}), or choose another paths.run_dir"
            )
    os.chown(run_dir, pw.pw_uid, pw.pw_gid)


def _group_members(gid: int) -> list[str]:
    try:
        return list(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (a zombie does not; None or 0 is no process)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _qemu_pid_owning(pidfile: Path, ram: Path) -> int | None:
    """The PID of a QEMU still running from these files, or None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if any(str(ram).encode() in arg for arg in cmdline):
        return pid
    return None


def clean_stale(name: str, run_root: Path, shm_dir: Path, *, keep_ram: bool = False) -> list[Path]:
    """Remove what a VM of this name left behind when its controller crashed.

    ``keep_ram`` spares the RAM file (a replica about to be resumed). Returns the paths
    removed.

    Raises:
        VMError: a QEMU is still running from these files.
    """
    paths = VMPaths.for_vm(name, run_root, shm_dir)
    pid = _qemu_pid_owning(paths.pidfile, paths.ram)
    if pid is not None:
        raise VMError(name, f"already running as QEMU pid {pid} (stop it first)")
    removed = paths.remove_qemu_files()
    if paths.ram.exists() and not keep_ram:
        paths.ram.unlink()
        removed.append(paths.ram)
    return removed


class AsyncVM:
    """One QEMU process and its QMP connection (asyncio core).

    Use ``await vm.start()``, ``await vm.execute(cmd, args)``, ``await vm.shutdown()``.
    """

    def __init__(
        self,
        spec: VMSpec,
        *,
        run_root: Path,
        shm_dir: Path,
        keep_ram: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.spec = spec
        self.paths = VMPaths.for_vm(spec.name, run_root, shm_dir)
        self.run_root = run_root
        self.shm_dir = shm_dir
        #: The RAM file is an input (the secondary's replica): never removed at start, and
        #: kept at stop so that a failed failover start can be retried.
        self.keep_ram = keep_ram
        self.start_timeout = start_timeout
        self.state = VMState.NEW
        self.state_history: list[VMState] = [VMState.NEW]
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None
        #: The latest QMP events (bounded: a protected VM stops and resumes ten times a
        #: second, for months).
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._event_task: asyncio.Task[None] | None = None
        self._event_callbacks: list[Callable[[dict[str, Any]], Awaitable[None] | None]] = []
        self.started_at: float | None = None

    def _set_state(self, state: VMState) -> None:
        self.state = state
        self.state_history.append(state)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def on_event(self, cb: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        """Call ``cb(event)`` for each QMP event (SHUTDOWN, GUEST_PANICKED, MIGRATION...)."""
        self._event_callbacks.append(cb)

    async def start(self, *, prepare_ram: Callable[[Path], None] | None = None) -> None:
        """Start QEMU and connect QMP.

        ``prepare_ram`` may create the RAM file first (the secondary's replica).

        Raises:
            VMError: stale state could not be cleaned (a QEMU still runs from it).
            QEMUStartError: QEMU exited or its QMP socket did not answer; carries its stderr.
        """
        if self.state is not VMState.NEW:
            raise VMError(self.spec.name, f"cannot start from state {self.state.value}")
        self._set_state(VMState.STARTING)
        clean_stale(self.spec.name, self.run_root, self.shm_dir, keep_ram=self.keep_ram)
        try:
            mkdir_owner_only(self.paths.run_dir)
            mkdir_owner_only(self.paths.ram.parent)
            # The VM's own folder (not a shared one): narrowed even if an older run
            # left it wider, and taken back from a former ``runas`` user.
            os.chmod(self.paths.run_dir, 0o700)
            if self.spec.runas:
                _give_run_dir(self.paths.run_dir, self.spec.runas)
            elif self.paths.run_dir.stat().st_uid != os.geteuid():
                os.chown(self.paths.run_dir, os.geteuid(), os.getegid())
        except (OSError, KeyError) as err:
            self._set_state(VMState.STOPPED)
            raise QEMUStartError(
                self.spec.name, f"cannot prepare {self.paths.run_dir}: {err}"
            ) from err
        if prepare_ram is not None:
            prepare_ram(self.paths.ram)
        argv = qemu_argv(self.spec, self.paths)
        extra_env = qemu_env(self.spec, self.paths)
        write_owner_only(self.paths.run_dir / "cmdline", " ".join(argv) + "\n")
        stderr = open_owner_only(self.paths.stderr, "wb")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_set_pdeathsig,
                close_fds=True,
                env={**os.environ, **extra_env} if extra_env else None,
            )
        except OSError as err:
            self._set_state(VMState.STOPPED)
            raise QEMUStartError(self.spec.name, f"cannot run {argv[0]}: {err}") from err
        finally:
            stderr.close()
        self.started_at = time.monotonic()
        try:
            await self._connect()
        except BaseException:
            await self._teardown()
            raise
        self._set_state(VMState.RUNNING)

    async def _connect(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        client = QMPClient(self.spec.name)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise QEMUStartError(
                    self.spec.name, "QEMU exited during start", self._stderr_text(), rc
                )
            if self.paths.qmp.exists():
                try:
                    await client.connect(str(self.paths.qmp))
                    break
                except Exception as err:  # qemu.qmp raises several kinds while it comes up
                    if time.monotonic() > deadline:
                        raise QEMUStartError(
                            self.spec.name, f"QMP did not answer: {err}", self._stderr_text()
                        ) from err
            if time.monotonic() > deadline:
                raise QEMUStartError(
                    self.spec.name,
                    f"no QMP socket after {self.start_timeout:.0f} s",
                    self._stderr_text(),
                )
            await asyncio.sleep(0.02)
        self.qmp = client
        self._event_task = asyncio.create_task(self._pump_events())

    async def _pump_events(self) -> None:
        assert self.qmp is not None
        try:
            async for event in self.qmp.events:
                ev = dict(event)
                self.events.append(ev)
                for cb in self._event_callbacks:
                    res = cb(ev)
                    if asyncio.iscoroutine(res):
                        await res
        except asyncio.CancelledError:
            pass

    def _stderr_text(self) -> str:
        try:
            return self.paths.stderr.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run a QMP command and return its result.

        Raises:
            QMPCommandError: QEMU answered with an error, the connection is gone, or timeout.
        """
        if self.qmp is None:
            raise QMPCommandError(self.spec.name, command, "not connected")
        try:
            return await asyncio.wait_for(self.qmp.execute(command, arguments), timeout)
        except _QMPExecuteError as err:
            raise QMPCommandError(self.spec.name, command, f"{err.error_class}: {err}") from err
        except TimeoutError as err:
            raise QMPCommandError(self.spec.name, command, f"no answer in {timeout} s") from err
        except Exception as err:
            if isinstance(err, QMPCommandError):
                raise
            raise QMPCommandError(self.spec.name, command, f"{type(err).__name__}: {err}") from err

    async def status(self) -> str:
        """The QEMU run state ("running", "paused", "postmigrate", "inmigrate", ...)."""
        res = await self.execute("query-status")
        return str(res["status"])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def kill(self) -> None:
        """SIGKILL QEMU (a crash, for fault injection) and clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        await self._teardown()

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Quit QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove its files."""
        if self.state in (VMState.STOPPED, VMState.NEW):
            return
        self._set_state(VMState.STOPPING)
        if self.proc is not None and self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
        await self._teardown(timeout)

    async def _teardown(self, timeout: float = 5.0) -> None:
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._event_task
            self._event_task = None
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 2.0)
            self.qmp = None
        if self.proc is not None:
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.terminate()
                await asyncio.sleep(0.2)
            if self.proc.poll() is None:
                self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.paths.remove_qemu_files()
        if not self.keep_ram:
            with contextlib.suppress(FileNotFoundError):
                self.paths.ram.unlink()
        self._set_state(VMState.STOPPED)


class VM:
    """Synchronous wrapper around :class:`AsyncVM`, with its own event loop thread."""

    def __init__(self, spec: VMSpec, *, run_root: Path, shm_dir: Path, **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        # Create the AsyncVM on the loop thread; QEMU itself is forked from the calling
        # (main) thread's point of view by subprocess, but the parent-death signal follows
        # the forking thread, so keep that thread alive as long as the VM: it is ours.
        self.avm = AsyncVM(spec, run_root=run_root, shm_dir=shm_dir, **kw)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    @property
    def spec(self) -> VMSpec:
        return self.avm.spec

    @property
    def paths(self) -> VMPaths:
        return self.avm.paths

    @property
    def pid(self) -> int | None:
        return self.avm.pid

    def start(self, **kw: Any) -> VM:
        self._run(self.avm.start(**kw))
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` (which may use :attr:`avm`) on this VM's event loop; its result.

        Raises:
            Whatever ``coro`` raises; TimeoutError after ``timeout`` seconds.
        """
        return self._run(coro, timeout)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self._run(self.avm.execute(command, arguments))

    def status(self) -> str:
        return self._run(self.avm.status())

    def alive(self) -> bool:
        return self.avm.alive()

    def kill(self) -> None:
        self._run(self.avm.kill())

    def shutdown(self) -> None:
        try:
            self._run(self.avm.shutdown())
        finally:
            self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def wait_for_console(
    path: Path, marker: str, timeout: float, *, alive: Callable[[], bool] | None = None
) -> float:
    """Wait until ``marker`` appears in a console log; return the seconds waited.

    Raises:
        VMError: timeout, or ``alive()`` turned false.
    """
    t0 = time.monotonic()
    while True:
        try:
            if marker in path.read_text(errors="replace"):
                return time.monotonic() - t0
        except FileNotFoundError:
            pass
        if alive is not None and not alive():
            raise VMError(
                path.parent.name, f"QEMU exited before {marker!r} appeared on the console"
            )
        if time.monotonic() - t0 > timeout:
            raise VMError(path.parent.name, f"{marker!r} not on the console after {timeout:.0f} s")
        time.sleep(0.05)


def console_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


__all__ = [
    "QEMU_BINARY",
    "VM",
    "AsyncVM",
    "IOPaths",
    "VMPaths",
    "VMSpec",
    "VMState",
    "choose_accel",
    "clean_stale",
    "console_tail",
    "io_paths",
    "pid_alive",
    "qemu_argv",
    "wait_for_console",
]
