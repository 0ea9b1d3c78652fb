"""``kemari status --all``: every agent on this host, one row per VM.

Agents are found two ways, and each control socket is asked once:

* the configs the units run (``/etc/kemari/vms/*.toml``, ``/etc/kemari/kemari.toml``,
  and ``-c CONFIG`` when given): each names its VM and run dir, hence its socket;
* the run dirs those configs (and the default ``/run/kemari``) name: every
  ``<run_dir>/kemari-<vm>/control.sock``, for agents started by hand.

A socket that does not answer (a stale file, a hung agent) is a row saying so ("no
answer", and the reason below the table), never a failure of the whole listing. The
last pause is the status's ``last_pause_ms`` when the agent reports one, else the last
row of the newest ``checkpoints.jsonl`` of that VM and role under
``<run_dir>/artifacts``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kemari_suite.config import KemariConfig, PathsConfig, load
from kemari_suite.errors import KemariError

#: Where the playbooks put one config per VM (the units' ``-c /etc/kemari/vms/%i.toml``).
VMS_DIR = Path("/etc/kemari/vms")
#: The single-VM deploy's config.
MAIN_CONFIG = Path("/etc/kemari/kemari.toml")
#: Seconds each agent has to answer.
TIMEOUT_S = 3.0
_SOCKET = "control.sock"
_PREFIX = "kemari-"


@dataclass(frozen=True)
class Found:
    """A control socket to ask, and the VM name it belongs to (from its config, or its
    folder's name)."""

    vm: str
    socket: Path
    config: Path | None = None


@dataclass
class VMRow:
    """One VM of this host, as ``kemari status --all`` shows it."""

    name: str
    socket: str
    config: str | None = None
    answered: bool = False
    role: str | None = None
    state: str | None = None
    #: Primary: epochs closed and not yet acknowledged.
    epoch_lag: int | None = None
    last_committed_epoch: int | None = None
    last_pause_ms: float | None = None
    held_bytes: int | None = None
    #: Wall clock (seconds since the epoch) since which the VM is protected (primary
    #: PROTECTED, standby STANDBY); None when it is not.
    protected_since: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def config_files(vms_dir: Path | None = None, main: Path | None = None) -> list[Path]:
    """The per-VM configs in ``vms_dir`` (sorted; default :data:`VMS_DIR`), then
    ``main`` (default :data:`MAIN_CONFIG`) when it exists."""
    vms_dir = VMS_DIR if vms_dir is None else vms_dir
    main = MAIN_CONFIG if main is None else main
    out = sorted(vms_dir.glob("*.toml")) if vms_dir.is_dir() else []
    if main.is_file():
        out.append(main)
    return out


def discover(
    configs: Iterable[Path], run_dirs: Iterable[Path] = ()
) -> tuple[list[Found], list[VMRow]]:
    """The sockets to ask: those of ``configs``, then any other under their run dirs
    and ``run_dirs``. Returns them with a row for each config that cannot be read."""
    from kemari_suite.node import control_path

    found: dict[Path, Found] = {}
    bad: list[VMRow] = []
    dirs: list[Path] = list(run_dirs)
    for path in configs:
        try:
            cfg: KemariConfig = load(path)
        except KemariError as err:
            bad.append(VMRow(name=path.stem, socket="", config=str(path), error=str(err)))
            continue
        sock = control_path(cfg)
        found.setdefault(sock, Found(cfg.vm.name, sock, path))
        dirs.append(cfg.paths.run_dir)
    for run_dir in dict.fromkeys(dirs):
        for sock in sorted(run_dir.glob(f"{_PREFIX}*/{_SOCKET}")):
            found.setdefault(sock, Found(sock.parent.name[len(_PREFIX) :], sock))
    return list(found.values()), bad


def row(found: Found, status: Mapping[str, Any]) -> VMRow:
    """The row of an agent that answered ``status``."""
    role = _str(status.get("role"))
    state = _str(status.get("state"))
    epoch, committed = _int(status.get("epoch")), _int(status.get("last_committed_epoch"))
    lag = None
    if role == "primary" and epoch is not None and committed is not None:
        lag = max(0, epoch - 1 - committed)
    since = status.get("since")
    protected = bool(status.get("protected")) and isinstance(since, int | float)
    pause = status.get("last_pause_ms")
    if not isinstance(pause, int | float) or isinstance(pause, bool):
        pause = last_pause_ms(found.socket, str(status.get("vm") or found.vm), role)
    return VMRow(
        name=str(status.get("vm") or found.vm),
        socket=str(found.socket),
        config=str(found.config) if found.config else None,
        answered=True,
        role=role,
        state=state,
        epoch_lag=lag,
        last_committed_epoch=committed,
        last_pause_ms=None if pause is None else float(pause),
        held_bytes=_int(status.get("held_bytes")),
        protected_since=float(since) if protected and since is not None else None,
    )


def last_pause_ms(sock: Path, vm: str, role: str | None) -> float | None:
    """``pause_ms`` of the last checkpoint row of the VM's newest artifact folder for
    ``role`` (``<run_dir>/artifacts/<vm>-<role>-<stamp>``); None when there is none."""
    if role is None:
        return None
    artifacts = sock.parent.parent / "artifacts"
    try:
        folders = sorted(artifacts.glob(f"{vm}-{role}-*"), key=lambda p: p.name)
    except OSError:
        return None
    for folder in reversed(folders):
        last = _last_line(folder / "checkpoints.jsonl")
        if last is None:
            continue
        try:
            value = json.loads(last).get("pause_ms")
        except (ValueError, AttributeError):
            return None
        return float(value) if isinstance(value, int | float) else None
    return None


def _last_line(path: Path, tail: int = 8192) -> str | None:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail))
            lines = [x for x in f.read().splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1].decode(errors="replace") if lines else None


