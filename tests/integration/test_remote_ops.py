"""``kemari remote`` against two real SSH hosts (sshd in a lab's host namespaces).

The hosts are provisioned by hand here, with the same renderers the playbooks use
(tests/integration/test_deploy_playbooks.py runs the playbooks and then
``kemari remote status``). systemd is not PID 1 on this machine, so start and stop are
checked against a stand-in ``systemctl`` given by the inventory (``kemari_systemctl``)
that records its calls, and once against the real one, whose refusal must come back
naming the host.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kemari_suite import lab
from kemari_suite.deploy import inventory, render
from kemari_suite.deploy.inventory import Pair
from kemari_suite.errors import DeployError
from kemari_suite.remote import labhosts
from kemari_suite.remote.ops import PairStatus, RemotePair

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, sshd)"),
    pytest.mark.skipif(not Path(labhosts.SSHD).exists(), reason="openssh-server missing"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
VENV_BIN = Path(sys.executable).parent
PSK = "k" * 48

FAKE_SYSTEMCTL = """#!/bin/sh
# A stand-in service manager: records "<host> <verb> <unit>", answers like systemctl.
echo "$KEMARI_HOST $*" >> "{log}"
case "$1" in
  is-active) if [ -e "{state}/$KEMARI_HOST" ]; then echo active; else echo inactive; fi ;;
  is-enabled) echo enabled ;;
  start) touch "{state}/$KEMARI_HOST" ;;
  stop) rm -f "{state}/$KEMARI_HOST" ;;
esac
"""

FAKE_KEMARI = """#!/bin/sh
# A stand-in agent command: `status --json` and `failover --yes` answer in JSON.
case "$1" in
  status) echo '{"role": "'"$KEMARI_HOST"'", "protected": true, "epoch": 41}' ;;
  failover) echo '{"resumed": true, "epoch": 41, "host": "'"$KEMARI_HOST"'"}' ;;
  *) echo "error: $1" >&2; exit 2 ;;
