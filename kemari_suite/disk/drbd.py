"""DRBD 9, protocol C, driven through drbd-utils (drbdadm, drbdsetup, drbdmeta) with ``sh``.

Three layers:

* :class:`DrbdConfig` (a frozen dataclass tree, validated on construction) and
  :func:`render_resource`, which writes the resource file with safe defaults:
  ``protocol C``; ``fencing resource-and-stonith`` with a ``fence-peer`` handler that runs
  the suite's tiebreaker (``kemari fence-peer --resource RES``); every
  ``after-sb-0pri/1pri/2pri`` policy ``disconnect`` (a split brain is never resolved by
  throwing one side's writes away automatically); ``verify-alg sha256``;
  ``auto-promote no`` (only the failover logic promotes); quorum off for two nodes, or
  majority with a diskless tiebreaker node.
* :class:`DrbdTools` runs one command and turns every failure into
  :class:`~kemari_suite.errors.DrbdError` (resource, command, exit code, stderr). In
  dry-run mode it runs nothing and records the argv lists instead, so the sequences
  can be checked against drbdadm's own dry run (:meth:`DrbdTools.drbdadm_dry_run`).
  :class:`DrbdResource` holds the operations: create-md, up, adjust, down, primary,
  secondary, connect, disconnect, verify, status (``drbdsetup status --json``) and
  events (``drbdsetup events2``).
* :class:`DrbdBackend`, the :class:`~kemari_suite.disk.base.DiskBackend`:
  attach = write the resource file + ``drbdadm adjust`` (which is ``up`` for a resource
  that is down, and idempotent otherwise), promote = ``primary``, demote =
  ``secondary``, apply = pwrite to ``/dev/drbdN``, status = the parsed JSON status.

The fence-peer handler runs on a primary that lost its peer, with I/O frozen. DRBD sets
``DRBD_RESOURCE``, ``DRBD_PEER_NODE_ID`` and friends in its environment; it must exit
with DRBD's documented codes (3: peer already outdated or worse, 4: peer outdated, 5:
peer unreachable and assumed dead, 6: outdate yourself, 7: peer STONITHed); when it
fails, I/O stays frozen until ``drbdadm resume-io``. The handler template is formatted
with ``{resource}``; see README.md for the contract ``kemari fence-peer`` implements.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import sh

from kemari_suite.disk.base import DiskRole, DiskStatus, FileDisk
from kemari_suite.disk.drbdstate import (
    DrbdEvent,
    ResourceStatus,
    Role,
    parse_events2,
    parse_status_json,
)
from kemari_suite.errors import ConfigError, DiskError, DrbdError

SplitBrainPolicy0 = Literal[
    "disconnect", "discard-younger-primary", "discard-older-primary", "discard-zero-changes",
    "discard-least-changes", "discard-node",
]  # fmt: skip
SplitBrainPolicy1 = Literal[
    "disconnect", "consensus", "violently-as0p", "discard-secondary", "call-pri-lost-after-sb"
]
SplitBrainPolicy2 = Literal["disconnect", "violently-as0p", "call-pri-lost-after-sb"]
Fencing = Literal["resource-and-stonith", "resource-only", "dont-care"]
OnNoQuorum = Literal["io-error", "suspend-io"]

#: DRBD 9 node ids are 0..31 and minors fit in 20 bits (drbdadm's dry run checks neither).
MAX_NODE_ID = 31
MAX_MINOR = (1 << 20) - 1
DEFAULT_CONFIG_DIR = Path("/etc/drbd.d")
#: Extra places to look for drbd-utils (a non-root PATH often lacks sbin).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9()-]{0,31}$")
_PATH = re.compile(r"^/[^\s\"'\\;{}#]*$")


@dataclass(frozen=True)
class DrbdNode:
    """One host of the resource.

    ``name`` must be the host's ``uname -n`` (drbdadm picks its ``on NAME`` section by it).
    ``address`` is an IP literal (DRBD does not resolve names). ``disk`` overrides the
    resource's backing disk on this node; ``"none"`` makes it a diskless tiebreaker
    (counted for quorum, holds no data).
    """

    name: str
    address: str
    node_id: int
    port: int = 7789
    disk: str = ""


@dataclass(frozen=True)
class QuorumOptions:
    """DRBD 9 quorum. ``quorum`` is "off", "majority", "all" or a node count."""

    quorum: str | int = "off"
    on_no_quorum: OnNoQuorum = "io-error"


@dataclass(frozen=True)
class DrbdConfig:
    """A DRBD resource with one volume, validated on construction.

    Raises:
        ConfigError: naming the field (``drbd.nodes[1].node_id`` ...) of the first bad value.
    """

    resource: str
    nodes: tuple[DrbdNode, ...]
    #: Backing disk on every node (unless the node overrides it).
    disk: str = ""
    minor: int = 0
    #: "internal" or the path of an external meta-data device.
    meta_disk: str = "internal"
    verify_alg: str = "sha256"
    fencing: Fencing = "resource-and-stonith"
    #: Formatted with ``{resource}``; empty for none (then ``fencing`` must be dont-care).
    fence_peer_handler: str = "kemari fence-peer --resource {resource}"
    #: Run by DRBD when a split brain is not resolved automatically (notification only).
    split_brain_handler: str = ""
    after_sb_0pri: SplitBrainPolicy0 = "disconnect"
    after_sb_1pri: SplitBrainPolicy1 = "disconnect"
    after_sb_2pri: SplitBrainPolicy2 = "disconnect"
    quorum: QuorumOptions = field(default_factory=QuorumOptions)
    #: DRBD 9 promotes on open by default; Kemari promotes only on failover.
    auto_promote: bool = False

    def __post_init__(self) -> None:
        validate(self)

    def node(self, name: str) -> DrbdNode:
        """Raises ConfigError when ``name`` is not a node of the resource."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"{name!r} is not a node of resource {self.resource} "
            f"(nodes: {', '.join(n.name for n in self.nodes)})",
            key="drbd.nodes",
        )

    def disk_of(self, node: DrbdNode) -> str:
        return node.disk or self.disk

    @property
    def device(self) -> str:
        return f"/dev/drbd{self.minor}"


