"""sd_notify: the exact datagrams on a real AF_UNIX socket (a path and an abstract
name), the watchdog interval rule, the no-op without NOTIFY_SOCKET, and the agent
notifier driven by a lifecycle."""

from __future__ import annotations

import asyncio
import enum
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.service.lifecycle import Lifecycle, table
from kemari_suite.service.sdnotify import (
    READY_STATES,
    AgentNotifier,
    Notifier,
    NotifyEnv,
    status_line,
)


class Listener:
    """The systemd side: a datagram socket that collects what the agent sends."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        sock.settimeout(2.0)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, **extra}


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    d = Path(tempfile.mkdtemp(prefix="ksdn-", dir="/tmp"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(str(d / "notify"))
        yield Listener(s, str(d / "notify"))
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"kemari-test-sdnotify-{os.getpid()}-{worker}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(b"\0" + name.encode())
        yield Listener(s, "@" + name)
    finally:
        s.close()


def test_each_notification_is_one_exact_datagram(path_listener: Listener) -> None:
    n = Notifier.from_environ(path_listener.env())
    assert n.enabled
    assert n.ready()
    assert path_listener.recv() == "READY=1"
    assert n.status("web: primary protected, epoch lag 0")
    assert path_listener.recv() == "STATUS=web: primary protected, epoch lag 0"
    assert n.watchdog()
    assert path_listener.recv() == "WATCHDOG=1"
    assert n.stopping()
    assert path_listener.recv() == "STOPPING=1"
    assert n.ready("up")
    assert path_listener.recv() == "READY=1\nSTATUS=up"
    # A newline in a status would forge a field: it becomes a space.
    n.status("a\nREADY=1")
    assert path_listener.recv() == "STATUS=a READY=1"


def test_abstract_socket_name(abstract_listener: Listener) -> None:
    n = Notifier.from_environ(abstract_listener.env())
    assert n.ready()
    assert abstract_listener.recv() == "READY=1"
    assert n.watchdog()
    assert abstract_listener.recv() == "WATCHDOG=1"


def test_no_notify_socket_is_a_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()
    agent = FakeAgent()
    notifier = AgentNotifier(n)
    notifier.attach(agent, "primary")
    agent.life.set(St.SYNCING)
    agent.life.set(St.PROTECTED)
    assert not notifier.ready_sent

    async def main() -> None:
        assert notifier.start(asyncio.Event()) is None

    asyncio.run(main())
    notifier.close()


def test_a_vanished_socket_never_raises(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.ready() and not n.watchdog()


def test_watchdog_interval_rule() -> None:
    me = os.getpid()
    env = NotifyEnv.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000"})
    assert env.watchdog_usec == 10_000_000 and env.ping_interval_s == 5.0
    env = NotifyEnv.from_environ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(me)})
    assert env.ping_interval_s == 1.5
    # Meant for another process (a parent that exec'd us without clearing it): none.
    env = NotifyEnv.from_environ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(me + 1)})
    assert env.watchdog_usec is None and env.ping_interval_s is None
    assert NotifyEnv.from_environ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, pid=7)
    for bad in ("0", "-5", "soon", ""):
        assert NotifyEnv.from_environ({"WATCHDOG_USEC": bad}).watchdog_usec is None
    assert NotifyEnv.from_environ({}).ping_interval_s is None
    n = AgentNotifier.from_environ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "400000"})
    assert n.tick_s == 0.2
    assert AgentNotifier.from_environ({"NOTIFY_SOCKET": "/x"}).tick_s == 5.0


class St(enum.Enum):
    STARTING = "starting"
    SYNCING = "syncing"
    PROTECTED = "protected"
    HELD = "held"
    STOPPED = "stopped"


TABLE = table(
    {
        St.STARTING: (St.SYNCING, St.STOPPED),
        St.SYNCING: (St.PROTECTED, St.STOPPED),
        St.PROTECTED: (St.HELD, St.STOPPED),
        St.HELD: (St.SYNCING, St.STOPPED),
        St.STOPPED: (),
    }
)


class FakeAgent:
    """A primary as the notifier sees it: a lifecycle and a status."""

    def __init__(self) -> None:
        self.life: Lifecycle[St] = Lifecycle("primary", St.STARTING, TABLE)
        self.epoch = 5
        self.committed = 3

    @property
    def state(self) -> St:
        return self.life.state

    def status_dict(self) -> dict[str, Any]:
        return {
            "vm": "web",
            "state": self.state.value,
            "epoch": self.epoch,
            "last_committed_epoch": self.committed,
            "held_bytes": 4096,
        }


def test_primary_ready_once_protected_and_status_at_each_change(
    path_listener: Listener,
) -> None:
    n = AgentNotifier.from_environ(path_listener.env())
    agent = FakeAgent()
    n.attach(agent, "primary")
    assert path_listener.recv() == "STATUS=web: primary starting, epoch lag 1, held 4096 B"
    agent.life.set(St.SYNCING)
    assert path_listener.recv() == "STATUS=web: primary syncing, epoch lag 1, held 4096 B"
    agent.committed = 4
    agent.life.set(St.PROTECTED)
    assert (
        path_listener.recv() == "READY=1\nSTATUS=web: primary protected, epoch lag 0, held 4096 B"
    )
    assert n.ready_sent
    agent.life.set(St.HELD)
    agent.life.set(St.SYNCING)
    agent.life.set(St.PROTECTED)
    # READY=1 once; afterwards only STATUS= lines.
    assert path_listener.pending() == [
        "STATUS=web: primary held, epoch lag 0, held 4096 B",
        "STATUS=web: primary syncing, epoch lag 0, held 4096 B",
        "STATUS=web: primary protected, epoch lag 0, held 4096 B",
    ]


def test_standby_status_line() -> None:
    assert READY_STATES["secondary"] >= {"waiting", "standby"}
    assert READY_STATES["primary"] == {"protected"}
    waiting = {"vm": "db", "state": "waiting", "last_committed_epoch": -1}
    assert status_line("secondary", waiting) == "db: secondary waiting, no checkpoint yet"
    standby = {"vm": "db", "state": "standby", "last_committed_epoch": 42, "last_pause_ms": 3.25}
    assert status_line("secondary", standby) == (
        "db: secondary standby, committed epoch 42, last pause 3.2 ms"
    )


def test_watchdog_pings_from_the_loop_and_stopping(path_listener: Listener) -> None:
    n = AgentNotifier.from_environ(path_listener.env(WATCHDOG_USEC="100000"))
    agent = FakeAgent()

    async def main() -> None:
        stop = asyncio.Event()
        n.attach(agent, "primary")
        task = n.start(stop)
        assert task is not None
        await asyncio.sleep(0.22)  # ticks at 0, 50, 100, 150, 200 ms
        stop.set()
        await asyncio.sleep(0.01)
        n.close()
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()

    asyncio.run(main())
    got = path_listener.pending()
    assert got[0] == "STATUS=web: primary starting, epoch lag 1, held 4096 B"
    pings = got.count("WATCHDOG=1")
    assert 3 <= pings <= 6, got
    # STOPPING=1 when stop was set, and again at close.
    assert got.count("STOPPING=1") == 2 and got[-1] == "STOPPING=1"
    # The status did not change: no repeated STATUS= lines.
    assert sum(1 for g in got if g.startswith("STATUS=")) == 1


def test_a_hung_loop_stops_the_pings(path_listener: Listener) -> None:
    import time

    n = AgentNotifier.from_environ(path_listener.env(WATCHDOG_USEC="100000"))

    async def main() -> None:
        n.start()
        await asyncio.sleep(0.01)
        path_listener.pending()
        time.sleep(0.3)  # the loop is blocked: nothing is sent meanwhile
        assert path_listener.pending() == []
        n.close()

    asyncio.run(main())
