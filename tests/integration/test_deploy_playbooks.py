"""The playbooks against two real SSH hosts: sshd in the primary and secondary
namespaces of a lab, freshly generated host and client keys, host key checking on.

The two hosts share this machine's filesystem, so each is provisioned into its own
install root (``kemari_root``); services are installed in files mode (units and their
enable links, nothing started: systemd is not PID 1 here). The controller (ansible-
runner, or plain ansible-playbook) runs in the lab's client namespace, on the LAN.

The expensive work (a full run, then a second one) happens inside one test, so that
pytest-xdist never repeats it on two workers; the lab and the sshds are cheap.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kemari_suite import config as configmod
from kemari_suite import lab
from kemari_suite.deploy import render
from kemari_suite.deploy.runner import DeployOptions, DeployResult, deploy
from kemari_suite.errors import ConfigError, DeployError
from kemari_suite.protocol.keys import read_key_file
from kemari_suite.remote import labhosts


def _can_build_wheel_offline() -> bool:
    """The wheel is built without the package index: it needs `wheel` or a setuptools
    that has bdist_wheel itself (70.1 and newer)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, sshd)"),
    pytest.mark.skipif(not Path(labhosts.SSHD).exists(), reason="openssh-server missing"),
    pytest.mark.skipif(
        not _can_build_wheel_offline(), reason="needs `wheel` or setuptools >= 70.1 (dev extra)"
    ),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "site.yml"
VENV_BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Env:
    lay: lab.LabLayout
    pair: labhosts.LabPair
    work: Path
    control_dir: Path
    source: Path

    def ansible_env(self, inventory: Path) -> dict[str, str]:
        # ssh masters are per inventory: a test with another key or known_hosts must not
        # ride on a connection another test already authenticated.
        return {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir / inventory.parent.name)}


