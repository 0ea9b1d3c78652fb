"""Operator alerts: real hook scripts, a real datagram socket standing in for /dev/log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import syslog
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.alerts import HISTORY_LEN, Alert, Alerter, AlertKind
from kemari_suite.config import AlertConfig
from kemari_suite.errors import ConfigError

# The machine running the tests may be two busy cores: every timing bound is generous.
FAST_S = 1.0


def write_hook(tmp_path: Path, body: str, name: str = "hook.sh") -> Path:
    hook = tmp_path / name
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    return hook


def make(tmp_path: Path, hook: str = "", timeout_ms: int = 10000, **kw: object) -> Alerter:
    cfg = AlertConfig(hook=hook, hook_timeout_ms=timeout_ms, syslog=False)
    return Alerter(cfg, vm="web1", node="node-a", **kw)  # type: ignore[arg-type]


@pytest.fixture
def syslog_sock() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="kemari-syslog-")
    path = os.path.join(d, "log")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5.0)
    try:
        yield s, path
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def test_kinds_values_and_severities() -> None:
    assert AlertKind.FAILOVER_REFUSED.value == "failover-refused"
    assert AlertKind("split-brain") is AlertKind.SPLIT_BRAIN
    crit = {k for k in AlertKind if k.severity == syslog.LOG_CRIT}
    warn = {k for k in AlertKind if k.severity == syslog.LOG_WARNING}
    notice = {k for k in AlertKind if k.severity == syslog.LOG_NOTICE}
    assert crit == {
        AlertKind.FAILOVER_FAILED,
        AlertKind.SPLIT_BRAIN,
        AlertKind.FENCED,
        AlertKind.HELD_LIMIT,
        AlertKind.DATA_LOSS,
    }
    assert warn == {
        AlertKind.UNPROTECTED,
        AlertKind.FAILOVER_REFUSED,
        AlertKind.FAILOVER,
        AlertKind.GUEST,
        AlertKind.UNPROTECTED_OUTPUT,
    }
    assert notice == {AlertKind.PROTECTED, AlertKind.SWITCHOVER}
    assert {k.value for k in AlertKind} == {
        "unprotected", "protected", "failover", "failover-failed", "failover-refused",
        "split-brain", "switchover", "fenced", "guest", "unprotected-output",
        "held-limit", "data-loss",
    }  # fmt: skip


def test_alert_json() -> None:
    a = Alert(
        AlertKind.FENCED, "web1", "node-a", "peer fenced", 1.5, {"peer": "b", "p": Path("/x")}
    )
    d = json.loads(a.to_json())
    assert d == {
        "kind": "fenced", "severity": "crit", "vm": "web1", "node": "node-a",
        "reason": "peer fenced", "at": 1.5, "details": {"peer": "b", "p": "/x"}, "suppressed": 0,
    }  # fmt: skip
    assert "\n" not in a.to_json()


def test_hook_gets_json_on_stdin_and_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f'{{ cat; echo; env | grep "^KEMARI_ALERT_" | sort; }} >> {out}\n')
    # Extra arguments are passed through, split like a shell would split them.
    a = make(tmp_path, hook=f"{hook} 'two words'")
    a.emit(AlertKind.FAILOVER_REFUSED, "disks diverged", epoch=42)
    assert a.close(timeout=20)
    lines = out.read_text().splitlines()
    alert = json.loads(lines[0])
    assert alert["kind"] == "failover-refused"
    assert alert["vm"] == "web1" and alert["node"] == "node-a"
    assert alert["reason"] == "disks diverged"
    assert alert["details"] == {"epoch": 42}
    assert abs(alert["at"] - time.time()) < 60
    env = dict(line.split("=", 1) for line in lines[1:] if line)
    assert env["KEMARI_ALERT_KIND"] == "failover-refused"
    assert env["KEMARI_ALERT_VM"] == "web1"
    assert env["KEMARI_ALERT_NODE"] == "node-a"
    assert env["KEMARI_ALERT_REASON"] == "disks diverged"
    assert abs(float(env["KEMARI_ALERT_AT"]) - alert["at"]) < 0.01
    assert a.failures == []
    assert [x.kind for x in a.sent] == [AlertKind.FAILOVER_REFUSED]


def test_hook_arguments_reach_the_hook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f'printf "%s|" "$@" > {out}\n')
    a = make(tmp_path, hook=f"{hook} --to 'ops team'")
    a.emit(AlertKind.SWITCHOVER, "planned")
    assert a.close(timeout=20)
    assert out.read_text() == "--to|ops team|"


def test_hanging_hook_is_killed_and_emit_does_not_wait(tmp_path: Path) -> None:
    # `sleep` is a child of the shell: killing only the shell would leave stderr open.
    hook = write_hook(tmp_path, "echo started >&2\nsleep 30\n")
    a = make(tmp_path, hook=str(hook), timeout_ms=2000)
    t0 = time.monotonic()
    a.emit(AlertKind.UNPROTECTED, "secondary lost")
    assert time.monotonic() - t0 < FAST_S
    assert a.close(timeout=20)
    assert time.monotonic() - t0 < 15  # killed, not waited out
    [f] = a.failures
    assert f.timed_out and f.rc is None
    assert f.kind is AlertKind.UNPROTECTED
    assert "started" in f.stderr


def test_failing_hook_is_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook = write_hook(tmp_path, "echo 'smtp refused' >&2\nexit 3\n")
    a = make(tmp_path, hook=str(hook))
    with caplog.at_level(logging.ERROR, logger="kemari_suite.alerts"):
        a.emit(AlertKind.SPLIT_BRAIN, "both primary")
        assert a.close(timeout=20)
    [f] = a.failures
    assert f.rc == 3 and not f.timed_out and not f.ok
    assert "smtp refused" in f.stderr
    assert any("exited 3" in r.getMessage() for r in caplog.records)


def test_hook_that_vanishes_after_start_is_recorded(tmp_path: Path) -> None:
    hook = write_hook(tmp_path, "exit 0\n")
    a = make(tmp_path, hook=str(hook))
    hook.unlink()
    a.emit(AlertKind.FENCED, "peer fenced")  # must not raise
    assert a.close(timeout=20)
    [f] = a.failures
    assert f.rc is None and f.error and not f.timed_out


def test_missing_hook_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, hook=str(tmp_path / "no-such-hook") + " --flag")
    assert exc.value.key == "alerts.hook"
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, hook="kemari-no-such-program-on-path")
    assert exc.value.key == "alerts.hook"
    not_exec = tmp_path / "plain"
    not_exec.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, hook=str(not_exec))
    assert exc.value.key == "alerts.hook" and "alerts.hook" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, hook="true 'unbalanced")
    assert exc.value.key == "alerts.hook"


def test_hook_found_on_path(tmp_path: Path) -> None:
    a = make(tmp_path, hook="true")
    a.emit(AlertKind.PROTECTED, "secondary in sync")
    assert a.close(timeout=20)
    assert a.failures == []


def test_dedup_suppresses_repeats_within_window(tmp_path: Path) -> None:
    now = [1000.0]
    a = make(tmp_path, clock=lambda: now[0])
    a.emit(AlertKind.UNPROTECTED, "link down")
    a.emit(AlertKind.UNPROTECTED, "link down")
    now[0] += 59
    a.emit(AlertKind.UNPROTECTED, "link down")
    a.emit(AlertKind.UNPROTECTED, "disk lost")  # another reason is another alert
    a.emit(AlertKind.FAILOVER, "link down")  # and so is another kind
    assert a.suppressed == 2
    assert [(x.kind, x.reason) for x in a.sent] == [
        (AlertKind.UNPROTECTED, "link down"),
        (AlertKind.UNPROTECTED, "disk lost"),
        (AlertKind.FAILOVER, "link down"),
    ]
    now[0] += 2  # 61 s after the first delivery
    a.emit(AlertKind.UNPROTECTED, "link down")
    last = a.sent[-1]
    assert (last.kind, last.reason, last.suppressed) == (AlertKind.UNPROTECTED, "link down", 2)
    a.close()


def test_dedup_applies_to_the_hook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f"cat >> {out}\n")
    a = make(tmp_path, hook=str(hook))
    for _ in range(5):
        a.emit(AlertKind.UNPROTECTED, "flapping")
    assert a.close(timeout=20)
    [line] = out.read_text().splitlines()  # the JSON ends with a newline
    assert json.loads(line)["reason"] == "flapping"


def test_history_keeps_last_alerts_as_dicts(tmp_path: Path) -> None:
    a = make(tmp_path)
    for i in range(HISTORY_LEN + 5):
        a.emit(AlertKind.SWITCHOVER, f"planned {i}")
    h = a.history
    assert len(h) == HISTORY_LEN
    assert h[0]["reason"] == "planned 5" and h[-1]["reason"] == f"planned {HISTORY_LEN + 4}"
    assert h[-1]["kind"] == "switchover"
    a.close()


def test_syslog_line_and_priority(syslog_sock: tuple[socket.socket, str]) -> None:
    sock, path = syslog_sock
    cfg = AlertConfig(syslog=True)
    a = Alerter(cfg, vm="web1", node="node-a", syslog_path=path)
    a.emit(AlertKind.SPLIT_BRAIN, "both nodes\nclaim primary")
    a.emit(AlertKind.FAILOVER_REFUSED, "no tiebreaker")
    a.emit(AlertKind.PROTECTED, "secondary in sync")
    got = [sock.recv(4096).decode() for _ in range(3)]
    daemon = 3 << 3
    assert got == [
        f"<{daemon | 2}>kemari[web1/node-a]: split-brain both nodes claim primary",
        f"<{daemon | 4}>kemari[web1/node-a]: failover-refused no tiebreaker",
        f"<{daemon | 5}>kemari[web1/node-a]: protected secondary in sync",
    ]
    a.close()


def test_syslog_off_sends_nothing(syslog_sock: tuple[socket.socket, str]) -> None:
    sock, path = syslog_sock
    a = Alerter(AlertConfig(syslog=False), vm="web1", node="node-a", syslog_path=path)
    a.emit(AlertKind.FENCED, "peer fenced")
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    a.close()


def test_missing_syslog_socket_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = Alerter(AlertConfig(syslog=True), vm="v", node="n", syslog_path=str(tmp_path / "nolog"))
    with caplog.at_level(logging.DEBUG, logger="kemari_suite.alerts"):
        a.emit(AlertKind.FENCED, "one")
        a.emit(AlertKind.FENCED, "two")
    notes = [r for r in caplog.records if "no system log" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG
    assert len(a.sent) == 2
    a.close()


def test_emit_inside_asyncio_loop_does_not_block(tmp_path: Path) -> None:
    done = tmp_path / "done"
    hook = write_hook(tmp_path, f"cat > /dev/null\nsleep 3\ntouch {done}\n")
    a = make(tmp_path, hook=str(hook))

    async def main() -> tuple[float, float]:
        t0 = time.monotonic()
        a.emit(AlertKind.FAILOVER, "primary lost")
        emit_s = time.monotonic() - t0
        # The loop keeps running while the hook sleeps.
        t1 = time.monotonic()
        await asyncio.sleep(0.1)
        return emit_s, time.monotonic() - t1

    emit_s, tick_s = asyncio.run(main())
    assert emit_s < FAST_S
    assert tick_s < FAST_S
    assert not done.exists()  # the hook was still running when the loop went on
    assert a.close(timeout=30)
    assert done.exists()  # and it did run to the end
    assert a.failures == []


def test_emit_from_many_threads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f"cat >> {out}\n")
    a = make(tmp_path, hook=str(hook))
    threads = [
        threading.Thread(target=a.emit, args=(AlertKind.UNPROTECTED, f"reason {i}"))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.close(timeout=60)
    reasons = sorted(json.loads(line)["reason"] for line in out.read_text().splitlines())
    assert reasons == sorted(f"reason {i}" for i in range(8))


def test_emit_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = make(tmp_path)
    with caplog.at_level(logging.ERROR, logger="kemari_suite.alerts"):
        a.emit("not-a-kind", "bogus")  # type: ignore[arg-type]
    assert a.sent == []
    assert any("could not be emitted" in r.getMessage() for r in caplog.records)
    a.emit(AlertKind.FENCED, "odd details", obj=object())  # not JSON-able: written as str()
    assert "object object" in a.sent[0].to_json()
    a.close()


def test_emit_after_close_skips_hook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = write_hook(tmp_path, f"cat >> {out}\n")
    a = make(tmp_path, hook=str(hook))
    assert a.close(timeout=20)
    a.emit(AlertKind.FENCED, "late")
    time.sleep(0.3)
    assert not out.exists()
    assert len(a.sent) == 1
