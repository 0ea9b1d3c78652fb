"""Operator alerts: the events that must reach a human, not only ``kemari status``.

An :class:`Alerter` turns a state change of the protection machinery (the VM became
unprotected, a failover ran, failed or was refused, protection was regained, a planned
switchover) into

* one line in the system log (``/dev/log``, facility daemon, ident ``kemari``)::

      <26>kemari[web1/node-a]: split-brain both nodes claim primary

* and, when ``[alerts] hook`` is set, one run of that command with the alert as a JSON
  object on stdin and as ``KEMARI_ALERT_*`` environment variables.

Alerting must never get in the way of protection: :meth:`Alerter.emit` never raises and
never blocks. The syslog datagram is sent with a non-blocking socket; hooks run one at a
time on a small worker thread fed by a queue, so the same ``emit`` works from asyncio code
and from plain threads. A hook that fails, hangs past ``hook_timeout_ms`` (it is then
killed) or has vanished is logged and recorded in :attr:`Alerter.failures`.

The same ``(kind, reason)`` within :data:`DEDUP_WINDOW_S` of its last delivery is
suppressed and counted, so a flapping link does not page anyone forty times a minute; the
next delivery of that pair carries the count in :attr:`Alert.suppressed`.
"""

from __future__ import annotations

import collections
import enum
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import syslog
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kemari_suite.config import AlertConfig
from kemari_suite.errors import ConfigError

log = logging.getLogger(__name__)

#: The same (kind, reason) is delivered at most once in this many seconds.
DEDUP_WINDOW_S = 60.0
#: How many alerts :attr:`Alerter.history` keeps (for ``kemari status``).
HISTORY_LEN = 20
#: Caps on what is kept in memory for the life of an agent.
_SENT_MAX = 1000
_FAILURES_MAX = 100
_QUEUE_MAX = 100
_DEDUP_KEYS_MAX = 256
#: How much of a failing hook's stderr is kept.
_STDERR_TAIL = 2000
#: After a kill, how long to wait for the hook's pipes to close before giving up on them.
_REAP_S = 2.0


class AlertKind(enum.Enum):
    """What happened. The value is what hooks and the system log see."""

    UNPROTECTED = "unprotected"
    PROTECTED = "protected"
    FAILOVER = "failover"
    FAILOVER_FAILED = "failover-failed"
    FAILOVER_REFUSED = "failover-refused"
    SPLIT_BRAIN = "split-brain"
    SWITCHOVER = "switchover"
    FENCED = "fenced"
    #: The guest shut down, powered off, reset or panicked (on whichever host ran it).
    GUEST = "guest"
    #: A guest output runs outside output commit, accepted with ``unprotected_output``.
    UNPROTECTED_OUTPUT = "unprotected-output"
    #: Held output reached ``replication.held_limit_mib``: the guest is paused.
    HELD_LIMIT = "held-limit"
    #: A failover resumed a copy known to be stale (``--accept-data-loss``), or a
    #: ``kemari release --solo`` declared the peer dead.
    DATA_LOSS = "data-loss"

    @property
    def severity(self) -> int:
        """The syslog priority (``syslog.LOG_CRIT``, ``LOG_WARNING`` or ``LOG_NOTICE``)."""
        return _SEVERITY[self]

    @property
    def severity_name(self) -> str:
        """``crit``, ``warning`` or ``notice``."""
        return _SEVERITY_NAME[self.severity]