def _bad(key: str, reason: str) -> ConfigError:
    return ConfigError(reason, key=f"drbd.{key}")


def _check_command(key: str, template: str, resource: str) -> None:
    try:
        cmd = template.format(resource=resource)
    except (KeyError, IndexError, ValueError) as err:
        raise _bad(key, f"bad template (only {{resource}} is substituted): {err}") from err
    if any(c in cmd for c in '"\\\n\r;{}#'):
        raise _bad(key, "must not contain quotes, backslashes, ';', braces, '#' or newlines")


def validate(cfg: DrbdConfig) -> None:
    """Check what drbdadm's dry run does not (node-id and minor ranges, ports, duplicates).

    Raises:
        ConfigError: naming the field of the first bad value.
    """
    if not _NAME.match(cfg.resource) or cfg.resource == "all":
        raise _bad("resource", f"{cfg.resource!r}: 1-63 letters, digits, '_', '.', '+', '-'")
    if not isinstance(cfg.nodes, tuple):
        raise _bad("nodes", f"expected a tuple of nodes, got {type(cfg.nodes).__name__}")
    if len(cfg.nodes) < 2:
        raise _bad("nodes", "a resource needs at least two nodes")
    if len(cfg.nodes) > MAX_NODE_ID + 1:
        raise _bad("nodes", f"at most {MAX_NODE_ID + 1} nodes")
    names: dict[str, int] = {}
    ids: dict[int, int] = {}
    endpoints: dict[tuple[str, int], int] = {}
    data_nodes = 0
    for i, n in enumerate(cfg.nodes):
        key = f"nodes[{i}]"
        if not isinstance(n, DrbdNode):
            raise _bad(key, f"expected a node, got {n!r}")
        if not n.name:
            raise _bad(f"{key}.name", "missing")
        if not _HOST.match(n.name):
            raise _bad(f"{key}.name", f"{n.name!r} is not a host name")
        if n.name in names:
            raise _bad(f"{key}.name", f"{n.name!r} already used by nodes[{names[n.name]}]")
        names[n.name] = i
        if isinstance(n.node_id, bool) or not isinstance(n.node_id, int):
            raise _bad(f"{key}.node_id", f"expected an integer, got {n.node_id!r}")
        if not 0 <= n.node_id <= MAX_NODE_ID:
            raise _bad(f"{key}.node_id", f"{n.node_id} is not in 0..{MAX_NODE_ID}")
        if n.node_id in ids:
            raise _bad(f"{key}.node_id", f"{n.node_id} already used by nodes[{ids[n.node_id]}]")
        ids[n.node_id] = i
        if not n.address:
            raise _bad(f"{key}.address", "missing")
        try:
            addr = ipaddress.ip_address(n.address)
        except ValueError:
            raise _bad(
                f"{key}.address", f"{n.address!r} is not an IP address (DRBD needs one)"
            ) from None
        if addr.is_unspecified or addr.is_multicast:
            raise _bad(f"{key}.address", f"{n.address} cannot be a node address")
        if isinstance(n.port, bool) or not isinstance(n.port, int) or not 1 <= n.port <= 65535:
            raise _bad(f"{key}.port", f"{n.port!r} is not a TCP port (1..65535)")
        if (str(addr), n.port) in endpoints:
            raise _bad(
                f"{key}.port",
                f"{n.address}:{n.port} already used by nodes[{endpoints[(str(addr), n.port)]}]",
            )
        endpoints[(str(addr), n.port)] = i
        disk = cfg.disk_of(n)
        if not disk:
            raise _bad(f"{key}.disk", "no backing disk (set drbd.disk or the node's disk)")
        if disk != "none":
            if not _PATH.match(disk):
                raise _bad(f"{key}.disk", f"{disk!r} is not an absolute device path")
            data_nodes += 1
    if data_nodes < 2:
        raise _bad("nodes", "at least two nodes need a backing disk")
    if isinstance(cfg.minor, bool) or not isinstance(cfg.minor, int):
        raise _bad("minor", f"expected an integer, got {cfg.minor!r}")
    if not 0 <= cfg.minor <= MAX_MINOR:
        raise _bad("minor", f"{cfg.minor} is not in 0..{MAX_MINOR}")
    if cfg.meta_disk != "internal" and not _PATH.match(cfg.meta_disk):
        raise _bad("meta_disk", f"{cfg.meta_disk!r}: 'internal' or an absolute device path")
    if not _TOKEN.match(cfg.verify_alg):
        raise _bad("verify_alg", f"{cfg.verify_alg!r} is not a kernel hash name")
    if cfg.fencing not in ("resource-and-stonith", "resource-only", "dont-care"):
        raise _bad("fencing", f"{cfg.fencing!r} is not a fencing policy")
    if cfg.fence_peer_handler:
        _check_command("fence_peer_handler", cfg.fence_peer_handler, cfg.resource)
    elif cfg.fencing != "dont-care":
        raise _bad("fence_peer_handler", f"fencing {cfg.fencing} needs a fence-peer handler")
    if cfg.split_brain_handler:
        _check_command("split_brain_handler", cfg.split_brain_handler, cfg.resource)
    for key, value, allowed in (
        ("after_sb_0pri", cfg.after_sb_0pri, SplitBrainPolicy0),
        ("after_sb_1pri", cfg.after_sb_1pri, SplitBrainPolicy1),
        ("after_sb_2pri", cfg.after_sb_2pri, SplitBrainPolicy2),
    ):
        if value not in get_args(allowed):
            raise _bad(key, f"{value!r} is not one of {', '.join(get_args(allowed))}")
    q = cfg.quorum.quorum
    if isinstance(q, bool) or not (
        q in ("off", "majority", "all") or (isinstance(q, int) and 1 <= q <= len(cfg.nodes))
    ):
        raise _bad("quorum.quorum", f"{q!r}: 'off', 'majority', 'all' or 1..{len(cfg.nodes)} nodes")
    if cfg.quorum.on_no_quorum not in ("io-error", "suspend-io"):
        raise _bad("quorum.on_no_quorum", f"{cfg.quorum.on_no_quorum!r}")


