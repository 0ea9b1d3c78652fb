"""``kemari deploy``: the playbooks, run through ansible-runner, as a typed result.

One run = one artifact folder ``<artifacts>/<ident>/`` holding ansible-runner's own
artifacts (``job_events/`` with one JSON file per event, ``stdout``, ``status``, ``rc``,
``command``) and this module's ``summary.json`` (status, per-host counts, failures).

Events are turned into :class:`DeployEvent` objects for a progress display; failed and
unreachable hosts become :class:`TaskFailure` records, each naming the host, the task
and Ansible's reason, and :meth:`DeployResult.raise_for_failure` turns the first into a
:class:`~kemari_suite.errors.DeployError`.

The inventory is parsed first (:func:`kemari_suite.deploy.inventory.load`), so a
malformed inventory or pair is reported with the file and host before Ansible starts.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kemari_suite.deploy import inventory as inventory_mod
from kemari_suite.errors import ConfigError, DeployError

#: The playbooks of this checkout.
PLAYBOOK = Path(__file__).resolve().parents[2] / "playbooks" / "site.yml"
#: Where run folders go when the caller does not say: beside the inventory.
ARTIFACTS_SUBDIR = Path(".kemari") / "runs"


class RunStatus(enum.Enum):
    """How a run ended (ansible-runner's status)."""

    SUCCESSFUL = "successful"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"


class EventKind(enum.Enum):
    """The events a progress display cares about."""

    PLAY = "play"
    TASK = "task"
    OK = "ok"
    CHANGED = "changed"
    SKIPPED = "skipped"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    RECAP = "recap"


@dataclass(frozen=True)
class DeployEvent:
    """One step of a run, for progress displays."""

    kind: EventKind
    #: The play or task name (empty for the recap).
    name: str = ""
    host: str | None = None
    #: For FAILED / UNREACHABLE: Ansible's message.
    message: str = ""


@dataclass(frozen=True)
class HostStats:
    """A host's line of the play recap."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class TaskFailure:
    """A task that failed on a host (or found it unreachable)."""

    host: str
    task: str
    reason: str
    unreachable: bool = False

    def error(self) -> DeployError:
        return DeployError(self.host, self.reason, self.task)


@dataclass
class DeployResult:
    """The outcome of one run of the playbooks."""

    ident: str
    artifact_dir: Path
    status: RunStatus
    rc: int
    check: bool
    limit: str | None
    duration_s: float
    stats: dict[str, HostStats] = field(default_factory=dict)
    failures: list[TaskFailure] = field(default_factory=list)
    #: Ansible's own output when it failed before any task (syntax, inventory).
    stdout_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCESSFUL and not self.failures

    @property
    def changed(self) -> int:
        """Tasks that changed something, over all hosts (0 on a second run)."""
        return sum(s.changed for s in self.stats.values())

    def raise_for_failure(self) -> None:
        """Raises:
        DeployError: for the first failed task (host, task and reason), or naming the
            run's artifact folder when Ansible failed without a task to blame.
        """
        if self.failures:
            raise self.failures[0].error()
        if self.status is not RunStatus.SUCCESSFUL:
            reason = f"ansible-playbook {self.status.value} (rc {self.rc})"
            if self.stdout_tail:
                reason += f": {self.stdout_tail}"
            raise DeployError("all", f"{reason}; see {self.artifact_dir}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ident": self.ident,
            "artifact_dir": str(self.artifact_dir),
            "status": self.status.value,
            "rc": self.rc,
            "check": self.check,
            "limit": self.limit,
            "duration_s": round(self.duration_s, 3),
            "changed": self.changed,
            "stats": {h: asdict(s) for h, s in self.stats.items()},
            "failures": [asdict(f) for f in self.failures],
            "stdout_tail": self.stdout_tail,
        }


@dataclass(frozen=True)
class DeployOptions:
    """What to run: everything ``kemari deploy`` takes, with its defaults."""

    inventory: Path
    check: bool = False
    diff: bool = False
    limit: str | None = None
    #: Run folders go below this (default: ``<inventory dir>/.kemari/runs``).
    artifacts: Path | None = None
    playbook: Path = PLAYBOOK
    #: Extra variables (``-e``), e.g. ``{"kemari_install_packages": False}``.
    extravars: Mapping[str, Any] = field(default_factory=dict)
    #: Extra environment for Ansible (e.g. ``ANSIBLE_SSH_CONTROL_PATH_DIR``).
    env: Mapping[str, str] = field(default_factory=dict)
    forks: int = 10
    timeout_s: int | None = None
    verbosity: int = 0


def new_ident() -> str:
    """A run id that sorts by time: ``20260101T120000Z-1a2b3c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _reason(res: Mapping[str, Any]) -> str:
    """The best one-line reason in a failed task's result."""
    parts: list[str] = []
    items = res.get("results")
    if isinstance(items, list):
        # A loop: its own msg is only "All items completed"; the failed item says why.
        for item in items:
            if isinstance(item, Mapping) and (item.get("failed") or item.get("unreachable")):
                return _reason(item)
    msg = res.get("msg")
    if isinstance(msg, str) and msg.strip():
        parts.append(msg.strip())
    for key in ("stderr", "module_stderr", "stdout"):
        text = res.get(key)
        if isinstance(text, str) and text.strip() and text.strip() not in parts:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            parts.append(lines[-1].strip() if lines else text.strip())
            break
    if res.get("censored"):
        parts.append(str(res["censored"]))
    text = " | ".join(parts) or "failed (no message)"
    # Ansible's messages can carry a multi-line origin report; keep its first lines.
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else text


class _Collector:
    """Turns ansible-runner events into DeployEvents, stats and failures."""

    def __init__(self, progress: Callable[[DeployEvent], None] | None) -> None:
        self.progress = progress
        self.failures: list[TaskFailure] = []
        self.stats: dict[str, HostStats] = {}
        self.verbose: list[str] = []

    def _say(self, event: DeployEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def __call__(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {}) or {}
        host = data.get("host") or data.get("remote_addr")
        task = str(data.get("task") or data.get("name") or "")
        role = data.get("role")
        label = f"{role} : {task}" if role and task and not task.startswith(f"{role} :") else task
        res = data.get("res", {}) or {}
        if kind == "playbook_on_play_start":
            self._say(DeployEvent(EventKind.PLAY, str(data.get("play", ""))))
        elif kind in ("playbook_on_task_start", "playbook_on_handler_task_start"):
            self._say(DeployEvent(EventKind.TASK, label))
        elif kind == "runner_on_ok" and host:
            changed = bool(res.get("changed"))
            self._say(DeployEvent(EventKind.CHANGED if changed else EventKind.OK, label, host))
        elif kind == "runner_on_skipped" and host:
            self._say(DeployEvent(EventKind.SKIPPED, label, host))
        elif kind == "runner_on_failed" and host:
            if data.get("ignore_errors"):
                return True
            reason = _reason(res)
            self.failures.append(TaskFailure(str(host), label, reason))
            self._say(DeployEvent(EventKind.FAILED, label, host, reason))
        elif kind == "runner_on_unreachable" and host:
            reason = f"unreachable: {_reason(res)}"
            self.failures.append(TaskFailure(str(host), label, reason, unreachable=True))
            self._say(DeployEvent(EventKind.UNREACHABLE, label, host, reason))
        elif kind == "playbook_on_stats":
            self.stats = _stats(data)
            self._say(DeployEvent(EventKind.RECAP))
        elif kind in ("verbose", "error", "warning") and event.get("stdout"):
            self.verbose.append(str(event["stdout"]))
        return True


def _stats(data: Mapping[str, Any]) -> dict[str, HostStats]:
    names = {
        "ok": "ok",
        "changed": "changed",
        "failures": "failed",
        "dark": "unreachable",
        "skipped": "skipped",
        "rescued": "rescued",
        "ignored": "ignored",
    }
    hosts: set[str] = set()
    for key in names:
        hosts |= set((data.get(key) or {}).keys())
    out: dict[str, HostStats] = {}
    for h in sorted(hosts):
        out[h] = HostStats(
            **{field: int((data.get(k) or {}).get(h, 0)) for k, field in names.items()}
        )
    return out


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _tail(lines: Sequence[str], artifact_dir: Path) -> str:
    text = "\n".join(lines)
    if not text.strip():
        try:
            text = (artifact_dir / "stdout").read_text(errors="replace")
        except OSError:
            text = ""
    useful = [ln.strip() for ln in _strip_ansi(text).splitlines() if "ERROR" in ln or "error" in ln]
    if not useful:
        useful = [ln.strip() for ln in _strip_ansi(text).splitlines() if ln.strip()][-2:]
    return " ".join(useful[:3])[:600]


def deploy(
    options: DeployOptions,
    *,
    progress: Callable[[DeployEvent], None] | None = None,
) -> DeployResult:
    """Run the playbooks against ``options.inventory`` and return what happened.

    A failed task does not raise: it is in :attr:`DeployResult.failures` (call
    :meth:`DeployResult.raise_for_failure`).

    Raises:
        ConfigError: the inventory is missing or malformed, or a pair in it is.
        DeployError: ansible-runner could not be started at all.
    """
    import ansible_runner

    inv_path = options.inventory.resolve()
    inventory_mod.load(inv_path).pairs()  # names the file and host of a malformed pair
    if not options.playbook.is_file():
        raise ConfigError("playbook not found", path=str(options.playbook))
    base = options.artifacts or (inv_path.parent if inv_path.is_file() else inv_path)
    root = (base / ARTIFACTS_SUBDIR) if options.artifacts is None else base
    ident = new_ident()
    run_dir = root / ident
    run_dir.mkdir(parents=True, exist_ok=True)

    bindir = str(Path(sys.executable).parent)
    env = {
        # The venv's ansible-playbook (and its Python, which imports kemari_suite for
        # the playbooks' filters) before any other.
        "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")]),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        **dict(options.env),
    }
    cmdline: list[str] = []
    if options.check:
        cmdline.append("--check")
    if options.diff:
        cmdline.append("--diff")
    collector = _Collector(progress)
    started = time.monotonic()
    try:
        runner = ansible_runner.run(
            private_data_dir=str(run_dir),
            artifact_dir=str(root),
            ident=ident,
            playbook=str(options.playbook.resolve()),
            inventory=str(inv_path),
            limit=options.limit,
            cmdline=shlex.join(cmdline) if cmdline else None,
            extravars=dict(options.extravars) or None,
            envvars=env,
            forks=options.forks,
            timeout=options.timeout_s,
            verbosity=options.verbosity or None,
            event_handler=collector,
            quiet=True,
            suppress_env_files=True,
        )
    except Exception as err:  # ansible-runner raises plain exceptions for setup errors
        raise DeployError("all", f"cannot start ansible-runner: {err}") from err
    duration = time.monotonic() - started
    try:
        status = RunStatus(runner.status)
    except ValueError:
        status = RunStatus.FAILED
    result = DeployResult(
        ident=ident,
        artifact_dir=run_dir,
        status=status,
        rc=int(runner.rc if runner.rc is not None else -1),
        check=options.check,
        limit=options.limit,
        duration_s=duration,
        stats=collector.stats,
        failures=collector.failures,
    )
    if status is not RunStatus.SUCCESSFUL and not result.failures:
        result.stdout_tail = _tail(collector.verbose, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