_SEVERITY: dict[AlertKind, int] = {
    AlertKind.FAILOVER_FAILED: syslog.LOG_CRIT,
    AlertKind.SPLIT_BRAIN: syslog.LOG_CRIT,
    AlertKind.FENCED: syslog.LOG_CRIT,
    AlertKind.UNPROTECTED: syslog.LOG_WARNING,
    AlertKind.FAILOVER_REFUSED: syslog.LOG_WARNING,
    AlertKind.FAILOVER: syslog.LOG_WARNING,
    AlertKind.PROTECTED: syslog.LOG_NOTICE,
    AlertKind.SWITCHOVER: syslog.LOG_NOTICE,
    AlertKind.GUEST: syslog.LOG_WARNING,
    AlertKind.UNPROTECTED_OUTPUT: syslog.LOG_WARNING,
    AlertKind.HELD_LIMIT: syslog.LOG_CRIT,
    AlertKind.DATA_LOSS: syslog.LOG_CRIT,
}
_SEVERITY_NAME = {
    syslog.LOG_CRIT: "crit",
    syslog.LOG_WARNING: "warning",
    syslog.LOG_NOTICE: "notice",
}
# The agent's own log gets the alert too, at a matching level.
_LOG_LEVEL = {
    syslog.LOG_CRIT: logging.ERROR,
    syslog.LOG_WARNING: logging.WARNING,
    syslog.LOG_NOTICE: logging.INFO,
}


@dataclass(frozen=True)
class Alert:
    """One alert, as hooks receive it.

    ``at`` is the wall-clock time (epoch seconds) of the emit; ``details`` are free-form
    JSON-able facts from the caller (epoch, peer, ...); ``suppressed`` is how many
    identical alerts were swallowed by deduplication since the previous delivery.
    """

    kind: AlertKind
    vm: str
    node: str
    reason: str
    at: float
    details: Mapping[str, Any] = field(default_factory=dict)
    suppressed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A plain dict: ``kind`` as its string value, ``severity`` added."""
        return {
            "kind": self.kind.value,
            "severity": self.kind.severity_name,
            "vm": self.vm,
            "node": self.node,
            "reason": self.reason,
            "at": self.at,
            "details": dict(self.details),
            "suppressed": self.suppressed,
        }

    def to_json(self) -> str:
        """One line of JSON; values JSON cannot hold are written as their ``str()``."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def syslog_line(self) -> str:
        """``kemari[vm/node]: kind reason`` on one line (without the ``<PRI>`` prefix)."""
        reason = " ".join(self.reason.split())
        return f"kemari[{self.vm}/{self.node}]: {self.kind.value} {reason}".rstrip()


@dataclass(frozen=True)
class HookResult:
    """How one run of the hook ended (only failed runs are kept, in ``Alerter.failures``).

    ``rc`` is None when the hook could not be started (then ``error`` says why) or was
    killed after its timeout (``timed_out``).
    """

    kind: AlertKind
    rc: int | None
    stderr: str
    timed_out: bool
    duration_s: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out and not self.error


def resolve_hook(hook: str) -> list[str]:
    """Split ``hook`` like a shell would and resolve its program to an absolute path.

    Returns [] when no hook is configured.

    Raises:
        ConfigError: (key ``alerts.hook``) the command cannot be parsed, or its first word
            is neither an executable file nor found on ``PATH``.
    """
    if not hook.strip():
        return []
    try:
        argv = shlex.split(hook)
    except ValueError as err:
        raise ConfigError(f"cannot parse {hook!r}: {err}", key="alerts.hook") from err
    prog = argv[0]
    if "/" in prog:
        path = os.path.abspath(prog)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigError(f"{prog} is not an executable file", key="alerts.hook")
    else:
        found = shutil.which(prog)
        if found is None:
            raise ConfigError(f"{prog} not found on PATH", key="alerts.hook")
        path = found
    return [path, *argv[1:]]


_STOP = object()