def _address(node: DrbdNode) -> str:
    addr = ipaddress.ip_address(node.address)
    if addr.version == 6:
        return f"ipv6 [{addr}]:{node.port}"
    return f"ipv4 {addr}:{node.port}"


def render_resource(cfg: DrbdConfig) -> str:
    """The resource file for ``cfg`` (drbd.conf syntax, DRBD 9)."""
    r = cfg.resource
    opts = [f"quorum {cfg.quorum.quorum};"]
    if cfg.quorum.quorum != "off":
        opts.append(f"on-no-quorum {cfg.quorum.on_no_quorum};")
    opts.append(f"auto-promote {'yes' if cfg.auto_promote else 'no'};")
    handlers = []
    if cfg.fence_peer_handler:
        handlers.append(f'fence-peer "{cfg.fence_peer_handler.format(resource=r)}";')
    if cfg.split_brain_handler:
        handlers.append(f'split-brain "{cfg.split_brain_handler.format(resource=r)}";')
    lines = [
        f"# Kemari Suite: DRBD resource {r}. Generated; edit the Kemari config instead.",
        f"resource {r} {{",
        "  options {",
        *(f"    {o}" for o in opts),
        "  }",
        "  net {",
        "    protocol C;",
        f"    fencing {cfg.fencing};",
        f"    verify-alg {cfg.verify_alg};",
        f"    after-sb-0pri {cfg.after_sb_0pri};",
        f"    after-sb-1pri {cfg.after_sb_1pri};",
        f"    after-sb-2pri {cfg.after_sb_2pri};",
        "    rr-conflict disconnect;",
        "  }",
    ]
    if handlers:
        lines += ["  handlers {", *(f"    {h}" for h in handlers), "  }"]
    for n in cfg.nodes:
        disk = cfg.disk_of(n)
        lines += [
            f"  on {n.name} {{",
            f"    node-id {n.node_id};",
            f"    address {_address(n)};",
            "    volume 0 {",
            f"      device minor {cfg.minor};",
        ]
        if disk == "none":
            lines.append("      disk none;")
        else:
            meta = "internal" if cfg.meta_disk == "internal" else f'"{cfg.meta_disk}"'
            lines += [f'      disk "{disk}";', f"      meta-disk {meta};"]
        lines += ["    }", "  }"]
    lines += [
        "  connection-mesh {",
        f"    hosts {' '.join(n.name for n in cfg.nodes)};",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


def drbd_config_from_dict(
    data: dict[str, Any], *, path: str | None = None, prefix: str = "disk.drbd"
) -> DrbdConfig:
    """Build a DrbdConfig from a TOML table, naming the file and dotted key on error.

    Raises:
        ConfigError: an unknown key, a wrong type or an invalid value.
    """
    from kemari_suite import config as _config

    try:
        return _config.build(DrbdConfig, data, path=path, prefix=prefix)
    except ConfigError as err:
        if err.path is None and err.key and err.key.startswith("drbd."):
            raise ConfigError(err.reason, path=path, key=f"{prefix}{err.key[4:]}") from err
        raise


# ---- running the tools ------------------------------------------------------------------


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
    ) -> CommandResult:
        """Run ``argv`` (argv[0] is drbdadm, drbdsetup or drbdmeta).

        ``node`` sets ``__DRBD_NODE__`` (drbdadm then pretends to be that host); stdin is
        empty, so a tool that would ask a question gets end-of-file and fails instead of
        hanging.

        Raises:
            DrbdError: the tool is missing, timed out, or exited with a code not in
                ``ok_codes`` (rc 127 for missing, 124 for a timeout).
        """
        argv = tuple(argv)
        if self.dry_run and record:
            self.recorded.append(argv)
            return CommandResult(argv, 0, "", "", 0.0, dry_run=True)
        command = shlex.join(argv)
        t0 = time.monotonic()
        try:
            proc = sh.Command(self._path(argv[0]))(
                *argv[1:],
                _env=self._env(node),
                _in="",
                _timeout=self.timeout_s,
                _ok_code=list(ok_codes),
                _return_cmd=True,
            )
        except sh.CommandNotFound as err:
            raise DrbdError(
                resource, command, 127, f"{argv[0]} not found: install drbd-utils"
            ) from err
        except sh.TimeoutException as err:
            raise DrbdError(resource, command, 124, f"timed out after {self.timeout_s} s") from err
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


