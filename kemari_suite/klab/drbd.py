"""DRBD inside L1 hosts, driven by the project's own DRBD layer.

* :func:`render_resource_84` renders a :class:`~kemari_suite.disk.drbdconf.DrbdConfig`
  in the DRBD 8.4 dialect. Debian's kernel carries DRBD 8.4.11, and drbd-utils 9.22
  hands a resource to ``drbdadm-84`` when that module is loaded, which rejects the DRBD
  9 file of :func:`~kemari_suite.disk.drbdconf.render_resource` (``options { quorum }``,
  ``node-id``, ``connection-mesh``). The same config, the same safe defaults; in 8.4
  ``fencing`` belongs to the ``disk`` section. (The report of issue 14 proposes moving
  this into drbdconf.py as ``render_resource(cfg, dialect="8.4")``.)
* :class:`GuestDrbdTools` is a :class:`~kemari_suite.disk.drbdadm.DrbdTools` whose
  commands run inside an L1 through its agent, so :class:`L1DrbdResource` (a
  :class:`~kemari_suite.disk.drbdadm.DrbdResource`) gives create-md, up, primary,
  secondary, down... there unchanged, with the same :class:`~kemari_suite.errors.DrbdError`.
* :func:`parse_proc_drbd` reads 8.4's ``/proc/drbd`` (8.4's drbdsetup has no
  ``status --json``), and :func:`wait_drbd` polls it until a condition holds.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kemari_suite.disk.drbdadm import CommandResult, DrbdResource, DrbdTools
from kemari_suite.disk.drbdconf import DrbdConfig, render_resource
from kemari_suite.errors import DrbdError, VMError
from kemari_suite.klab.agent import RunResult


class Runner(Protocol):
    """Something that runs a shell command inside an L1 (L1Host, AgentClient)."""

    def run(
        self, command: str, *, timeout: float = ..., stdin: bytes = ..., check: bool = ...
    ) -> RunResult: ...


def render_resource_84(cfg: DrbdConfig) -> str:
    """The resource file for ``cfg`` in the DRBD 8.4 dialect (the project's renderer).

    Raises:
        ConfigError: what 8.4 cannot express: more than two nodes, a diskless node, quorum.
    """
    return render_resource(cfg, dialect="8.4")


def render_for_kernel(cfg: DrbdConfig, module_version: str) -> str:
    """The resource file the loaded module's drbd-utils accept ("8.4.11" or "9.2.x")."""
    if module_version.startswith("8."):
        return render_resource_84(cfg)
    return render_resource(cfg)


@dataclass(frozen=True)
class DrbdMinor:
    """One device line of 8.4's /proc/drbd."""

    minor: int
    cs: str
    role: str
    peer_role: str
    disk: str
    peer_disk: str
    #: Kibibytes out of sync (``oos:``), None when not shown.
    oos_kib: int | None

    @property
    def connected(self) -> bool:
        return self.cs == "Connected"

    @property
    def in_sync(self) -> bool:
        return self.connected and self.disk == "UpToDate" and self.peer_disk == "UpToDate"

    def summary(self) -> str:
        """Connection, roles and disk states as /proc/drbd shows them."""
        return f"cs:{self.cs} ro:{self.role}/{self.peer_role} ds:{self.disk}/{self.peer_disk}"


@dataclass(frozen=True)
class ProcDrbd:
    """``/proc/drbd``: the module version and every configured minor."""

    version: str
    minors: Mapping[int, DrbdMinor]


_VERSION = re.compile(r"^version:\s*(\S+)", re.M)
_MINOR = re.compile(
    r"^\s*(\d+):\s+cs:(\S+)\s+ro:([^/\s]+)/(\S+)\s+ds:([^/\s]+)/(\S+)(?P<rest>[^\n]*)"
    r"(?P<more>(?:\n(?!\s*\d+:)[^\n]*)*)",
    re.M,
)
_OOS = re.compile(r"\boos:(\d+)")


def parse_proc_drbd(text: str) -> ProcDrbd:
    """Parse DRBD 8.4's ``/proc/drbd``.

    Raises:
        DrbdError: no ``version:`` line (the module is not loaded or not 8.x).
    """
    m = _VERSION.search(text)
    if m is None:
        raise DrbdError("-", "cat /proc/drbd", 1, f"no version line in {text[:200]!r}")
    minors = {}
    for d in _MINOR.finditer(text):
        oos = _OOS.search(d.group("more") or "")
        minor = int(d.group(1))
        minors[minor] = DrbdMinor(
            minor=minor,
            cs=d.group(2),
            role=d.group(3),
            peer_role=d.group(4),
            disk=d.group(5),
            peer_disk=d.group(6),
            oos_kib=int(oos.group(1)) if oos else None,
        )
    return ProcDrbd(m.group(1), minors)


def proc_drbd(runner: Runner) -> ProcDrbd:
    """The parsed ``/proc/drbd`` of an L1. Raises AgentError or DrbdError."""
    return parse_proc_drbd(runner.run("cat /proc/drbd", timeout=30).stdout)


def load_module(runner: Runner) -> str:
    """``modprobe drbd`` in the L1; the module's version. Raises AgentError or DrbdError."""
    runner.run("modprobe drbd", timeout=60)
    return proc_drbd(runner).version


def wait_drbd(
    runner: Runner,
    minor: int,
    condition: Callable[[DrbdMinor], bool],
    what: str,
    *,
    timeout: float,
    interval: float = 0.25,
) -> tuple[DrbdMinor, float]:
    """Poll /proc/drbd until ``condition`` holds for ``minor``; it and the seconds waited.

    Raises:
        DrbdError: not within ``timeout`` (the last state in the message).
        AgentError: the L1 stopped answering.
    """
    t0 = time.monotonic()
    last: DrbdMinor | None = None
    while True:
        last = proc_drbd(runner).minors.get(minor)
        if last is not None and condition(last):
            return last, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise DrbdError(
                "-", "cat /proc/drbd", 124, f"not {what} after {timeout:.0f} s: last {last}"
            )
        time.sleep(interval)


def peer_lost_by(kernel_log: str) -> str:
    """How DRBD 8.4 lost its peer, from its kernel messages (``dmesg``): "disconnect"
    (``drbdadm disconnect`` here: ``conn( Connected -> Disconnecting )``), "network"
    (DRBD noticed by itself: ``NetworkFailure``, ``Timeout``, ``BrokenPipe`` after a
    missed ping or request), or "" (still connected, or never was); the first seen."""
    for line in kernel_log.splitlines():
        if "Connected -> Disconnecting" in line:
            return "disconnect"
        if re.search(r"Connected -> (NetworkFailure|Timeout|BrokenPipe|ProtocolError)", line):
            return "network"
    return ""


def refused_state_changes(kernel_log: str) -> list[str]:
    """The reasons of the state changes DRBD 8.4 refused, in order, from its kernel
    messages (``State change failed: Refusing to be Primary while peer is not
    outdated``): a promotion the engine had to try again shows here."""
    return re.findall(r"State change failed: (.+?)\s*$", kernel_log, re.M)


class GuestDrbdTools(DrbdTools):
    """drbd-utils inside an L1: each command runs through the L1's agent."""

    def __init__(self, runner: Runner, *, timeout_s: float = 120.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self.runner = runner

    def run(
        self,
        resource: str,
        argv: Sequence[str],
        *,
        node: str | None = None,
        ok_codes: Sequence[int] = (0,),
        record: bool = True,
        timeout_s: float | None = None,
    ) -> CommandResult:
        """Run ``argv`` inside the L1 (``LC_ALL=C``; ``__DRBD_NODE__`` when ``node``);
        ``timeout_s`` replaces :attr:`timeout_s` for this command.

        Raises:
            DrbdError: exit code not in ``ok_codes`` (124 for a timeout, 255 when the
                agent channel failed).
        """
        argv = tuple(argv)
        command = shlex.join(argv)
        env = "LC_ALL=C" + (f" __DRBD_NODE__={shlex.quote(node)}" if node else "")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        try:
            res = self.runner.run(f"{env} {command}", timeout=timeout, check=False)
        except VMError as err:
            raise DrbdError(resource, command, 255, f"L1 agent: {err}") from err
        if res.timed_out:
            raise DrbdError(resource, command, 124, f"timed out after {timeout} s")
        if res.exit_code not in ok_codes:
            raise DrbdError(resource, command, res.exit_code, res.stderr or res.stdout)
        return CommandResult(argv, res.exit_code, res.stdout, res.stderr, time.monotonic() - t0)


class L1DrbdResource(DrbdResource):
    """A resource of ``config`` on L1 node ``node``; every drbd-utils call runs in the L1.

    The resource file lives at ``/etc/drbd.d/<resource>.res`` inside the L1, where the
    kernel's calls to ``drbdadm`` (the fence-peer handler) find it through
    ``/etc/drbd.conf``.

    Raises:
        ConfigError: ``node`` is not a node of the resource.
    """

    def __init__(self, config: DrbdConfig, node: str, runner: Runner) -> None:
        super().__init__(
            config,
            node,
            config_path=f"/etc/drbd.d/{config.resource}.res",
            tools=GuestDrbdTools(runner),
        )
        self.runner = runner

    def write_config(self) -> Path:
        """Write the resource file inside the L1, in the loaded module's dialect; its
        path there.

        Raises:
            DrbdError: the module is not loaded, or the file cannot be written.
        """
        version = proc_drbd(self.runner).version
        text = render_for_kernel(self.config, version)
        path = shlex.quote(str(self.config_path))
        folder = shlex.quote(str(self.config_path.parent))
        try:
            self.runner.run(f"mkdir -p {folder} && cat > {path}", stdin=text.encode())
        except VMError as err:
            raise DrbdError(self.name, f"write {self.config_path}", 255, str(err)) from err
        return self.config_path


__all__ = [
    "DrbdMinor",
    "GuestDrbdTools",
    "L1DrbdResource",
    "ProcDrbd",
    "Runner",
    "load_module",
    "parse_proc_drbd",
    "peer_lost_by",
    "proc_drbd",
    "refused_state_changes",
    "render_for_kernel",
    "render_resource_84",
    "wait_drbd",
]
