"""Running drbd-utils (drbdadm, drbdsetup, drbdmeta) through ``sh``.

* :class:`DrbdTools` runs one command and turns every failure into
  :class:`~kemari_suite.errors.DrbdError` (resource, command, exit code, stderr). In
  dry-run mode it runs nothing and records the argv lists instead, so the sequences
  can be checked against drbdadm's own dry run (:meth:`DrbdTools.drbdadm_dry_run`).
* :class:`DrbdAdm` holds the operations on one resource whose file already exists
  (written by the playbooks): create-md, up, adjust, down, primary, secondary, connect,
  disconnect, verify, status (``drbdsetup status --json``) and events
  (``drbdsetup events2``).
* :class:`DrbdResource` adds the :class:`~kemari_suite.disk.drbdconf.DrbdConfig` it
  renders and writes (:meth:`DrbdResource.write_config`).

Both speak a dialect: "9" (the default) or "8.4", for the DRBD 8.4 module of Debian's
stock kernels. In "8.4" the resource file is rendered for drbdadm-84, ``events2`` goes
without ``--color`` (drbdsetup-84 refuses it, as it refuses ``status --json``), and
:meth:`DrbdAdm.status` is read from ``drbdsetup events2 RES --now --statistics``
(:func:`~kemari_suite.disk.drbd84.status_from_events`). :func:`detect_dialect` asks
``drbdadm --version`` which one the loaded module speaks.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sh

from kemari_suite.disk.drbd84 import Pair84, dialect_of, parse_module_version, status_from_events
from kemari_suite.disk.drbdconf import DEFAULT_CONFIG_DIR, DIALECTS, DrbdConfig, render_resource
from kemari_suite.disk.drbdevents import DrbdEvent, parse_events2
from kemari_suite.disk.drbdstatus import ResourceStatus, parse_status_json
from kemari_suite.errors import ConfigError, DiskError, DrbdError

#: Extra places to look for drbd-utils (a non-root PATH often lacks sbin).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class CommandResult:
    """One drbd-utils run (or, in dry-run mode, one recorded command)."""

    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    duration_s: float
    dry_run: bool = False

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def _tool_path(name: str) -> str:
    path = os.environ.get("PATH", "")
    found = shutil.which(name, path=os.pathsep.join([path, *_SBIN]))
    return found or name


class DrbdTools:
    """Runs drbdadm, drbdsetup and drbdmeta through ``sh``.

    With ``dry_run=True`` nothing is run: each command is appended to :attr:`recorded`
    and succeeds with empty output. :meth:`drbdadm_dry_run` always runs (``drbdadm -d``
    changes nothing).
    """

    def __init__(
        self,
        *,
        dry_run: bool = False,
        timeout_s: float = 60.0,
        binaries: Mapping[str, str] | None = None,
    ) -> None:
        self.dry_run = dry_run
        self.timeout_s = timeout_s
        #: Replaces a tool by another executable (tests: a scripted drbdsetup).
        self.binaries = dict(binaries or {})
        self.recorded: list[tuple[str, ...]] = []

    def _path(self, tool: str) -> str:
        return _tool_path(self.binaries.get(tool, tool))

    @staticmethod
    def _env(node: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
        # Stable, parseable messages.
        env["LC_ALL"] = "C"
        if node is not None:
            env["__DRBD_NODE__"] = node
        else:
            env.pop("__DRBD_NODE__", None)
        return env

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
        """Run ``argv`` (argv[0] is drbdadm, drbdsetup or drbdmeta).

        ``node`` sets ``__DRBD_NODE__`` (drbdadm then pretends to be that host); stdin is
        empty, so a tool that would ask a question gets end-of-file and fails instead of
        hanging. ``timeout_s`` replaces :attr:`timeout_s` for this command.

        Raises:
            DrbdError: the tool is missing, timed out, or exited with a code not in
                ``ok_codes`` (rc 127 for missing, 124 for a timeout).
        """
        argv = tuple(argv)
        if self.dry_run and record:
            self.recorded.append(argv)
            return CommandResult(argv, 0, "", "", 0.0, dry_run=True)
        command = shlex.join(argv)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        try:
            proc = sh.Command(self._path(argv[0]))(
                *argv[1:],
                _env=self._env(node),
                _in="",
                _timeout=timeout,
                _ok_code=list(ok_codes),
                _return_cmd=True,
            )
        except sh.CommandNotFound as err:
            raise DrbdError(
                resource, command, 127, f"{argv[0]} not found: install drbd-utils"
            ) from err
        except sh.TimeoutException as err:
            raise DrbdError(resource, command, 124, f"timed out after {timeout} s") from err
        except sh.ErrorReturnCode as err:
            raise DrbdError(
                resource, command, err.exit_code, _text(err.stderr) or _text(err.stdout)
            ) from err
        return CommandResult(
            argv,
            proc.exit_code if proc.exit_code is not None else 0,
            _text(proc.stdout),
            _text(proc.stderr),
            time.monotonic() - t0,
        )

    def stream(self, resource: str, argv: Sequence[str]) -> Generator[str, None, None]:
        """Run a long-lived command (``drbdsetup events2``) and yield its stdout lines.

        Closing the generator (or leaving the ``for`` loop early) terminates the command.

        Raises:
            DrbdError: the tool is missing or exits non-zero.
        """
        argv = tuple(argv)
        if self.dry_run:
            self.recorded.append(argv)
            return
        command = shlex.join(argv)
        try:
            # _bg_exc=False: the exit status is raised here, not printed by sh's thread.
            proc: Any = sh.Command(self._path(argv[0]))(
                *argv[1:], _env=self._env(None), _in="", _iter=True, _bg_exc=False
            )
        except sh.CommandNotFound as err:
            raise DrbdError(
                resource, command, 127, f"{argv[0]} not found: install drbd-utils"
            ) from err
        try:
            for line in proc:
                yield str(line)
        except sh.ErrorReturnCode as err:
            raise DrbdError(resource, command, err.exit_code, _text(err.stderr)) from err
        finally:
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    proc.process.terminate()
                with contextlib.suppress(sh.ErrorReturnCode, sh.SignalException):
                    proc.wait()

    def drbdadm_dry_run(self, resource: str, argv: Sequence[str], node: str) -> list[list[str]]:
        """What the drbdadm command ``argv`` would run on ``node``: drbdadm's own dry run.

        Inserts ``-d`` after ``drbdadm`` and pretends to be ``node``; returns the
        drbdsetup/drbdmeta command lines it prints, split like a shell would.

        Raises:
            DrbdError: drbdadm rejects the command or the configuration (it exits 1 for a
                resource not defined for this host, 10 for an invalid configuration, 20
                for an unreadable file).
        """
        if not argv or Path(argv[0]).name != "drbdadm":
            raise DiskError("drbd", f"not a drbdadm command: {shlex.join(argv)}")
        res = self.run(resource, [argv[0], "-d", *argv[1:]], node=node, record=False)
        return [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def detect_dialect(tools: DrbdTools | None = None) -> str:
    """The dialect ("9" or "8.4") of the loaded DRBD module, from ``drbdadm --version``
    run through ``tools`` (so inside an L1 too with the lab's tools).

    Raises:
        DrbdError: drbdadm failed.
        DiskError: its output names no module version (no module loaded, or a dry run,
            which prints nothing), or a version neither dialect covers.
    """
    tools = tools if tools is not None else DrbdTools()
    res = tools.run("-", ("drbdadm", "--version"))
    return dialect_of(parse_module_version(res.stdout))


class DrbdAdm:
    """The operations on DRBD resource ``resource``, whose file exists already.

    The resource file lives at ``config_path`` (default ``/etc/drbd.d/RES.res``, which
    ``/etc/drbd.conf`` includes: the kernel runs handlers through plain ``drbdadm``, so
    on a real host the file must be there). Every drbdadm call names it with ``-c``.

    ``dialect`` is the loaded module's: "9" or "8.4" (:func:`detect_dialect`). In "8.4",
    ``pair`` names what 8.4 cannot report in :meth:`status`: the node ids of this host
    and its peer, and the peer's name (default: 0, 1 and drbdsetup-84's ``peer``).

    Raises:
        ConfigError: an unknown dialect.
    """

    def __init__(
        self,
        resource: str,
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        dialect: str = "9",
        pair: Pair84 | None = None,
    ) -> None:
        if dialect not in DIALECTS:
            raise ConfigError(f"unknown DRBD dialect {dialect!r}", key="drbd.dialect")
        self.name = resource
        self.config_path = (
            Path(config_path) if config_path is not None else DEFAULT_CONFIG_DIR / f"{resource}.res"
        )
        self.tools = tools if tools is not None else DrbdTools()
        self.dialect = dialect
        self.pair = pair if pair is not None else Pair84()

    def drbdadm_argv(self, *args: str) -> tuple[str, ...]:
        return ("drbdadm", "-c", str(self.config_path), *args)

    def _adm(self, *args: str, timeout_s: float | None = None) -> CommandResult:
        return self.tools.run(self.name, self.drbdadm_argv(*args), timeout_s=timeout_s)

    # ---- operations (each raises DrbdError when the tool fails) ---------------------

    def create_md(self, *, force: bool = False, max_peers: int | None = None) -> CommandResult:
        """Write DRBD meta-data on the backing disk (once, when the resource is created).

        Without ``force`` drbdmeta refuses to overwrite what looks like existing data or
        meta-data (it would ask; stdin is empty, so it fails with DrbdError).
        """
        args = ["create-md"]
        if max_peers is not None:
            args.append(f"--max-peers={max_peers}")
        if force:
            args.append("--force")
        return self._adm(*args, self.name)

    def up(self) -> CommandResult:
        return self._adm("up", self.name)

    def adjust(self) -> CommandResult:
        """Make the kernel match the file; brings a down resource up (idempotent)."""
        return self._adm("adjust", self.name)

    def down(self) -> CommandResult:
        return self._adm("down", self.name)

    def primary(self, *, force: bool = False, timeout_s: float | None = None) -> CommandResult:
        """Become Primary. ``force`` only for the very first sync of a new resource:
        it declares this host's data good without an up-to-date peer.

        Without the peer, fencing ``resource-and-stonith`` makes the kernel run the
        fence-peer handler (the tiebreaker) before it answers: ``timeout_s`` bounds the
        whole (default: the tools' timeout)."""
        return self._adm("primary", *(["--force"] if force else []), self.name, timeout_s=timeout_s)

    def secondary(self) -> CommandResult:
        return self._adm("secondary", self.name)

    def connect(self, *, discard_my_data: bool = False) -> CommandResult:
        """Reconnect; ``discard_my_data`` on the split-brain *victim* only (see README)."""
        return self._adm("connect", *(["--discard-my-data"] if discard_my_data else []), self.name)

    def disconnect(self, *, force: bool = False) -> CommandResult:
        """Drop the connection (StandAlone). A plain disconnect asks the peer first, and
        a dead peer DRBD still counts as connected never answers: ``force`` drops it
        here at once (``drbdsetup disconnect --force``, 8.4 and 9)."""
        return self._adm("disconnect", *(["--force"] if force else []), self.name)

    def verify(self) -> CommandResult:
        """Start an online verify (uses ``verify-alg``); results arrive as events."""
        return self._adm("verify", self.name)

    def status_argv(self) -> tuple[str, ...]:
        """The command :meth:`status` runs: 8.4's drbdsetup has no ``status --json``."""
        if self.dialect == "8.4":
            return self.events_argv(now=True)
        return ("drbdsetup", "status", self.name, "--json")

    def status(self) -> ResourceStatus | None:
        """The parsed ``drbdsetup status --json RES`` (in "8.4": built from ``events2 RES
        --now --statistics``); None when the resource is not up.

        Raises:
            DrbdError: drbdsetup failed for another reason (no kernel module: rc 20).
            DiskError: its output is not in the documented format.
        """
        try:
            res = self.tools.run(self.name, self.status_argv())
        except DrbdError as err:
            # drbdsetup exits 10 with "RES: No such resource" for a resource not up.
            if err.rc == 10 and "No such resource" in err.stderr:
                return None
            raise
        if self.dialect == "8.4":
            return status_from_events(parse_events2(res.stdout.splitlines()), self.name, self.pair)
        if not res.stdout.strip():
            return None  # dry run
        for r in parse_status_json(res.stdout):
            if r.name == self.name:
                return r
        return None

    def events_argv(self, *, now: bool) -> tuple[str, ...]:
        return (
            "drbdsetup",
            "events2",
            self.name,
            *(["--now"] if now else []),
            "--statistics",
            "--timestamps",
            # 8.4's drbdsetup has no --color (exit 20) and never colours events2.
            *(["--color=never"] if self.dialect == "9" else []),
        )

    def events_now(self) -> list[DrbdEvent]:
        """The current state as events (``events2 --now``), ending with ``exists -``.

        Raises:
            DrbdError: drbdsetup failed.
            DiskError: a line is not in the events2 format.
        """
        res = self.tools.run(self.name, self.events_argv(now=True))
        return list(parse_events2(res.stdout.splitlines()))

    def watch(self) -> Generator[DrbdEvent, None, None]:
        """Follow ``drbdsetup events2``: the initial state, then every change.

        Closing the generator stops drbdsetup.

        Raises:
            DrbdError: drbdsetup failed or exited.
            DiskError: a line is not in the events2 format.
        """
        lines = self.tools.stream(self.name, self.events_argv(now=False))
        try:
            yield from parse_events2(lines)
        finally:
            lines.close()  # stops drbdsetup when the caller stops reading


class DrbdResource(DrbdAdm):
    """A resource whose file this host renders from ``config`` in ``dialect``, as seen
    from ``node``. In "8.4" the status takes the node ids and the peer's name from
    ``config``.

    Raises:
        ConfigError: ``node`` is not a node of the resource, or an unknown dialect.
    """

    def __init__(
        self,
        config: DrbdConfig,
        node: str,
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        dialect: str = "9",
    ) -> None:
        me = config.node(node)  # raises ConfigError for a stranger
        peers = [n for n in config.nodes if n.name != node]
        # 8.4 resources have exactly two nodes (render_resource refuses more).
        pair = Pair84(me.node_id, peers[0].node_id, peers[0].name) if len(peers) == 1 else None
        super().__init__(
            config.resource, config_path=config_path, tools=tools, dialect=dialect, pair=pair
        )
        self.config = config
        self.node = node

    def write_config(self) -> Path:
        """Write the resource file, rendered in the dialect, atomically (mode 0644).

        Raises:
            ConfigError: the 8.4 dialect cannot express the config.
            DiskError: the file cannot be written.
        """
        text = render_resource(self.config, dialect=self.dialect)
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        try:
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.config_path)
        except OSError as err:
            raise DiskError("drbd", f"cannot write {self.config_path}: {err.strerror}") from err
        return self.config_path


def check_with_drbdadm(
    config: DrbdConfig, config_path: str | os.PathLike[str], tools: DrbdTools | None = None
) -> dict[str, list[list[str]]]:
    """Check a written resource file with the real drbdadm for every node.

    Runs ``drbdadm -c FILE -d up RES`` with ``__DRBD_NODE__`` set to each node's name and
    returns, per node, the drbdsetup/drbdmeta commands drbdadm would run.

    Raises:
        DrbdError: drbdadm rejected the file for some node.
    """
    tools = tools if tools is not None else DrbdTools()
    out: dict[str, list[list[str]]] = {}
    for n in config.nodes:
        argv = ("drbdadm", "-c", str(config_path), "up", config.resource)
        out[n.name] = tools.drbdadm_dry_run(config.resource, argv, n.name)
    return out


__all__ = [
    "CommandResult",
    "DrbdAdm",
    "DrbdResource",
    "DrbdTools",
    "check_with_drbdadm",
    "detect_dialect",
]