class Alerter:
    """Sends alerts for one VM on one node to the system log and the configured hook.

    Thread-safe: :meth:`emit` may be called from any thread or from an asyncio loop.
    Call :meth:`close` at shutdown so that queued hooks get to run.
    """

    def __init__(
        self,
        cfg: AlertConfig,
        *,
        vm: str,
        node: str,
        syslog_path: str = "/dev/log",
        dedup_window_s: float = DEDUP_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises:
        ConfigError: ``cfg.hook`` is set but its program does not exist (``alerts.hook``).
        """
        self.cfg = cfg
        self.vm = vm
        self.node = node
        self.syslog_path = syslog_path
        self.dedup_window_s = dedup_window_s
        self._clock = clock
        self._argv = resolve_hook(cfg.hook)
        self._lock = threading.Lock()
        # (kind, reason) -> (monotonic time of last delivery, suppressed since then)
        self._last: dict[tuple[AlertKind, str], tuple[float, int]] = {}
        self._sent: list[Alert] = []
        self._history: collections.deque[Alert] = collections.deque(maxlen=HISTORY_LEN)
        self._failures: list[HookResult] = []
        self._suppressed = 0
        self._sock: socket.socket | None = None
        self._syslog_missing_logged = False
        self._closed = False
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_MAX)
        self._worker: threading.Thread | None = None
        if self._argv:
            # A daemon thread: a hung hook must not keep the agent from exiting.
            self._worker = threading.Thread(
                target=self._run_worker, name=f"kemari-alerts-{vm}", daemon=True
            )
            self._worker.start()

    # -- what callers and ``kemari status`` see ----------------------------------------

    @property
    def sent(self) -> list[Alert]:
        """Alerts that passed deduplication, oldest first (a copy).

        Each went to the system log at once; after :meth:`close` every one has also been
        through the hook (see :attr:`failures` for those that failed there).
        """
        with self._lock:
            return list(self._sent)

    @property
    def failures(self) -> list[HookResult]:
        """Failed hook runs, oldest first (a copy)."""
        with self._lock:
            return list(self._failures)

    @property
    def suppressed(self) -> int:
        """How many alerts deduplication swallowed."""
        with self._lock:
            return self._suppressed

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last :data:`HISTORY_LEN` delivered alerts as dicts, oldest first."""
        with self._lock:
            return [a.to_dict() for a in self._history]

    # -- emitting ----------------------------------------------------------------------

    def emit(self, kind: AlertKind, reason: str, **details: Any) -> None:
        """Send an alert to the system log and queue it for the hook.

        Never raises and never waits for the hook; problems are logged.
        """
        try:
            self._emit(kind, reason, details)
        except Exception:
            log.exception("alert %s (%s) could not be emitted", kind, reason)

    def _emit(self, kind: AlertKind, reason: str, details: dict[str, Any]) -> None:
        kind = AlertKind(kind)
        now = self._clock()
        with self._lock:
            key = (kind, reason)
            last = self._last.get(key)
            if last is not None and now - last[0] < self.dedup_window_s:
                self._last[key] = (last[0], last[1] + 1)
                self._suppressed += 1
                log.debug("alert %s (%s) suppressed as a repeat", kind.value, reason)
                return
            suppressed = last[1] if last is not None else 0
            if len(self._last) > _DEDUP_KEYS_MAX:
                # Reasons often carry numbers (epochs, ms): forget pairs past their window.
                self._last = {
                    k: v for k, v in self._last.items() if now - v[0] < self.dedup_window_s
                }
            self._last[key] = (now, 0)
            alert = Alert(
                kind=kind,
                vm=self.vm,
                node=self.node,
                reason=reason,
                at=time.time(),
                details=types.MappingProxyType(dict(details)),
                suppressed=suppressed,
            )
            self._sent.append(alert)
            del self._sent[:-_SENT_MAX]
            self._history.append(alert)
            closed = self._closed
        log.log(_LOG_LEVEL[kind.severity], "alert: %s", alert.syslog_line())
        if self.cfg.syslog:
            self._send_syslog(alert)
        if not self._argv:
            return
        if closed:
            log.warning("alert %s after close: hook not run", kind.value)
            return
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            # Only a hook hanging for minutes gets here; the alert is in syslog already.
            log.error("alert hook backlog full: hook not run for %s", kind.value)
            self._record(HookResult(kind, None, "", False, 0.0, "hook backlog full"))

    # -- syslog ------------------------------------------------------------------------

    def _send_syslog(self, alert: Alert) -> None:
        pri = syslog.LOG_DAEMON | alert.kind.severity  # LOG_DAEMON is already shifted
        data = f"<{pri}>{alert.syslog_line()}".encode(errors="replace")
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # Never block the caller: a full syslog buffer loses this line instead.
                    sock.setblocking(False)
                    self._sock = sock
                self._sock.sendto(data, self.syslog_path)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                # No syslog daemon (containers, tests): say so once, alerts still go on.
                if not self._syslog_missing_logged:
                    self._syslog_missing_logged = True
                    log.debug(
                        "no system log at %s (%s); alerts go to the hook only",
                        self.syslog_path,
                        err,
                    )
            except OSError as err:
                log.warning("alert %s not sent to the system log: %s", alert.kind.value, err)

    # -- hooks -------------------------------------------------------------------------

    def _record(self, result: HookResult) -> None:
        with self._lock:
            self._failures.append(result)
            del self._failures[:-_FAILURES_MAX]

    def _run_worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                assert isinstance(item, Alert)
                result = self._run_hook(item)
                if not result.ok:
                    self._record(result)
            except Exception:
                log.exception("alert hook worker: unexpected error")
            finally:
                self._queue.task_done()

    def _hook_env(self, alert: Alert) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KEMARI_ALERT_KIND=alert.kind.value,
            KEMARI_ALERT_SEVERITY=alert.kind.severity_name,
            KEMARI_ALERT_VM=alert.vm,
            KEMARI_ALERT_NODE=alert.node,
            KEMARI_ALERT_REASON=alert.reason,
            KEMARI_ALERT_AT=f"{alert.at:.3f}",
        )
        return env

    def _run_hook(self, alert: Alert) -> HookResult:
        """Run the hook once for ``alert``; every way it can end is a HookResult."""
        timeout = self.cfg.hook_timeout_ms / 1000
        started = time.monotonic()
        try:
            # A session of its own, so that a timeout kills the hook's children too
            # (a shell script's `sleep` or `curl` would otherwise hold its stderr open).
            proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self._hook_env(alert),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:
            log.error("alert hook %s could not be started: %s", self._argv[0], err)
            return HookResult(alert.kind, None, "", False, time.monotonic() - started, str(err))
        timed_out = False
        try:
            _, err_bytes = proc.communicate((alert.to_json() + "\n").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill(proc)
            try:
                _, err_bytes = proc.communicate(timeout=_REAP_S)
            except subprocess.TimeoutExpired:
                # A grandchild left the session and holds the pipe: stop reading it.
                err_bytes = b""
                if proc.stderr is not None:
                    proc.stderr.close()
                proc.wait()
        duration = time.monotonic() - started
        stderr = (err_bytes or b"")[-_STDERR_TAIL:].decode(errors="replace")
        if timed_out:
            log.error(
                "alert hook %s for %s killed after %.1f s",
                self._argv[0],
                alert.kind.value,
                timeout,
            )
            return HookResult(alert.kind, None, stderr, True, duration)
        if proc.returncode != 0:
            log.error(
                "alert hook %s for %s exited %s: %s",
                self._argv[0],
                alert.kind.value,
                proc.returncode,
                stderr.strip() or "-",
            )
        return HookResult(alert.kind, proc.returncode, stderr, False, duration)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        # Only the process we started and the session it leads (its pid is the group id).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.kill()

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking hook work, wait up to ``timeout`` s for queued hooks to finish.

        Returns True when every queued hook has finished. Alerts emitted afterwards still
        reach the system log. Safe to call twice.
        """
        with self._lock:
            self._closed = True
        done = True
        if self._worker is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
                    break
                except queue.Full:
                    if time.monotonic() >= deadline:
                        break
            self._worker.join(max(0.0, deadline - time.monotonic()))
            done = not self._worker.is_alive()
            if not done:
                log.warning("alert hooks still running after %.1f s at close", timeout)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        return done
