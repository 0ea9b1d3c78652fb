"""The project's playbooks through ``kemari deploy`` over SSH into the kernel lab's L1s:
two hosts with their own kernel, filesystem and init, provisioned as a real pair would
be, then provisioned again (nothing may change).

The controller runs in the host lab's client namespace and reaches each L1's sshd
through its lab host's LAN address (``kemari lab up --kernel``); host keys are checked.
The L1s have no route to a package index: the packages are the image's
(``kemari_install_packages`` off) and the wheel goes in without its dependencies, as in
tests/integration/test_deploy_playbooks.py. The L1s boot with the lab's init, not
systemd, so the units are installed as files (enable links), as the playbooks do on a
host without a running systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kemari_suite import lab
from kemari_suite.config import KemariConfig
from kemari_suite.deploy.runner import DeployOptions, DeployResult, deploy
from kemari_suite.klab.image import HostImage, build_host_image
from kemari_suite.klab.l2 import NESTED_SIZE_MIB
from kemari_suite.klab.sshd import SSH_PACKAGES, ssh_command
from kemari_suite.remote import labhosts
from kemari_suite.vm.buildkit import locked
from tests.integration.test_deploy_playbooks import snapshot_checkout
from tests.klab.conftest import WORKER, needs_lab

pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(2400)]

LAB = f"kd{''.join(c for c in WORKER if c.isdigit())[-1:] or '0'}"


def kemari(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kemari_suite.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)


@pytest.fixture
def standing(base_config: KemariConfig, tmp_path: Path) -> Iterator[dict[str, Any]]:
    with locked(base_config.paths.cache_dir / "klab" / ".ssh-image.lock"):
        image: HostImage = build_host_image(
            base_config.paths.cache_dir, packages=SSH_PACKAGES, size_mib=NESTED_SIZE_MIB
        )
    assert image.disk.exists()
    run_dir = Path(tempfile.mkdtemp(prefix="kd-", dir="/tmp"))
    env = {**os.environ, "KEMARI_RUN": str(run_dir)}
    with locked(base_config.paths.cache_dir / "klab" / ".tests.lock"):
        try:
            up = kemari("lab", "up", "--kernel", "--id", LAB, "--json", env=env)
            assert up.returncode == 0, up.stderr[-3000:]
            yield {**json.loads(up.stdout.strip().splitlines()[-1]), "env": env}
        finally:
            kemari("lab", "down", "--kernel", "--id", LAB, env=env)
            shutil.rmtree(run_dir, ignore_errors=True)


def inventory(st: dict[str, Any], directory: Path, source: Path) -> Path:
    lay = lab.layout(LAB, "1g")
    ssh_dir = Path(st["ssh_dir"])
    hosts = {}
    for h, role in zip(st["hosts"], ("primary", "secondary"), strict=True):
        address, port = h["ssh"]
        hosts[h["name"]] = {
            "ansible_host": address,
            "ansible_port": port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(ssh_dir / "client"),
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={ssh_dir / 'known_hosts'} -o StrictHostKeyChecking=yes"
            ),
            "kemari_role": role,
            "kemari_node_name": h["name"],
            "kemari_repl_address": f"10.99.{st['slot']}.{1 if role == 'primary' else 2}",
            "kemari_repl_interface": "eth0",
        }
    data = {
        "all": {
            "children": {
                "kemari": {
                    "hosts": hosts,
                    "vars": {
                        "ansible_python_interpreter": "/usr/bin/python3",
                        "kemari_install_packages": False,
                        "kemari_apt_update_cache": False,
                        "kemari_pip_install_deps": False,
                        "kemari_wheel_no_build_isolation": True,
                        "kemari_source_dir": str(source),
                        "kemari_link_profile": "1g",
                        "kemari_vm": {"name": "web1", "memory_mib": 128},
                        "kemari_replication": {
                            "tiebreaker": "witness",
                            "witness": f"{lay.lan_client_ip}:7411",
                        },
                        "kemari_disk": {"backend": "builtin", "path": "/var/lib/kemari/web1.img"},
                    },
                }
            }
        }
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(inv: Path, control: Path) -> DeployResult:
    options = DeployOptions(inventory=inv, env={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)})
    return labhosts.run_in_netns(lab.layout(LAB, "1g").ns_client, lambda: deploy(options))


def test_deploy_provisions_the_kernel_lab_hosts_over_ssh(
    standing: dict[str, Any], tmp_path: Path
) -> None:
    control = Path(tempfile.mkdtemp(prefix="kdc-", dir="/tmp"))
    try:
        inv = inventory(standing, tmp_path / "inv", snapshot_checkout(tmp_path / "src"))
        first = run(inv, control)
        assert first.ok, first.failures or first.stdout_tail
        assert set(first.stats) == {"l1a", "l1b"} and first.changed > 0
        second = run(inv, control)
        assert second.ok, second.failures or second.stdout_tail
        assert second.changed == 0, second.stats
    finally:
        shutil.rmtree(control, ignore_errors=True)

    lay = lab.layout(LAB, "1g")
    ssh_dir = Path(standing["ssh_dir"])
    for h, role in zip(standing["hosts"], ("primary", "secondary"), strict=True):
        unit = "kemari-protect.service" if role == "primary" else "kemari-standby.service"
        # What the agent will load, read by the deployed package's own loader in the L1.
        check = (
            "stat -c %a /etc/kemari/kemari.toml /etc/kemari/replication.key; "
            f"test -L /etc/systemd/system/multi-user.target.wants/{unit} && echo enabled; "
            "/opt/kemari/bin/python -c 'from kemari_suite.config import load; "
            'c = load("/etc/kemari/kemari.toml"); '
            "print(c.vm.name, c.replication.listen, c.replication.peer, c.disk.backend, "
            "c.replication.node_id)'"
        )
        address, port = h["ssh"]
        ssh = ssh_command(ssh_dir, address, port)
        shown = subprocess.run(["ip", "netns", "exec", lay.ns_client, *ssh, check],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.split("\n")
        assert lines[:3] == ["600", "600", "enabled"], shown.stdout
        me = 1 if role == "primary" else 2
        other = 3 - me
        subnet = f"10.99.{standing['slot']}"
        expected = f"web1 {subnet}.{me}:7410 {subnet}.{other}:7410 builtin {h['name']}"
        assert lines[3] == expected, shown.stdout