def collect(
    configs: Sequence[Path],
    run_dirs: Sequence[Path] | None = None,
    *,
    timeout: float = TIMEOUT_S,
) -> list[VMRow]:
    """Ask every agent found (see :func:`discover`; ``run_dirs`` defaults to the
    default run dir, ``$KEMARI_RUN`` or /run/kemari); one row per VM, sorted by name.
    Never raises for an agent: one that does not answer is a row with ``error``."""
    from kemari_suite.service import control

    dirs = [PathsConfig().run_dir] if run_dirs is None else run_dirs
    found, rows = discover(configs, dirs)
    for f in found:
        try:
            status = control.request(f.socket, "status", timeout=timeout)
        except (KemariError, ValueError) as err:
            rows.append(
                VMRow(
                    name=f.vm,
                    socket=str(f.socket),
                    config=str(f.config) if f.config else None,
                    error=str(err),
                )
            )
            continue
        if not isinstance(status, Mapping):
            rows.append(VMRow(name=f.vm, socket=str(f.socket), error=f"bad status: {status!r}"))
            continue
        rows.append(row(f, status))
    return sorted(rows, key=lambda r: (r.name, r.socket))


def table(rows: Sequence[VMRow], *, now: float) -> Table:
    """The rows as a rich table (ages relative to ``now``, wall clock)."""
    t = Table(title="Kemari agents on this host")
    for col in ("vm", "role", "state", "epoch lag", "committed", "last pause", "held", "protected"):
        left = col in ("vm", "role", "state", "protected")
        t.add_column(col, justify="left" if left else "right", no_wrap=col in ("vm", "state"))
    for r in rows:
        if not r.answered:
            t.add_row(r.name, "-", "[red]no answer[/]", "", "", "", "", "")
            continue
        t.add_row(
            r.name,
            r.role or "?",
            r.state or "?",
            _or_dash(r.epoch_lag),
            _or_dash(r.last_committed_epoch),
            "-" if r.last_pause_ms is None else f"{r.last_pause_ms:.1f} ms",
            "-" if r.held_bytes is None else _bytes(r.held_bytes),
            "-" if r.protected_since is None else f"{_age(now - r.protected_since)} ago",
        )
    return t


def show(console: Console, configs: Sequence[Path], *, json_out: bool) -> None:
    """Print every agent of this host: a table, or with ``json_out`` a JSON list."""
    rows = collect(configs)
    if json_out:
        console.print_json(json.dumps([r.to_dict() for r in rows]))
    elif not rows:
        console.print("no Kemari agent on this host (no config, no control socket)")
    else:
        console.print(table(rows, now=time.time()))
        for r in rows:
            if r.error:
                console.print(f"{r.name}: {r.error}", highlight=False, soft_wrap=True)


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d"


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


__all__ = [
    "MAIN_CONFIG",
    "VMS_DIR",
    "Found",
    "VMRow",
    "collect",
    "config_files",
    "discover",
    "show",
    "table",
]
