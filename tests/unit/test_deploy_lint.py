"""The playbooks pass ansible-lint's production profile and Ansible's syntax check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_ansible_lint_production_profile() -> None:
    lint = tool("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint is not installed (the dev extra)")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", NO_COLOR="1")
    proc = subprocess.run(
        [lint, "--offline", "--profile", "production", "playbooks/site.yml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stderr + proc.stdout


def test_syntax_check(tmp_path: Path) -> None:
    inv = tmp_path / "hosts.yml"
    hosts = {"a": {"kemari_role": "primary"}, "b": {"kemari_role": "secondary"}}
    inv.write_text(yaml.safe_dump({"all": {"children": {"kemari": {"hosts": hosts}}}}))
    proc = subprocess.run(
        [tool("ansible-playbook") or "ansible-playbook", "--syntax-check", "-i", str(inv),
         str(REPO / "playbooks" / "site.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
