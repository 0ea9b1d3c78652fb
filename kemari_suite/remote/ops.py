"""``kemari remote``: operate a provisioned host pair over SSH (fabric over paramiko).

Both hosts are reached at once with a :class:`fabric.ThreadingGroup` for the read-only
operations (status, logs); start, stop and failover go host by host in the order that
keeps one guest at most:

* start: the standby first, then the primary (which needs its peer);
* stop: the standby first (a standby that outlives its primary could win the
  tiebreaker and resume the guest), then the primary;
* failover: ``kemari failover --yes`` on the secondary, refused while the primary still
  answers with a running agent (unless forced).

Host keys are checked: a host must be in the known_hosts file given (or the
inventory's ``kemari_known_hosts``, or the ``UserKnownHostsFile`` of its
``ansible_ssh_common_args``, or ``~/.ssh/known_hosts``); an unknown or changed key is a
:class:`~kemari_suite.errors.DeployError` naming the host. So is every connection,
authentication or command failure.

Per-host values (install root, config path, unit, command) travel as environment
variables of each connection, so one command line serves the whole group; the work on
the host is done by :mod:`kemari_suite.remote.probe` with the host's own Python.
"""

from __future__ import annotations

import getpass
import io
import json
import re
import secrets
import shlex
import socket
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import paramiko
from fabric import Config, Connection, ThreadingGroup
from fabric.exceptions import GroupException
from invoke.exceptions import CommandTimedOut, UnexpectedExit

from kemari_suite.deploy.inventory import HostSpec, Pair
from kemari_suite.errors import DeployError
from kemari_suite.remote import probe

Which = Literal["both", "primary", "secondary"]
_REMOTE_TMP = "/tmp"
#: What systemctl says where systemd is not PID 1.
_NO_SYSTEMD = re.compile(r"Failed to connect to bus|not been booted with systemd", re.I)


@dataclass(frozen=True)
class CommandResult:
    """One command on one host."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class HostStatus:
    """What a host says about its Kemari agent (or why it could not say)."""

    host: str
    role: str
    endpoint: str
    unit: str
    reachable: bool
    hostname: str = ""
    #: True when a service manager answered (systemd, or the inventory's substitute).
    systemd: bool = False
    #: systemctl is-active / is-enabled, or "unknown" / the enable link in files mode.
    unit_active: str = "unknown"
    unit_enabled: str = "unknown"
    unit_installed: bool = False
    config_present: bool = False
    kemari_installed: bool = False
    #: ``kemari status --json`` of the running agent.
    agent: dict[str, Any] | None = None
    #: Why there is no agent status (not running, not installed ...).
    agent_error: str | None = None
    #: Why the host could not be asked at all.
    error: DeployError | None = None

    @property
    def state(self) -> str:
        """One word: unreachable, running, stopped or not-deployed."""
        if not self.reachable:
            return "unreachable"
        if self.agent is not None or self.unit_active == "active":
            return "running"
        if not (self.unit_installed and self.config_present):
            return "not-deployed"
        return "stopped"

    def to_dict(self) -> dict[str, Any]:
        # Not asdict(): it would deep-copy the exception.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["error"] = str(self.error) if self.error else None
        d["state"] = self.state
        return d


@dataclass(frozen=True)
class PairStatus:
    """Both hosts of a pair."""

    group: str
    primary: HostStatus
    secondary: HostStatus

    @property
    def hosts(self) -> tuple[HostStatus, HostStatus]:
        return (self.primary, self.secondary)

    @property
    def errors(self) -> list[DeployError]:
        return [h.error for h in self.hosts if h.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "primary": self.primary.to_dict(),
            "secondary": self.secondary.to_dict(),
        }


@dataclass(frozen=True)
class LogBundle:
    """The tarball :meth:`RemotePair.collect_logs` wrote."""

    path: Path
    hosts: tuple[str, ...]
    errors: tuple[DeployError, ...] = field(default_factory=tuple)


def host_status(
    h: HostSpec, data: Mapping[str, Any] | None, *, error: DeployError | None = None
) -> HostStatus:
    """A :class:`HostStatus` from the probe's JSON (``None``: the host was not reached)."""
    if data is None:
        return HostStatus(h.name, h.role, h.endpoint, h.unit, reachable=False, error=error)
    agent = data.get("agent")
    agent_error = data.get("agent_error")
    return HostStatus(
        h.name,
        h.role,
        h.endpoint,
        h.unit,
        reachable=True,
        hostname=str(data.get("hostname", "")),
        systemd=bool(data.get("systemd", False)),
        unit_active=str(data.get("unit_active", "unknown")),
        unit_enabled=str(data.get("unit_enabled", "unknown")),
        unit_installed=bool(data.get("unit_installed", False)),
        config_present=bool(data.get("config_present", False)),
        kemari_installed=bool(data.get("kemari_installed", False)),
        agent=dict(agent) if isinstance(agent, dict) else None,
        agent_error=str(agent_error) if agent_error is not None else None,
        error=error,
    )


