"""systemd's sd_notify protocol, spoken directly, and the agent's notifier.

::

    agent.life ── state change ──► AgentNotifier ── STATUS=web: primary protected, ...
                                        │           ── READY=1 (once: see READY_STATES)
    node's event loop, every            │
    WATCHDOG_USEC / 2 ──── tick ───────►┴────────── WATCHDOG=1 (+ a fresher STATUS=)
    node stopping ─────────────────────────────── STOPPING=1

A notification is one datagram of ``KEY=VALUE`` lines sent over an ``AF_UNIX``
``SOCK_DGRAM`` socket to ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a
leading ``@``). systemd sets it for ``Type=notify`` units; without it every call here
does nothing, so ``kemari protect`` run by hand behaves as before. ``$WATCHDOG_USEC``
(with ``$WATCHDOG_PID``, when it names this process) is the unit's ``WatchdogSec=``:
the agent pings at half of it. No libsystemd: the protocol is the few lines below.

The pings come from a task on the node's event loop, so a loop that hangs (a blocking
call, a busy loop) stops them and systemd restarts the unit. Sending never raises: a
vanished socket is logged once and the agent goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: The states in which an agent of each role tells systemd it is ready (``READY=1``,
#: sent once per process). The primary: once the VM is protected. The standby: once it
#: serves (waiting for a primary, or holding a checkpoint), not only once it holds a
#: committed one: ``kemari remote start`` and operators start the standby first and
#: wait for ``systemctl start`` to return, and the primary cannot protect anything
#: before the standby is up. Its STATUS= line says whether it holds a checkpoint.
READY_STATES: Mapping[str, frozenset[str]] = {
    "primary": frozenset({"protected"}),
    "secondary": frozenset({"waiting", "receiving", "standby", "active"}),
}
#: How often the STATUS= line is refreshed when systemd asked for no watchdog, seconds.
STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class NotifyEnv:
    """What systemd told this process: where to notify, and the watchdog's interval."""

    #: ``$NOTIFY_SOCKET`` as given ("" when unset: notifying does nothing).
    socket: str = ""
    #: ``$WATCHDOG_USEC`` in microseconds, when it is meant for this process; else None.
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> NotifyEnv:
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (``environ``
        defaults to ``os.environ``, ``pid`` to this process's). A watchdog whose
        ``WATCHDOG_PID`` names another process, or a value that is not a positive
        integer, is no watchdog (as ``sd_watchdog_enabled`` says)."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            usec = None
        if usec is not None and usec <= 0:
            usec = None
        wpid = env.get("WATCHDOG_PID", "")
        if usec is not None and wpid:
            try:
                if int(wpid) != (os.getpid() if pid is None else pid):
                    usec = None
            except ValueError:
                usec = None
        return cls(socket=env.get("NOTIFY_SOCKET", ""), watchdog_usec=usec)

    @property
    def ping_interval_s(self) -> float | None:
        """Seconds between two ``WATCHDOG=1``: half the watchdog's interval (None: no
        watchdog)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6


def _address(name: str) -> str | bytes:
    """The socket address of ``$NOTIFY_SOCKET``: ``@name`` is the abstract ``\\0name``."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, env: NotifyEnv) -> None:
        self.env = env
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        return cls(NotifyEnv.from_environ(environ))

    @property
    def enabled(self) -> bool:
        return bool(self.env.socket)

    def notify(self, **fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (keys as given, e.g. ``READY="1"``);
        True when it was sent. Never raises: a failure is logged (once)."""
        if not self.env.socket:
            return False
        lines = []
        for key, value in fields.items():
            # One line per field: a newline in a value would start a forged field.
            lines.append(f"{key}={' '.join(str(value).splitlines())}")
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(data, _address(self.env.socket))
        except OSError as err:
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", self.env.socket, err)
            self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY="1", **({} if status is None else {"STATUS": status}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def stopping(self) -> bool:
        return self.notify(STOPPING="1")


class _Observable(Protocol):
    def observe(self, fn: Callable[[Any], None]) -> None: ...


class Notified(Protocol):
    """What the notifier reads of an agent (primary or secondary)."""

    @property
    def life(self) -> _Observable: ...

    @property
    def state(self) -> enum.Enum: ...

    def status_dict(self) -> dict[str, Any]: ...


def status_line(role: str, status: Mapping[str, Any]) -> str:
    """The STATUS= text for an agent's status: VM, role, state, then what the role
    knows: the epoch lag, held output and last pause (primary), the committed epoch
    (standby)."""
    vm = status.get("vm")
    head = f"{vm}: " if vm else ""
    parts = [f"{head}{role} {status.get('state', '?')}"]
    epoch, committed = _int(status.get("epoch")), _int(status.get("last_committed_epoch"))
    if role == "primary":
        if epoch is not None and committed is not None:
            parts.append(f"epoch lag {max(0, epoch - 1 - committed)}")
        held = _int(status.get("held_bytes"))
        if held is not None:
            parts.append(f"held {held} B")
    elif committed is not None and committed >= 0:
        parts.append(f"committed epoch {committed}")
    else:
        parts.append("no checkpoint yet")
    pause = status.get("last_pause_ms")
    if isinstance(pause, int | float) and not isinstance(pause, bool):
        parts.append(f"last pause {pause:.1f} ms")
    return ", ".join(parts)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AgentNotifier:
    """One node's notifications: READY=1 once its agent is ready, a STATUS= line at
    each state change (and refreshed at each tick), WATCHDOG=1 from the event loop, and
    STOPPING=1 when the node is asked to stop. It lives as long as the node; a
    switchover attaches the next agent.

    Wiring (in :func:`kemari_suite.node.run_node`)::

        notifier = AgentNotifier.from_environ()
        notifier.start(stop)              # the watchdog task on this loop
        ...
        notifier.attach(agent, role)      # each agent, before it runs
        ...
        notifier.close()                  # finally
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready_sent = False
        self.role = ""
        self.last_status = ""
        self._agent: Notified | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AgentNotifier:
        return cls(Notifier.from_environ(environ))

    @property
    def tick_s(self) -> float:
        """The loop's period: half the watchdog interval, else :data:`STATUS_INTERVAL_S`."""
        ping = self.notifier.env.ping_interval_s
        return STATUS_INTERVAL_S if ping is None else ping

    def attach(self, agent: Notified, role: str) -> None:
        """Report ``agent`` from now on (call before it runs; a no-op without
        ``$NOTIFY_SOCKET``)."""
        if not self.notifier.enabled:
            return
        self._agent = agent
        self.role = role
        agent.life.observe(lambda _t: self._observed(agent))
        self._changed(agent)

    def _observed(self, agent: Notified) -> None:
        """A lifecycle observer: never lets a failure reach the agent's state change."""
        try:
            self._changed(agent)
        except Exception:
            log.exception("sd_notify: a state change was not reported")

    def _changed(self, agent: Notified) -> None:
        """A state change (or a tick): STATUS= when its text changed, READY=1 the first
        time the agent is in one of its role's :data:`READY_STATES`."""
        if agent is not self._agent:
            return  # an earlier agent's late transition
        try:
            status = agent.status_dict()
        except Exception as err:  # mid-shutdown: role and state are enough
            log.debug("sd_notify: status failed: %s", err)
            status = {"state": str(agent.state.value)}
        text = status_line(self.role, status)
        ready = not self.ready_sent and str(agent.state.value) in READY_STATES.get(self.role, ())
        if ready:
            self.ready_sent = self.notifier.ready(text)
            self.last_status = text
        elif text != self.last_status:
            self.notifier.status(text)
            self.last_status = text

    def start(self, stop: asyncio.Event | None = None) -> asyncio.Task[None] | None:
        """Start the task that pings the watchdog (and refreshes STATUS=) on the running
        loop, and sends STOPPING=1 once ``stop`` is set. None without
        ``$NOTIFY_SOCKET``."""
        if not self.notifier.enabled:
            return None
        self._task = asyncio.create_task(self._run(stop))
        return self._task

    async def _run(self, stop: asyncio.Event | None) -> None:
        watchdog = self.notifier.env.watchdog_usec is not None
        stopping_sent = False
        while True:
            if watchdog:
                self.notifier.watchdog()
            if self._agent is not None:
                self._observed(self._agent)  # a failure here must not stop the pings
            if stop is not None and not stopping_sent:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.tick_s)
                if stop.is_set():
                    self.notifier.stopping()
                    stopping_sent = True
            else:
                await asyncio.sleep(self.tick_s)

    def close(self) -> None:
        """Stop pinging; say STOPPING=1 (systemd may already know)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.notifier.stopping()


__all__ = [
    "READY_STATES",
    "AgentNotifier",
    "Notified",
    "Notifier",
    "NotifyEnv",
    "status_line",
]
