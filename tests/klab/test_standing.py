"""A standing kernel lab (``kemari lab up --kernel``), through the CLI: two L1s in the
host lab's namespaces, netem inside, commands run in them, a partition of the host
lab's link, a dead L1, and ``down`` by PID.

Boots two L1s under TCG (under a minute on a quiet machine); the supervisor is a real
detached process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kemari_suite import lab
from kemari_suite.config import PathsConfig
from kemari_suite.klab import standing
from kemari_suite.klab.image import HostImage
from tests.klab.conftest import WORKER, needs_lab

pytestmark = [*needs_lab, pytest.mark.timeout(900)]

#: Not a ``t<worker><slot>`` id: those are the namespace-lab tests' (worker_lab_id).
LAB = f"kl{''.join(c for c in WORKER if c.isdigit())[-1:] or '0'}"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.fixture
def env(klab_dirs: tuple[Path, PathsConfig]) -> Iterator[dict[str, str]]:
    # A short run folder: QEMU's socket paths must stay under 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    paths = klab_dirs[1]
    yield {**os.environ, "KEMARI_RUN": str(run_dir), "KEMARI_SHM": str(paths.shm_dir)}
    kemari("lab", "down", "--kernel", "--id", LAB, env={**os.environ, "KEMARI_RUN": str(run_dir)})
    shutil.rmtree(run_dir, ignore_errors=True)


def kemari(
    *args: str, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kemari_suite.cli.main", *args]
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(data, dict)
    return data


def ping_min_ms(env: dict[str, str], peer: str) -> float | None:
    """The L1 l1a's minimum RTT to ``peer``; None if no answer."""
    r = kemari("klab", "exec", "--id", LAB, "--host", "l1a", "--", "ping", "-c", "3", "-i",
               "0.3", "-W", "2", "-q", peer, env=env, timeout=120)  # fmt: skip
    found = re.search(r"= ([\d.]+)/", r.stdout)
    return float(found.group(1)) if r.returncode == 0 and found else None


def test_a_standing_kernel_lab_in_the_host_labs_namespaces(
    klab_nested_image: HostImage, env: dict[str, str]
) -> None:
    # Without sshd: the nested image, the one `make test` builds anyway (test_deploy_l1
    # logs in over SSH, in `make e2e`).
    up = kemari(
        "lab", "up", "--kernel", "--no-ssh", "--id", LAB, "--profile", "wan", "--json", env=env
    )
    assert up.returncode == 0, up.stderr[-3000:]
    st = last_json(up)
    lay = lab.layout(LAB, "1g")
    assert st["ok"] is True and st["namespaces"] == [lay.ns_primary, lay.ns_secondary], st
    hosts = st["hosts"]
    assert isinstance(hosts, list) and [h["name"] for h in hosts] == ["l1a", "l1b"]
    for h in hosts:
        assert h["alive"] and h["answered"] and h["kernel"].endswith("-cloud-amd64"), h
        assert h["qdisc"] == {"delay": "5ms", "jitter": "1ms", "rate": "100Mbit"}, h
    sup = st["supervisor_pid"]
    assert isinstance(sup, int) and _alive(sup)  # it outlived `lab up`
    again = kemari("lab", "up", "--kernel", "--id", LAB, env=env)
    assert again.returncode != 0

    # The L1s' link crosses the host lab's shaped veth: netem's 5 ms on each end are
    # on the wire, the veth counts the datagrams, and a partition of the lab cuts it.
    peer = f"10.99.{st['slot']}.2"
    before = _tx_packets(lay.ns_primary, lay.repl_primary_if)
    rtt = ping_min_ms(env, peer)
    assert rtt is not None and rtt >= 7.0, rtt  # 2 x (5 ms - 1 ms jitter) at least; unshaped 1-2 ms
    assert _tx_packets(lay.ns_primary, lay.repl_primary_if) >= before + 3
    lab.partition(LAB)
    try:
        assert ping_min_ms(env, peer) is None
    finally:
        lab.heal(LAB)
    assert ping_min_ms(env, peer) is not None

    assert st["ssh_dir"] == "" and all(h["ssh"] is None for h in hosts)

    bad = kemari("klab", "exec", "--id", LAB, "--host", "l1b", "--", "exit 3", env=env)
    assert bad.returncode == 3, bad.stderr

    # An L1 that dies is reported, not hidden.
    qemu_b = hosts[1]["pid"]
    os.kill(qemu_b, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        shown = kemari("lab", "status", "--kernel", "--id", LAB, "--json", env=env)
        now = last_json(shown)
        if now["state"] == "degraded":
            break
        assert time.monotonic() < deadline, now
        time.sleep(1)
    assert shown.returncode == 1
    assert [h["alive"] for h in now["hosts"]] == [True, False]

    down = kemari("lab", "down", "--kernel", "--id", LAB, "--json", env=env)
    assert down.returncode == 0, down.stderr
    gone = last_json(down)
    assert gone["found"] is True and gone["supervisor_stopped"] is True, gone
    assert not _alive(sup) and not any(_alive(h["pid"]) for h in hosts)
    assert LAB not in lab.list_labs()
    assert not standing.lab_folder(PathsConfig(run_dir=Path(env["KEMARI_RUN"])), LAB).exists()
    absent = kemari("lab", "status", "--kernel", "--id", LAB, "--json", env=env)
    assert absent.returncode == 1 and last_json(absent)["state"] == "absent"


def _tx_packets(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])