def _host_env(h: HostSpec) -> dict[str, str]:
    return {
        "KEMARI_HOST": h.name,
        "KEMARI_ROOT": h.root,
        "KEMARI_CONFIG": h.config_path,
        "KEMARI_UNIT": h.unit,
        "KEMARI_BIN": h.command,
        "KEMARI_SYSTEMCTL": h.systemctl,
        "KEMARI_PYTHON": h.python,
        # kemari's own messages unwrapped and uncoloured (rich reads these).
        "COLUMNS": "500",
        "NO_COLOR": "1",
    }


def explain(h: HostSpec, err: BaseException, *, task: str, known_hosts: Path | None) -> DeployError:
    """A :class:`DeployError` naming ``h`` for an exception from fabric or paramiko."""
    kh = str(known_hosts) if known_hosts else "~/.ssh/known_hosts"
    if isinstance(err, DeployError):
        return err
    if isinstance(err, paramiko.BadHostKeyException):
        reason = (
            f"host key of {h.endpoint} does not match {kh} (the host was reinstalled, "
            "or someone is in the middle); check it before replacing the entry"
        )
    elif isinstance(err, paramiko.AuthenticationException):
        key = f"key {h.key_file}" if h.key_file else "the agent's and default keys"
        reason = f"authentication failed at {h.endpoint} for user {_user(h)} with {key}"
    elif isinstance(err, paramiko.SSHException) and "known_hosts" in str(err):
        reason = (
            f"unknown host key: {h.endpoint} is not in {kh}; verify the host's key and add "
            f"it (ssh-keyscan -p {h.port} {h.address})"
        )
    elif isinstance(err, UnexpectedExit):
        r = err.result
        reason = f"`{_short(r.command, h)}` exited {r.exited}: {last_error(r.stderr or r.stdout)}"
        if "KEMARI_SYSTEMCTL" in r.command and _NO_SYSTEMD.search(r.stderr or ""):
            reason += " (systemd does not run this host's services)"
    elif isinstance(err, CommandTimedOut):
        reason = f"command timed out after {err.timeout}s"
    elif isinstance(err, TimeoutError | socket.timeout):
        reason = f"cannot connect to {h.endpoint}: timed out"
    elif isinstance(err, OSError):
        text = err.strerror or str(err)
        if isinstance(err, paramiko.ssh_exception.NoValidConnectionsError):
            text = "; ".join(sorted({e.strerror or str(e) for e in err.errors.values()}))
        reason = f"cannot connect to {h.endpoint}: {text}"
    elif isinstance(err, paramiko.SSHException):
        reason = f"ssh to {h.endpoint}: {err}"
    else:
        reason = f"{type(err).__name__}: {err}"
    return DeployError(h.name, reason, task)


def _short(command: str, h: HostSpec, limit: int = 160) -> str:
    """``command`` as the operator would have typed it on ``h``."""
    if '"$KEMARI_PYTHON" -c ' in command:
        # The probe's inline script is long; say what it was asked to do instead.
        return "kemari probe " + command.rsplit("'", 1)[-1].strip()
    for var, value in _host_env(h).items():
        command = command.replace(f'"${var}"', shlex.quote(value))
    command = command.split(" && ", 1)[-1] if command.startswith("export ") else command
    return command if len(command) <= limit else command[: limit - 3] + "..."


def last_error(text: str) -> str:
    """The error a command printed last, its wrapped lines joined ("-" for none)."""
    flat = " ".join(text.split())
    if "error:" in flat:
        return flat[flat.rindex("error:") + len("error:") :].strip() or "-"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "-"


def _user(h: HostSpec) -> str:
    return h.user or getpass.getuser()