esac
"""


@dataclasses.dataclass
class Env:
    lay: lab.LabLayout
    pair: labhosts.LabPair
    work: Path
    inventory: Path


def provision(root: Path, role: lab.HostRole, lay: lab.LabLayout) -> None:
    """What the playbooks leave on a host, written with the same renderers."""
    other: lab.HostRole = "secondary" if role == "primary" else "primary"
    unit = inventory.UNITS[role]
    (root / "etc/kemari").mkdir(parents=True)
    (root / "etc/kemari/kemari.toml").write_text(
        render.render_config(
            {
                "paths": {"run_dir": str(root / "run/kemari")},
                "vm": {"name": "web1"},
                "replication": {
                    "key": PSK,
                    "peer": f"{lay.repl_ip_for(other)}:7410",
                    "listen": f"{lay.repl_ip_for(role)}:7410",
                },
            }
        )
    )
    units = root / "etc/systemd/system"
    (units / "multi-user.target.wants").mkdir(parents=True)
    (units / unit).write_text(f"[Service]\nExecStart=/opt/kemari/bin/kemari {role}\n")
    (units / "multi-user.target.wants" / unit).symlink_to(f"/etc/systemd/system/{unit}")
    (root / "etc/drbd.d").mkdir(parents=True)
    (root / "etc/drbd.d/web1.res").write_text("resource web1 {}\n")
    artifacts = root / "run/kemari/artifacts/web1-x"
    artifacts.mkdir(parents=True)
    (artifacts / "checkpoints.jsonl").write_text('{"epoch": 1}\n')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    lab_id = lab.worker_lab_id(WORKER, 31)
    lab.down(lab_id)
    lay = lab.up(lab_id, "1g")
    work = tmp_path_factory.mktemp("remote")
    pair = None
    try:
        pair = labhosts.start_pair(lab_id, work / "ssh", ports=(2211, 2212))
        hosts: dict[str, Any] = {}
        for name, role, h in (
            ("pri", "primary", pair.primary),
            ("sec", "secondary", pair.secondary),
        ):
            root = work / "roots" / name
            provision(root, role, lay)  # type: ignore[arg-type]
            hosts[name] = {
                **pair.connection_vars(h),
                "kemari_role": role,
                "kemari_root": str(root),
                "kemari_bin": str(VENV_BIN / "kemari"),
            }
        inv = work / "hosts.yml"
        inv.write_text(
            yaml.safe_dump({"all": {"children": {"kemari": {"hosts": hosts}}}}, sort_keys=False)
        )
        yield Env(lay, pair, work, inv)
    finally:
        if pair is not None:
            pair.stop()
        lab.down(lab_id)


def in_lab(env: Env, fn: Any) -> Any:
    return labhosts.run_in_netns(env.pair.controller_netns, fn)


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", env.pair.controller_netns, sys.executable, "-m",
         "kemari_suite.cli.remote", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="200", NO_COLOR="1"),
        timeout=120,
        check=False,
    )  # fmt: skip


def with_hosts(pair: Pair, **changes: Any) -> Pair:
    return dataclasses.replace(
        pair,
        primary=dataclasses.replace(pair.primary, **changes),
        secondary=dataclasses.replace(pair.secondary, **changes),
    )


def status_of(env: Env, pair: Pair, **kw: Any) -> PairStatus:
    def go() -> PairStatus:
        with RemotePair(pair, connect_timeout=5, **kw) as rp:
            return rp.status()

    return in_lab(env, go)


def test_remote_operations_on_a_pair(env: Env, tmp_path: Path) -> None:
    pair = inventory.load(env.inventory).pair()

    # status: both hosts at once; the agents are not running.
    st = status_of(env, pair)
    assert not st.errors
    for h, role in zip(st.hosts, ("primary", "secondary"), strict=True):
        assert h.reachable and h.role == role and h.state == "stopped"
        assert h.unit == inventory.UNITS[role]  # type: ignore[index]
        assert h.unit_installed and h.unit_enabled == "enabled" and h.config_present
        assert not h.systemd and h.unit_active == "unknown"
        assert h.agent is None and h.agent_error and "cannot reach agent" in h.agent_error

    # The CLI prints both.
    proc = cli(env, "status", "-i", str(env.inventory))
    assert proc.returncode == 0, proc.stderr
    assert "pri" in proc.stdout and "sec" in proc.stdout and "stopped" in proc.stdout

    # Without systemd the real systemctl refuses; the error names the first host tried.
    def start_real() -> None:
        with RemotePair(pair) as rp:
            rp.start()

    with pytest.raises(DeployError) as info:
        in_lab(env, start_real)
    assert info.value.host == "sec" and info.value.task == "start"

    # A stand-in service manager: the standby starts first and stops first.
    calls, state = tmp_path / "calls.log", tmp_path / "state"
    state.mkdir()
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL.format(log=calls, state=state))
    systemctl.chmod(0o755)
    managed = with_hosts(pair, systemctl=str(systemctl))

    def start_stop() -> tuple[list[str], PairStatus]:
        with RemotePair(managed) as rp:
            rp.start()
            running = rp.status()
            rp.stop()
        return calls.read_text().splitlines(), running

    lines, running = in_lab(env, start_stop)
    verbs = [ln for ln in lines if " start " in ln or " stop " in ln]
    assert verbs == [
        "sec start kemari-standby.service",
        "pri start kemari-protect.service",
        "sec stop kemari-standby.service",
        "pri stop kemari-protect.service",
    ]
    assert all(h.unit_active == "active" and h.state == "running" for h in running.hosts)

    # failover: refused while the primary's agent answers, done on the secondary otherwise.
    kemari = tmp_path / "kemari"
    kemari.write_text(FAKE_KEMARI)
    kemari.chmod(0o755)
    live = with_hosts(pair, kemari_bin=str(kemari))

    def failover(p: Pair, force: bool = False) -> dict[str, Any]:
        with RemotePair(p, connect_timeout=5) as rp:
            return rp.failover(force=force)

    with pytest.raises(DeployError) as info:
        in_lab(env, lambda: failover(live))
    assert info.value.host == "pri" and "still runs" in info.value.reason
    assert in_lab(env, lambda: failover(live, force=True)) == {
        "resumed": True,
        "epoch": 41,
        "host": "sec",
    }
    primary_dead = dataclasses.replace(live, primary=dataclasses.replace(live.primary, port=2299))
    assert in_lab(env, lambda: failover(primary_dead))["resumed"] is True
    # With the real kemari and no agent, the secondary's refusal names it.
    with pytest.raises(DeployError) as info:
        in_lab(env, lambda: failover(pair, force=True))
    assert info.value.host == "sec" and "cannot reach agent" in info.value.reason

    # logs: one tarball, a folder per host, the key redacted.
    def logs() -> Any:
        with RemotePair(pair) as rp:
            return rp.collect_logs(tmp_path / "logs")

    before = set(Path("/tmp").glob("kemari-logs-*.tar.gz"))
    bundle = in_lab(env, logs)
    # The hosts' temporary tarballs are gone.
    assert set(Path("/tmp").glob("kemari-logs-*.tar.gz")) <= before
    assert bundle.hosts == ("pri", "sec") and not bundle.errors
    with tarfile.open(bundle.path) as tar:
        names = set(tar.getnames())
        assert {
            "summary.json",
            "pri/status.json",
            "pri/kemari.toml",
            "pri/unit/kemari-protect.service",
            "pri/drbd/web1.res",
            "pri/artifacts/web1-x/checkpoints.jsonl",
            "sec/unit/kemari-standby.service",
            "sec/journal.txt",
        } <= names
        toml = tar.extractfile("sec/kemari.toml").read().decode()  # type: ignore[union-attr]
        assert PSK not in toml and "<redacted>" in toml


def test_bad_keys_and_unreachable_hosts_are_named(env: Env, tmp_path: Path) -> None:
    pair = inventory.load(env.inventory).pair()

    # A host key that is not in known_hosts.
    empty = tmp_path / "empty"
    empty.write_text("")
    st = status_of(env, pair, known_hosts=empty)
    assert [e.host for e in st.errors] == ["pri", "sec"]
    assert all("unknown host key" in e.reason for e in st.errors)
    assert all(not h.reachable and h.state == "unreachable" for h in st.hosts)

    # A host key that does not match (each host's line carries the other's key).
    swapped = tmp_path / "swapped"
    p, s = env.pair.primary, env.pair.secondary
    swapped.write_text(
        f"[{p.address}]:{p.port} {s.host_key_public}\n[{s.address}]:{s.port} {p.host_key_public}\n"
    )
    st = status_of(env, pair, known_hosts=swapped)
    assert [e.host for e in st.errors] == ["pri", "sec"]
    assert all("does not match" in e.reason for e in st.errors)

    # A client key the hosts do not accept.
    other = labhosts.make_client_key(tmp_path / "intruder")
    st = status_of(env, with_hosts(pair, key_file=other.private))
    assert [e.host for e in st.errors] == ["pri", "sec"]
    assert all("authentication failed" in e.reason for e in st.errors)

    # One host unreachable: the other still answers.
    gone = dataclasses.replace(pair, secondary=dataclasses.replace(pair.secondary, port=2299))
    st = status_of(env, gone)
    assert st.primary.reachable and not st.secondary.reachable
    (error,) = st.errors
    assert error.host == "sec" and "2299" in error.reason and "refused" in error.reason.lower()

    # The CLI: exit 2, the host named.
    proc = cli(env, "status", "-i", str(env.inventory), "--known-hosts", str(empty))
    assert proc.returncode == 2
    assert "host pri" in proc.stderr and "host sec" in proc.stderr

    # A malformed inventory: exit 2, the file named.
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  children: [\n")
    proc = cli(env, "status", "-i", str(bad))
    assert proc.returncode == 2 and str(bad) in " ".join(proc.stderr.split())
