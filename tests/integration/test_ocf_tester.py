"""Debian's real ``ocf-tester`` (resource-agents) against ``ocf:kemari:vm``, driving a
real standby agent (``kemari standby`` on 127.0.0.1, no namespaces, no QEMU).

ocf-tester runs, in order: meta-data (linted against ra-api-1.dtd), validate-all, the
monitor and probe of a stopped resource, start, monitor, probe, notify, demote of the
started (unpromoted) resource, then promote. That promote is refused here, as it must
be: the lone standby never received a checkpoint and bootstrap is off, so there is
nothing to resume; ocf-tester counts it and aborts. The rest of its sequence (stop,
restart, start twice, stop twice, with a monitor after each) is run through the same
wrapper afterwards. A promote that succeeds needs a peer: tests/unit/test_ocf.py
covers its decisions against a scripted control socket.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WORKER

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "playbooks" / "roles" / "kemari" / "templates" / "ocf-kemari-vm.j2"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="ocf-tester checks permissions as root"),
    pytest.mark.skipif(
        shutil.which("ocf-tester") is None or shutil.which("xmllint") is None,
        reason="needs resource-agents (ocf-tester) and libxml2-utils (xmllint)",
    ),
]


def worker_port() -> int:
    digits = "".join(c for c in WORKER if c.isdigit()) or "0"
    return 17600 + 2 * int(digits)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The wrapper as the playbooks install it, and a config for a standby on this
    worker's ports; afterwards the agent is stopped and its files removed."""
    tmp_path.chmod(0o755)  # ocf-tester runs meta-data as nobody
    wrapper = tmp_path / "vm"
    text = TEMPLATE.read_text()
    text = text.replace("{{ ansible_managed }}", "rendered by the test")
    wrapper.write_text(text.replace("{{ kemari_venv }}", sys.prefix))
    wrapper.chmod(0o755)
    key = tmp_path / "key"
    key.write_text("t" * 48 + "\n")
    key.chmod(0o600)
    port = worker_port()
    shm = Path("/dev/shm") / f"kemari-ocf-{WORKER}-{tmp_path.name}"
    name = f"ocf{WORKER}"
    cfg = tmp_path / "kemari.toml"
    cfg.write_text(
        f"""[vm]
name = "{name}"
memory_mib = 64
[paths]
run_dir = "{tmp_path / "run"}"
shm_dir = "{shm}"
[replication]
key_file = "{key}"
listen = "127.0.0.1:{port}"
peer = "127.0.0.1:{port + 1}"
"""
    )
    yield wrapper, cfg
    env = {**os.environ, "OCF_RESKEY_config": str(cfg), "OCF_RESOURCE_INSTANCE": name}
    subprocess.run([str(wrapper), "stop"], env=env, capture_output=True, timeout=120, check=False)
    pidfile = tmp_path / "run" / f"ocf-{name}.pid"
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    shutil.rmtree(shm, ignore_errors=True)


def nobody_can_run_python() -> bool:
    proc = subprocess.run(
        ["su", "nobody", "-s", "/bin/sh", "-c", f"{sys.executable} -c pass"],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def run_action(wrapper: Path, cfg: Path, action: str) -> int:
    env = {
        **os.environ,
        "OCF_ROOT": "/usr/lib/ocf",
        "OCF_RESOURCE_INSTANCE": "vm-test",
        "OCF_RESKEY_config": str(cfg),
        "OCF_RESKEY_CRM_meta_timeout": "60000",
    }
    proc = subprocess.run(
        [str(wrapper), action], env=env, capture_output=True, text=True, timeout=90, check=False
    )
    return proc.returncode


def test_ocf_tester(agent: tuple[Path, Path]) -> None:
    wrapper, cfg = agent
    proc = subprocess.run(
        ["ocf-tester", "-n", "vm-test", "-o", f"config={cfg}", str(wrapper)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    failures = re.findall(r"^\* rc=(\d+): (.*)$", proc.stdout, re.M)
    allowed = {("1", "Promote failed")}
    if not nobody_can_run_python():
        # The test's venv Python lives below /root here; an installed agent runs the
        # host's /usr/bin/python3 (the playbooks' kemari_host_python).
        allowed.add(("126", "Your agent has too restrictive permissions: should be 755"))
    assert set(failures) <= allowed, out
    # It got as far as the promote, which a running standby (status "waiting") refused
    # for the right reason.
    assert ("1", "Promote failed") in failures, out
    assert "never received a checkpoint" in out, out

    # The rest of ocf-tester's sequence, which it does not reach.
    steps = [
        ("monitor", 0),
        ("stop", 0),
        ("monitor", 7),
        ("start", 0),
        ("monitor", 0),
        ("start", 0),
        ("monitor", 0),
        ("stop", 0),
        ("monitor", 7),
        ("stop", 0),
        ("monitor", 7),
    ]
    got = [(action, run_action(wrapper, cfg, action)) for action, _ in steps]
    assert got == steps