class RemotePair:
    """SSH connections to both hosts of a :class:`Pair`.

    Use as a context manager (connections are opened on first use and closed on exit).
    """

    def __init__(
        self,
        pair: Pair,
        *,
        known_hosts: Path | None = None,
        connect_timeout: float = 10.0,
        command_timeout: float = 120.0,
    ) -> None:
        self.pair = pair
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._conns: dict[str, Connection] = {}

    # ---- connections -------------------------------------------------------------

    def known_hosts_for(self, h: HostSpec) -> Path | None:
        return self.known_hosts or h.known_hosts

    def _connection(self, h: HostSpec) -> Connection:
        if h.name in self._conns:
            return self._conns[h.name]
        config = Config(
            overrides={
                "run": {"env": _host_env(h), "hide": True, "warn": False, "in_stream": False},
                "timeouts": {"command": int(self.command_timeout)},
            }
        )
        connect_kwargs: dict[str, Any] = {
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
        }
        if h.key_file is not None:
            # Only the inventory's key: a wrong key must fail, not fall back to others.
            connect_kwargs.update(
                key_filename=[str(h.key_file)], look_for_keys=False, allow_agent=False
            )
        conn = Connection(
            host=h.address,
            user=_user(h),
            port=h.port,
            config=config,
            connect_timeout=int(self.connect_timeout),
            connect_kwargs=connect_kwargs,
            inline_ssh_env=True,
        )
        # fabric accepts any host key by default; Kemari does not.
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        kh = self.known_hosts_for(h)
        try:
            if kh is not None:
                conn.client.load_system_host_keys(str(kh))
            else:
                conn.client.load_system_host_keys()
        except OSError as err:
            raise DeployError(
                h.name, f"cannot read known_hosts {kh}: {err.strerror or err}", "connect"
            ) from err
        self._conns[h.name] = conn
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _hosts(self, which: Which) -> list[HostSpec]:
        if which == "primary":
            return [self.pair.primary]
        if which == "secondary":
            return [self.pair.secondary]
        return [self.pair.primary, self.pair.secondary]

    def _wrap(self, h: HostSpec, command: str) -> str:
        if not h.become:
            return command
        keep = ",".join(_host_env(h))
        return f"sudo -n --preserve-env={keep} sh -c {shlex.quote(command)}"

    def _run(self, h: HostSpec, command: str, *, task: str) -> CommandResult:
        """Run ``command`` on ``h``.

        Raises:
            DeployError: cannot connect, or the command failed (exit code and stderr).
        """
        started = time.monotonic()
        try:
            conn = self._connection(h)
            r = conn.run(self._wrap(h, command))
        except Exception as err:
            raise explain(h, err, task=task, known_hosts=self.known_hosts_for(h)) from err
        return CommandResult(
            h.name, command, r.exited, r.stdout, r.stderr, time.monotonic() - started
        )

    def _run_group(
        self, hosts: list[HostSpec], command: Callable[[HostSpec], str], *, task: str
    ) -> dict[str, CommandResult | DeployError]:
        """Run one command line on several hosts at once (a fabric ThreadingGroup).

        ``command(h)`` must give the same text for every host (per-host values come
        from the connection's environment); it is a callable only for ``become``.
        """
        out: dict[str, CommandResult | DeployError] = {}
        conns: dict[str, Connection] = {}
        for h in hosts:
            try:
                conns[h.name] = self._connection(h)
            except DeployError as err:
                out[h.name] = err
        by_conn = {id(c): h for h in hosts if (c := conns.get(h.name)) is not None}
        texts = {command(h) for h in hosts if h.name in conns}
        if not conns:
            return out
        started = time.monotonic()
        # fabric's group results are keyed by connection, and connections to the same
        # user@host:port compare equal: such hosts go one by one.
        distinct = len({(c.user, c.host, c.port) for c in conns.values()}) == len(conns)
        if len(texts) == 1 and distinct:
            group = ThreadingGroup.from_connections(list(conns.values()))
            try:
                results: Mapping[Connection, Any] = group.run(texts.pop())
            except GroupException as err:
                results = err.result
            pairs = [(by_conn[id(c)], r) for c, r in results.items()]
        else:  # sudo wrappers differ per host, or the hosts look alike: one by one
            pairs = []
            for h in hosts:
                if h.name in conns:
                    try:
                        pairs.append((h, conns[h.name].run(command(h))))
                    except Exception as err:
                        pairs.append((h, err))
        elapsed = time.monotonic() - started
        for h, r in pairs:
            if isinstance(r, BaseException):
                out[h.name] = explain(h, r, task=task, known_hosts=self.known_hosts_for(h))
            else:
                out[h.name] = CommandResult(
                    h.name, r.command, r.exited, r.stdout, r.stderr, elapsed
                )
        return out

    @staticmethod
    def _probe(action: str, *args: str) -> str:
        tail = " ".join(shlex.quote(a) for a in (action, *args))
        return f'"$KEMARI_PYTHON" -c {shlex.quote(probe.SCRIPT)} {tail}'

    # ---- operations --------------------------------------------------------------

    def status(self) -> PairStatus:
        """The state of both hosts. An unreachable host is reported, not raised."""
        hosts = self._hosts("both")
        results = self._run_group(
            hosts, lambda h: self._wrap(h, self._probe("status")), task="status"
        )
        statuses: list[HostStatus] = []
        for h in hosts:
            r = results[h.name]
            if isinstance(r, DeployError):
                statuses.append(host_status(h, None, error=r))
                continue
            try:
                data = json.loads(r.stdout.strip().splitlines()[-1])
                if not isinstance(data, dict):
                    raise ValueError(data)
            except (ValueError, IndexError):
                bad = DeployError(
                    h.name, f"the status probe printed no JSON: {r.stdout[:200]!r}", "status"
                )
                statuses.append(host_status(h, {}, error=bad))
                continue
            statuses.append(host_status(h, data))
        return PairStatus(self.pair.group, statuses[0], statuses[1])

    def _systemctl(self, verb: str, which: Which) -> list[CommandResult]:
        done: list[CommandResult] = []
        # The standby first, both ways (see the module docstring).
        order = [h for h in (self.pair.secondary, self.pair.primary) if h in self._hosts(which)]
        for h in order:
            done.append(self._run(h, f'"$KEMARI_SYSTEMCTL" {verb} "$KEMARI_UNIT"', task=verb))
        return done

    def start(self, which: Which = "both") -> list[CommandResult]:
        """Start the agents' units: the standby, then the primary.

        Raises:
            DeployError: naming the host whose unit did not start (the later one is
                not tried).
        """
        return self._systemctl("start", which)

    def stop(self, which: Which = "both") -> list[CommandResult]:
        """Stop the agents' units: the standby, then the primary.

        Raises:
            DeployError: naming the host whose unit did not stop.
        """
        return self._systemctl("stop", which)

    def failover(self, *, force: bool = False) -> dict[str, Any]:
        """Resume the guest on the secondary (``kemari failover --yes`` there).

        Refused while the primary answers and runs its agent, unless ``force``.

        Raises:
            DeployError: the primary still runs (host = the primary), or the failover
                failed on the secondary (host = the secondary, with kemari's error).
        """
        if not force:
            primary = self.status().primary
            if primary.reachable and primary.state == "running":
                raise DeployError(
                    self.pair.primary.name,
                    "the primary still runs its agent: a failover now would run two "
                    "guests; stop it first (kemari remote stop --only primary) or force",
                    "failover",
                )
        h = self.pair.secondary
        r = self._run(h, '"$KEMARI_BIN" failover --yes -c "$KEMARI_CONFIG"', task="failover")
        try:
            parsed = json.loads(r.stdout)
        except ValueError:
            return {"output": r.stdout.strip()}
        return parsed if isinstance(parsed, dict) else {"output": parsed}

    def collect_logs(self, dest: Path) -> LogBundle:
        """Gather each host's journal, unit, redacted config, DRBD files, agent
        artifacts and status into one tarball (``<host>/...`` inside).

        ``dest`` is a directory (a name is chosen) or a ``.tar.gz`` path. A host that
        cannot be reached is listed in :attr:`LogBundle.errors`; the others are kept.

        Raises:
            DeployError: no host could be reached (host ``all``).
        """
        token = secrets.token_hex(4)
        hosts = self._hosts("both")

        def remote_path(h: HostSpec) -> str:
            return f"{_REMOTE_TMP}/kemari-logs-{token}-{h.name}.tar.gz"

        # The host's name comes from the connection's environment: one command line.
        results = self._run_group(
            hosts,
            lambda h: self._wrap(
                h,
                self._probe("logs", f"{_REMOTE_TMP}/kemari-logs-{token}-")
                + '"$KEMARI_HOST".tar.gz',
            ),
            task="logs",
        )
        if dest.suffixes[-2:] == [".tar", ".gz"]:
            out = dest
        else:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            out = dest / f"kemari-logs-{self.pair.group}-{stamp}.tar.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        errors: list[DeployError] = []
        collected: list[str] = []
        with tarfile.open(out, "w:gz") as bundle:
            for h in hosts:
                r = results[h.name]
                if isinstance(r, DeployError):
                    errors.append(r)
                    continue
                buf = io.BytesIO()
                try:
                    self._connection(h).get(remote_path(h), local=buf)
                    self._run(h, f"rm -f {shlex.quote(remote_path(h))}", task="logs")
                except Exception as err:
                    errors.append(explain(h, err, task="logs", known_hosts=self.known_hosts_for(h)))
                    continue
                buf.seek(0)
                with tarfile.open(fileobj=buf, mode="r:gz") as part:
                    for member in part.getmembers():
                        if not member.isfile():
                            continue
                        data = part.extractfile(member)
                        member.name = f"{h.name}/{member.name}"
                        bundle.addfile(member, data)
                collected.append(h.name)
            summary = json.dumps(
                {
                    "group": self.pair.group,
                    "hosts": collected,
                    "errors": [str(e) for e in errors],
                    "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            ).encode()
            info = tarfile.TarInfo("summary.json")
            info.size = len(summary)
            info.mtime = int(time.time())
            bundle.addfile(info, io.BytesIO(summary))
        if not collected:
            out.unlink(missing_ok=True)
            reasons = "; ".join(str(e) for e in errors)
            raise DeployError("all", f"no logs collected: {reasons}", "logs")
        return LogBundle(out, tuple(collected), tuple(errors))
