"""``kemari remote`` without SSH: the host-side probe run locally, error wording, states."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import paramiko
import pytest
from invoke.exceptions import CommandTimedOut, UnexpectedExit
from invoke.runners import Result

from kemari_suite.deploy.inventory import HostSpec
from kemari_suite.errors import DeployError
from kemari_suite.remote import ops, probe

KEY = "s3cret-pre-shared-key-of-32-bytes-or-more"


def host(root: Path, **kw: Any) -> HostSpec:
    return HostSpec(
        name="sec", role="secondary", address="192.0.2.2", port=2202, root=str(root), **kw
    )


def fake_root(tmp_path: Path, kemari_script: str) -> tuple[Path, HostSpec]:
    root = tmp_path / "root"
    (root / "etc/kemari").mkdir(parents=True)
    run_dir = tmp_path / "run"
    (run_dir / "artifacts/web1-secondary").mkdir(parents=True)
    (run_dir / "artifacts/web1-secondary/agent.log").write_text("hello\n")
    (root / "etc/kemari/kemari.toml").write_text(
        f'[paths]\nrun_dir = "{run_dir}"\n\n[replication]\nkey = "{KEY}"\npeer = "x:1"\n'
    )
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / "kemari-standby.service").write_text("[Service]\n")
    (units / "multi-user.target.wants/kemari-standby.service").symlink_to(
        "/etc/systemd/system/kemari-standby.service"
    )
    (root / "etc/drbd.d").mkdir()
    (root / "etc/drbd.d/web1.res").write_text("resource web1 {}\n")
    kemari = tmp_path / "kemari"
    kemari.write_text("#!/bin/sh\n" + kemari_script)
    kemari.chmod(0o755)
    return root, host(root, kemari_bin=str(kemari))


def run_probe(h: HostSpec, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ops._host_env(h)}
    return subprocess.run(
        [sys.executable, "-c", probe.SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )


def test_probe_status_in_files_mode(tmp_path: Path) -> None:
    # kemari's error arrives wrapped over lines, as rich prints it on a narrow terminal.
    _, h = fake_root(
        tmp_path,
        'echo "error: cannot reach agent at /run/kemari/x/con" >&2\necho "trol.sock" >&2\nexit 2\n',
    )
    data = json.loads(run_probe(h, "status").stdout)
    assert set(data) == set(probe.STATUS_KEYS)
    assert data["unit"] == "kemari-standby.service" and not data["systemd"]
    assert data["unit_enabled"] == "enabled" and data["unit_active"] == "unknown"
    assert data["unit_installed"] and data["config_present"] and data["kemari_installed"]
    assert data["agent"] is None
    assert data["agent_error"] == "cannot reach agent at /run/kemari/x/con trol.sock"
    st = ops.host_status(h, data)
    assert st.reachable and st.state == "stopped"


def test_probe_status_with_a_running_agent(tmp_path: Path) -> None:
    _, h = fake_root(tmp_path, """echo '{"role": "secondary", "epoch": 9}'\n""")
    data = json.loads(run_probe(h, "status").stdout)
    assert data["agent"] == {"role": "secondary", "epoch": 9} and data["agent_error"] is None
    assert ops.host_status(h, data).state == "running"


def test_probe_logs_redact_the_key(tmp_path: Path) -> None:
    _, h = fake_root(tmp_path, "exit 2\n")
    out = tmp_path / "logs.tar.gz"
    assert run_probe(h, "logs", str(out)).stdout.strip() == str(out)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        toml = tar.extractfile("kemari.toml").read().decode()  # type: ignore[union-attr]
    assert {
        "status.json",
        "journal.txt",
        "unit/kemari-standby.service",
        "drbd/web1.res",
        "artifacts/web1-secondary/agent.log",
    } <= names
    assert KEY not in toml and 'key = "<redacted>"' in toml


def test_states() -> None:
    h = host(Path("/"))
    assert ops.host_status(h, None, error=DeployError("sec", "x")).state == "unreachable"
    assert ops.host_status(h, {"unit_installed": False}).state == "not-deployed"
    assert ops.host_status(h, {"unit_installed": True, "config_present": True}).state == "stopped"
    assert ops.host_status(h, {"unit_active": "active"}).state == "running"
    weird = ops.host_status(h, {"agent": ["not", "a", "dict"], "unit_active": 3})
    assert weird.agent is None and weird.unit_active == "3"


def result(command: str, exited: int, stderr: str) -> Result:
    return Result(command=command, exited=exited, stderr=stderr, stdout="")


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (
            paramiko.AuthenticationException("no"),
            "authentication failed at 192.0.2.2:2202 for user ops with the agent's and "
            "default keys",
        ),
        (
            paramiko.SSHException("Server '[192.0.2.2]:2202' not found in known_hosts"),
            "unknown host key: 192.0.2.2:2202 is not in /kh; verify the host's key and add it "
            "(ssh-keyscan -p 2202 192.0.2.2)",
        ),
        (
            paramiko.ssh_exception.NoValidConnectionsError(
                {("192.0.2.2", 2202): ConnectionRefusedError(111, "Connection refused")}
            ),
            "cannot connect to 192.0.2.2:2202: Connection refused",
        ),
        (TimeoutError("timed out"), "cannot connect to 192.0.2.2:2202: timed out"),
        (
            UnexpectedExit(
                result(
                    'export KEMARI_HOST=sec && "$KEMARI_SYSTEMCTL" start "$KEMARI_UNIT"',
                    1,
                    "System has not been booted with systemd as init system (PID 1).\n",
                )
            ),
            "`systemctl start kemari-standby.service` exited 1: System has not been booted with "
            "systemd as init system (PID 1). (systemd does not run this host's services)",
        ),
        (
            UnexpectedExit(
                result('"$KEMARI_BIN" failover --yes -c "$KEMARI_CONFIG"', 2, "error: no\nagent\n")
            ),
            "`/opt/kemari/bin/kemari failover --yes -c /etc/kemari/kemari.toml` exited 2: no agent",
        ),
        (
            UnexpectedExit(result(ops.RemotePair._probe("status"), 1, "Trace\nBoom\n")),
            "`kemari probe status` exited 1: Boom",
        ),
        (CommandTimedOut(result("x", -1, ""), 30), "command timed out after 30s"),
    ],
)
def test_explain_names_the_host(err: BaseException, expected: str) -> None:
    h = HostSpec(name="sec", role="secondary", address="192.0.2.2", port=2202, user="ops")
    e = ops.explain(h, err, task="start", known_hosts=Path("/kh"))
    assert (e.host, e.task) == ("sec", "start")
    assert e.reason == expected


def test_explain_a_changed_host_key() -> None:
    got, expected = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    h = host(Path("/"))
    e = ops.explain(
        h, paramiko.BadHostKeyException("h", got, expected), task="status", known_hosts=None
    )
    assert e.host == "sec" and "does not match ~/.ssh/known_hosts" in e.reason


def test_group_run_reports_unreachable_hosts_without_raising() -> None:
    # Nothing listens on this loopback port: the status of both hosts comes back as errors.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from kemari_suite.deploy.inventory import Pair

    pair = Pair(
        "kemari",
        HostSpec(name="a", role="primary", address="127.0.0.1", port=port),
        HostSpec(name="b", role="secondary", address="127.0.0.1", port=port),
    )
    with ops.RemotePair(pair, known_hosts=Path(os.devnull), connect_timeout=2) as rp:
        st = rp.status()
    assert [e.host for e in st.errors] == ["a", "b"]
    assert all("Connection refused" in e.reason for e in st.errors)
    assert st.to_dict()["primary"]["state"] == "unreachable"


def test_last_error() -> None:
    assert ops.last_error("noise\nerror: first\nerror: last\n  wrapped\n") == "last wrapped"
    assert ops.last_error("a\nb\n\n") == "b"
    assert ops.last_error("") == "-"