def close_masters(control_dir: Path) -> None:
    """End the ssh ControlPersist masters Ansible left, through their control sockets."""
    for sock in control_dir.glob("*/*"):
        subprocess.run(
            ["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "kemari-test"],
            capture_output=True,
            timeout=10,
            check=False,
        )


def snapshot_checkout(dest: Path) -> Path:
    """A copy of the sources the wheel is built from, so that edits to the working tree
    during the test cannot make the second run rebuild (and change) it."""
    for name in ("pyproject.toml", "README.md"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(
        REPO / "kemari_suite", dest / "kemari_suite", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    lab_id = lab.worker_lab_id(WORKER, 30)
    lab.down(lab_id)
    lay = lab.up(lab_id, "1g")
    work = tmp_path_factory.mktemp("deploy")
    # ssh control sockets need a short path.
    control_dir = Path(tempfile.mkdtemp(prefix="kcp-", dir="/tmp"))
    pair = None
    try:
        pair = labhosts.start_pair(lab_id, work / "ssh")
        yield Env(lay, pair, work, control_dir, snapshot_checkout(work / "checkout"))
    finally:
        close_masters(control_dir)
        if pair is not None:
            pair.stop()
        lab.down(lab_id)
        shutil.rmtree(control_dir, ignore_errors=True)


def host_vars(env: Env, role: lab.HostRole, root: Path) -> dict[str, Any]:
    h = env.pair.primary if role == "primary" else env.pair.secondary
    return {
        **env.pair.connection_vars(h),
        "kemari_role": role,
        "kemari_root": str(root),
        "kemari_node_name": f"k{role[:3]}",
        "kemari_repl_address": env.lay.repl_ip_for(role),
        "kemari_repl_interface": env.lay.repl_if_for(role),
        "kemari_config": {"paths": {"run_dir": str(root / "run" / "kemari")}},
        # `kemari remote` runs this machine's kemari (the hosts' venvs lack dependencies).
        "kemari_bin": str(VENV_BIN / "kemari"),
    }


def write_inventory(
    env: Env,
    directory: Path,
    *,
    packages: bool = False,
    group_vars: dict[str, Any] | None = None,
    **host_overrides: dict[str, Any],
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    roots = {r: directory / "roots" / r[:3] for r in lab.HOST_ROLES}
    hosts = {
        "pri": host_vars(env, "primary", roots["primary"]),
        "sec": host_vars(env, "secondary", roots["secondary"]),
    }
    for name, extra in host_overrides.items():
        hosts[name].update(extra)
    data = {
        "all": {
            "children": {
                "kemari": {
                    "hosts": hosts,
                    "vars": {
                        "ansible_python_interpreter": "/usr/bin/python3",
                        # Packages: checked against this machine, never fetched.
                        "kemari_install_packages": packages,
                        "kemari_apt_update_cache": False,
                        # No package index in tests: the wheel's dependencies are not
                        # installed on the hosts, and the build uses the venv's tools.
                        "kemari_pip_install_deps": False,
                        "kemari_wheel_no_build_isolation": True,
                        "kemari_source_dir": str(env.source),
                        "kemari_link_profile": "10g",
                        "kemari_vm": {"name": "web1", "memory_mib": 128},
                        "kemari_replication": {
                            "tiebreaker": "witness",
                            "witness": f"{env.lay.lan_client_ip}:7411",
                        },
                        "kemari_disk": {"backend": "drbd"},
                        "kemari_drbd": {"disk": "/dev/kemari/web1", "minor": 3},
                    },
                }
            }
        }
    }
    data["all"]["children"]["kemari"]["vars"].update(group_vars or {})
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_deploy(env: Env, inventory: Path, **kw: Any) -> DeployResult:
    options = DeployOptions(inventory=inventory, env=env.ansible_env(inventory), **kw)
    return labhosts.run_in_netns(env.pair.controller_netns, lambda: deploy(options))


def in_controller(
    env: Env, inventory: Path, argv: list[str], **kw: Any
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, COLUMNS="200", NO_COLOR="1", **env.ansible_env(inventory))
    e["PATH"] = f"{VENV_BIN}:{e.get('PATH', '')}"
    return subprocess.run(
        ["ip", "netns", "exec", env.pair.controller_netns, *argv],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
        check=False,
        **kw,
    )


def recap(stdout: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", stdout, re.MULTILINE):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def link_mtu(ns: str, dev: str) -> int:
    text = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "dev", dev], capture_output=True, text=True
    ).stdout
    m = re.search(r"\bmtu (\d+)", text)
    assert m, text
    return int(m.group(1))


def test_playbooks_provision_the_pair_and_a_second_run_changes_nothing(env: Env) -> None:
    inv = write_inventory(env, env.work / "main")
    roots = {"primary": inv.parent / "roots" / "pri", "secondary": inv.parent / "roots" / "sec"}
    assert link_mtu(env.lay.ns_primary, env.lay.repl_primary_if) == 1500

    first = run_deploy(env, inv)
    assert first.ok, first.failures or first.stdout_tail
    assert first.changed > 0
    assert set(first.stats) == {"pri", "sec"}
    assert (first.artifact_dir / "summary.json").is_file()
    assert list((first.artifact_dir / "job_events").glob("*.json"))
    assert first.artifact_dir.parent == inv.parent / ".kemari" / "runs"

    # The pre-shared key: generated once on the controller, the same on both hosts.
    psk_file = inv.parent / "credentials" / "kemari-kemari.psk"
    psk = psk_file.read_text().strip()
    assert len(psk) == 64 and psk.isalnum()
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    # The pair's own key at the witness (tiebreaker = "witness"), never the replication key.
    wpsk_file = inv.parent / "credentials" / "kemari-kemari-witness.psk"
    wpsk = wpsk_file.read_text().strip()
    assert len(wpsk) == 64 and wpsk != psk
    assert stat.S_IMODE(wpsk_file.stat().st_mode) == 0o600

    units = {"primary": "kemari-protect.service", "secondary": "kemari-standby.service"}
    commands = {"primary": "protect", "secondary": "standby"}
    drbd_nodes = []
    for role in lab.HOST_ROLES:
        drbd_nodes.append(
            {
                "name": f"k{role[:3]}",
                "address": env.lay.repl_ip_for(role),
                "node_id": 0 if role == "primary" else 1,
                "port": 7789,
                "disk": "",
            }
        )
    expected_res = render.render_drbd(
        {
            "resource": "web1",
            "fence_peer_handler": "/opt/kemari/bin/kemari fence-peer --resource {resource}",
            "disk": "/dev/kemari/web1",
            "minor": 3,
        },
        drbd_nodes,
    )
    for role in lab.HOST_ROLES:
        root = roots[role]
        other: lab.HostRole = "secondary" if role == "primary" else "primary"
        # kemari.toml: what the agent will load, checked by the agent's own loader.
        toml = root / "etc/kemari/kemari.toml"
        assert stat.S_IMODE(toml.stat().st_mode) == 0o600
        cfg = configmod.load(toml)
        assert cfg.vm.name == "web1" and cfg.vm.memory_mib == 128
        # The keys are files (0600), named by the config, which holds no key itself.
        assert cfg.replication.key == "" and psk not in toml.read_text()
        assert cfg.replication.key_file == "/etc/kemari/replication.key"
        assert cfg.replication.witness_key_file == "/etc/kemari/witness.key"
        for key_path, value in (("replication.key", psk), ("witness.key", wpsk)):
            host_key = root / "etc/kemari" / key_path
            assert stat.S_IMODE(host_key.stat().st_mode) == 0o600, host_key
            assert host_key.read_text() == value + "\n"
            # As the agents read it: owner-only, long enough.
            assert read_key_file(host_key, what=key_path) == value.encode()
        assert stat.S_IMODE((root / "etc/kemari").stat().st_mode) == 0o700
        assert cfg.replication.peer == f"{env.lay.repl_ip_for(other)}:7410"
        assert cfg.replication.listen == f"{env.lay.repl_ip_for(role)}:7410"
        # The host's name at the witness: its inventory name, whatever role it runs.
        assert cfg.replication.node_id == role[:3]
        assert cfg.replication.tiebreaker == "witness"
        assert cfg.disk.backend == "drbd"
        assert cfg.paths.run_dir == root / "run" / "kemari"
        # DRBD: the disk layer's renderer, byte for byte (and drbdadm checked it).
        assert (root / "etc/drbd.d/web1.res").read_text() == expected_res
        # Units: this role's agent, enabled the way systemctl enable would.
        unit = (root / "etc/systemd/system" / units[role]).read_text()
        assert (
            f"ExecStart=/opt/kemari/bin/kemari {commands[role]} -c /etc/kemari/kemari.toml" in unit
        )
        # Guest memory, logs, artifacts: owner only, for the agent and its QEMU.
        assert "\nUMask=0077\n" in unit
        assert not (root / "etc/systemd/system" / units[other]).exists()
        wants = root / "etc/systemd/system/multi-user.target.wants"
        assert os.readlink(wants / units[role]) == f"/etc/systemd/system/{units[role]}"
        link_unit = (root / "etc/systemd/system/kemari-link.service").read_text()
        assert "mtu 9000" in link_unit and env.lay.repl_if_for(role) in link_unit
        assert "\nUMask=0077\n" in link_unit
        link_target = os.readlink(wants / "kemari-link.service")
        assert link_target == "/etc/systemd/system/kemari-link.service"
        # The wheel built from this checkout, installed in the host's venv.
        venv = root / "opt/kemari"
        (dist,) = venv.glob("lib/python3*/site-packages/kemari_suite-*.dist-info")
        assert re.match(r"kemari_suite-0\.1\.0\+src\.[0-9a-f]{12}\.dist-info", dist.name)
        probe = subprocess.run(
            [str(venv / "bin/python"), "-c", "import kemari_suite.config as c; print(c.__file__)"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        assert str(venv) in probe.stdout
        assert os.readlink(root / "usr/local/bin/kemari") == "/opt/kemari/bin/kemari"
        # The replication link: jumbo frames for the 10g profile (veth allows them).
        assert link_mtu(env.lay.ns_for(role), env.lay.repl_if_for(role)) == 9000

    # A second run, with plain ansible-playbook: nothing changes.
    before = {r: (roots[r] / "etc/kemari/kemari.toml").stat().st_mtime_ns for r in roots}
    second = in_controller(
        env,
        inv,
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inv), str(PLAYBOOK)],
        cwd=str(REPO),
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    stats = recap(second.stdout)
    assert set(stats) == {"pri", "sec"}, second.stdout[-2000:]
    changed_tasks = [b.split("]", 1)[0] for b in second.stdout.split("TASK [") if "changed:" in b]
    for host, counts in stats.items():
        assert counts["changed"] == 0, (host, changed_tasks)
        assert counts["failed"] == 0 and counts["unreachable"] == 0
    assert psk_file.read_text().strip() == psk
    assert wpsk_file.read_text().strip() == wpsk
    assert before == {r: (roots[r] / "etc/kemari/kemari.toml").stat().st_mtime_ns for r in roots}

    # `kemari remote status`: both hosts, deployed, agents not running.
    proc = in_controller(
        env,
        inv,
        [sys.executable, "-m", "kemari_suite.cli.remote", "status", "-i", str(inv), "--json"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    for name, role in (("pri", "primary"), ("sec", "secondary")):
        host = status[role]
        assert host["host"] == name and host["reachable"] and host["error"] is None
        assert host["state"] == "stopped"
        assert host["unit"] == units[role] and host["unit_enabled"] == "enabled"
        assert host["unit_installed"] and host["config_present"] and host["kemari_installed"]
        assert host["agent"] is None and "cannot reach agent" in host["agent_error"]


def test_check_mode_reports_changes_and_writes_nothing(env: Env) -> None:
    inv = write_inventory(env, env.work / "check", packages=True)
    result = run_deploy(env, inv, check=True, limit="pri")
    assert result.ok, result.failures or result.stdout_tail
    assert result.check and set(result.stats) == {"pri"}
    assert result.stats["pri"].changed > 0
    assert not (inv.parent / "roots").exists()


def test_unreachable_host_is_named(env: Env) -> None:
    inv = write_inventory(env, env.work / "unreachable", sec={"ansible_port": 2299})
    result = run_deploy(env, inv, limit="sec")
    assert not result.ok
    (failure,) = result.failures
    assert failure.host == "sec" and failure.unreachable
    with pytest.raises(DeployError) as info:
        result.raise_for_failure()
    assert info.value.host == "sec"
    assert "unreachable" in str(info.value) and "2299" in str(info.value)


def test_wrong_client_key_is_named(env: Env) -> None:
    other = labhosts.make_client_key(env.work / "otherkey", "intruder")
    inv = write_inventory(
        env, env.work / "wrongkey", pri={"ansible_ssh_private_key_file": str(other.private)}
    )
    result = run_deploy(env, inv, limit="pri")
    (failure,) = result.failures
    assert failure.host == "pri" and failure.unreachable
    assert "Permission denied" in failure.reason


def test_unknown_host_key_is_refused(env: Env) -> None:
    empty = env.work / "empty_known_hosts"
    empty.write_text("")
    inv = write_inventory(
        env,
        env.work / "hostkey",
        sec={
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={empty} -o StrictHostKeyChecking=yes"
        },
    )
    result = run_deploy(env, inv, limit="sec")
    (failure,) = result.failures
    assert failure.host == "sec"
    assert "Host key verification failed" in failure.reason


def test_cli_names_the_failing_host_and_task(env: Env) -> None:
    inv = write_inventory(env, env.work / "cli", sec={"ansible_port": 2299})
    proc = in_controller(
        env,
        inv,
        [sys.executable, "-m", "kemari_suite.cli.deploy", "-i", str(inv), "--limit", "sec"],
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "host sec task" in proc.stderr and "unreachable" in proc.stderr
    assert "artifacts:" in proc.stdout


def test_malformed_pair_is_refused_before_ansible_runs(env: Env) -> None:
    inv = write_inventory(env, env.work / "badpair", sec={"kemari_role": "primary"})
    with pytest.raises(ConfigError) as info:
        run_deploy(env, inv)
    assert str(inv) in str(info.value) and "sec.kemari_role" in str(info.value)


def test_playbooks_deploy_a_list_of_vms_with_primaries_on_both_hosts(env: Env) -> None:
    from kemari_suite.node import control_path

    vms = [
        {"name": "web", "drbd": {"disk": "/dev/kemari/web"}},
        {"name": "db", "primary": "sec", "vm": {"memory_mib": 256}},
        {"name": "app", "repl_port": 7500, "drbd": {"disk": "/dev/kemari/app"}},
    ]
    inv = write_inventory(env, env.work / "vms", group_vars={"kemari_vms": vms})
    roots = {"primary": inv.parent / "roots" / "pri", "secondary": inv.parent / "roots" / "sec"}
    result = run_deploy(env, inv)
    assert result.ok, result.failures or result.stdout_tail

    ports = {"web": 7410, "db": 7411, "app": 7500}
    runs_primary = {"primary": {"web", "app"}, "secondary": {"db"}}
    for role in lab.HOST_ROLES:
        root = roots[role]
        sockets: set[Path] = set()
        other: lab.HostRole = "secondary" if role == "primary" else "primary"
        system = root / "etc/systemd/system"
        wants = system / "multi-user.target.wants"
        # The single-VM files are not written for a list.
        assert not (root / "etc/kemari/kemari.toml").exists()
        assert not (system / "kemari-protect.service").exists()
        for template, command in (
            ("kemari-protect@.service", "protect"),
            ("kemari-standby@.service", "standby"),
        ):
            unit = (system / template).read_text()
            assert f"ExecStart=/opt/kemari/bin/kemari {command} -c /etc/kemari/vms/%i.toml" in unit
            for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "UMask=0077"):
                assert f"\n{line}\n" in unit, (template, line)
        macs = set()
        for name, port in ports.items():
            toml = root / "etc/kemari/vms" / f"{name}.toml"
            assert stat.S_IMODE(toml.stat().st_mode) == 0o600
            cfg = configmod.load(toml)
            assert cfg.vm.name == name
            assert cfg.vm.memory_mib == (256 if name == "db" else 128)
            assert cfg.replication.listen == f"{env.lay.repl_ip_for(role)}:{port}"
            assert cfg.replication.peer == f"{env.lay.repl_ip_for(other)}:{port}"
            assert cfg.replication.node_id == role[:3]
            assert cfg.replication.key_file == "/etc/kemari/replication.key"
            assert cfg.replication.witness_key_file == "/etc/kemari/witness.key"
            macs.add(cfg.vm.mac)
            sockets.add(control_path(cfg))
            first = "primary" if name in runs_primary[role] else "secondary"
            unit = f"kemari-{'protect' if first == 'primary' else 'standby'}@{name}.service"
            template = unit.replace(f"@{name}.", "@.")
            assert os.readlink(wants / unit) == f"/etc/systemd/system/{template}"
            not_here = f"kemari-{'standby' if first == 'primary' else 'protect'}@{name}.service"
            assert not (wants / not_here).is_symlink()
        assert len(macs) == 3
        # One DRBD resource per VM: its own port and minor; node 0 is the VM's primary.
        for i, name in enumerate(("web", "db", "app")):
            res = (root / "etc/drbd.d" / f"{name}.res").read_text()
            assert f"resource {name}" in res and f"minor {3 + i}" in res
            assert f":{7789 + i}" in res
        assert "/dev/kemari/web" in (root / "etc/drbd.d/web.res").read_text()
        # Control sockets (and so QMP, RAM file, artifacts): one per VM.
        assert len(sockets) == 3

    # Again: nothing changes.
    second = run_deploy(env, inv)
    assert second.ok, second.failures or second.stdout_tail
    assert second.changed == 0, second.stdout_tail