class DrbdResource:
    """The operations on one DRBD resource, as seen from host ``node``.

    The resource file lives at ``config_path`` (default ``/etc/drbd.d/RES.res``, which
    ``/etc/drbd.conf`` includes: the kernel runs handlers through plain ``drbdadm``, so
    on a real host the file must be there). Every drbdadm call names it with ``-c``.
    """

    def __init__(
        self,
        config: DrbdConfig,
        node: str,
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
    ) -> None:
        config.node(node)  # raises ConfigError for a stranger
        self.config = config
        self.node = node
        self.config_path = (
            Path(config_path)
            if config_path is not None
            else DEFAULT_CONFIG_DIR / f"{config.resource}.res"
        )
        self.tools = tools if tools is not None else DrbdTools()

    @property
    def name(self) -> str:
        return self.config.resource

    def write_config(self) -> Path:
        """Write the rendered resource file atomically (mode 0644).

        Raises:
            DiskError: the file cannot be written.
        """
        text = render_resource(self.config)
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        try:
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.config_path)
        except OSError as err:
            raise DiskError("drbd", f"cannot write {self.config_path}: {err.strerror}") from err
        return self.config_path

    def drbdadm_argv(self, *args: str) -> tuple[str, ...]:
        return ("drbdadm", "-c", str(self.config_path), *args)

    def _adm(self, *args: str) -> CommandResult:
        return self.tools.run(self.name, self.drbdadm_argv(*args))

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

    def primary(self, *, force: bool = False) -> CommandResult:
        """Become Primary. ``force`` only for the very first sync of a new resource:
        it declares this host's data good without an up-to-date peer."""
        return self._adm("primary", *(["--force"] if force else []), self.name)

    def secondary(self) -> CommandResult:
        return self._adm("secondary", self.name)

    def connect(self, *, discard_my_data: bool = False) -> CommandResult:
        """Reconnect; ``discard_my_data`` on the split-brain *victim* only (see README)."""
        return self._adm("connect", *(["--discard-my-data"] if discard_my_data else []), self.name)

    def disconnect(self) -> CommandResult:
        return self._adm("disconnect", self.name)

    def verify(self) -> CommandResult:
        """Start an online verify (uses ``verify-alg``); results arrive as events."""
        return self._adm("verify", self.name)

    def status_argv(self) -> tuple[str, ...]:
        return ("drbdsetup", "status", self.name, "--json")

    def status(self) -> ResourceStatus | None:
        """The parsed ``drbdsetup status --json RES``; None when the resource is not up.

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
            "--color=never",
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


class DrbdBackend:
    """The DRBD :class:`~kemari_suite.disk.base.DiskBackend`.

    ``device_path`` replaces ``/dev/drbdN`` (tests, dry runs).
    """

    name = "drbd"

    def __init__(
        self,
        config: DrbdConfig,
        node: str,
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        device_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.resource = DrbdResource(config, node, config_path=config_path, tools=tools)
        self.device_path = Path(device_path) if device_path is not None else Path(config.device)
        self._disk: FileDisk | None = None
        self._attached = False

    def attach(self) -> None:
        """Write the resource file and ``drbdadm adjust`` (``up`` when down).

        Raises:
            DrbdError: drbdadm failed.
        """
        self.resource.write_config()
        self.resource.adjust()
        self._attached = True

    def promote(self) -> None:
        """``drbdadm primary`` (never forced), then open the device for writing.

        Raises:
            DrbdError: DRBD refused (the peer is Primary, no up-to-date data, no quorum).
        """
        self.resource.primary()
        if self._disk is None:
            disk = FileDisk(self.device_path)
            disk.attach()
            disk.promote()
            self._disk = disk

    def demote(self) -> None:
        """Flush and close the device, then ``drbdadm secondary``.

        Raises:
            DrbdError: DRBD refused (the device is still open elsewhere).
        """
        if self._disk is not None:
            disk, self._disk = self._disk, None
            try:
                disk.flush()
            finally:
                disk.close()
        self.resource.secondary()

    def _writer(self) -> FileDisk:
        if self._disk is None:
            raise DiskError(self.name, f"{self.resource.name}: not primary on this host")
        return self._disk

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """pwrite to the DRBD device; with protocol C a write completes once both disks have it.

        Raises:
            DiskError: not primary here, or the write failed.
        """
        self._writer().apply(writes)

    def flush(self) -> None:
        self._writer().flush()

    def status(self) -> DiskStatus:
        """Parsed ``drbdsetup status --json``.

        Raises:
            DrbdError: drbdsetup failed (not for a resource that is simply down).
        """
        st = self.resource.status()
        if st is None:
            return DiskStatus(
                self.name,
                DiskRole.UNKNOWN,
                connected=False,
                up_to_date=False,
                resync_percent=None,
                detail={"resource": self.resource.name, "state": "down"},
            )
        role = {
            Role.PRIMARY: DiskRole.PRIMARY,
            Role.SECONDARY: DiskRole.SECONDARY,
            Role.UNKNOWN: DiskRole.UNKNOWN,
        }[st.role]
        return DiskStatus(
            self.name,
            role,
            connected=st.connected,
            up_to_date=st.up_to_date,
            resync_percent=st.resync_percent,
            detail={**st.to_dict(), "peers_up_to_date": st.peers_up_to_date},
        )

    def close(self) -> None:
        """Close the device (the resource stays up: ``resource.down()`` takes it down)."""
        if self._disk is not None:
            disk, self._disk = self._disk, None
            disk.close()
