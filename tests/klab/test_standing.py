"""A standing kernel lab (``kemari lab up --kernel``): up, status, exec, a dead L1, down.

Boots two L1s under TCG (about a minute on a loaded machine); the supervisor is a real
detached process, stopped by ``down`` through its PID.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.errors import ConfigError
from kemari_suite.klab import standing
from kemari_suite.klab.image import HostImage
from tests.klab.conftest import lab_id, needs_lab, slot

pytestmark = [*needs_lab, pytest.mark.timeout(900)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_a_standing_kernel_lab_outlives_its_command_and_goes_down_by_pid(
    klab_nested_image: HostImage, klab_dirs: tuple[Path, PathsConfig]
) -> None:
    # A short run folder: QEMU's socket paths must stay under 108 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    paths = dataclasses.replace(klab_dirs[1], run_dir=run_dir)
    lid = lab_id(5)
    folder = standing.lab_folder(paths, lid)
    try:
        st = standing.up(paths, lid, profile="wan", slot=slot(3))
        assert st.ok, st.as_dict()
        assert [h.name for h in st.hosts] == ["l1a", "l1b"]
        for h in st.hosts:
            assert h.alive and h.answered and h.kernel.endswith("-cloud-amd64"), h
            assert h.qdisc.get("delay") == "5ms" and h.qdisc.get("rate") == "100Mbit", h
        # The L1s outlive the call that started them: their parent is the supervisor.
        assert st.supervisor_pid is not None and st.supervisor_pid != os.getpid()
        with pytest.raises(ConfigError, match="is ready"):
            standing.up(paths, lid, slot=slot(3))

        # The wan profile's delay is on the wire: 5 ms each way, on each end.
        peer = f"10.99.{slot(3) % 256}.2"
        r = standing.exec_in(paths, lid, "l1a", f"ping -c 4 -i 0.3 -q {peer}", 60)
        assert r.exit_code == 0, r.stderr
        rtt = re.search(r"= ([\d.]+)/", r.stdout)
        assert rtt is not None, r.stdout
        assert float(rtt.group(1)) >= 8.0, r.stdout  # min RTT; unshaped it is 1-2 ms
        bad = standing.exec_in(paths, lid, "l1b", "exit 3", 30)
        assert bad.exit_code == 3

        # An L1 that dies is reported, not hidden.
        qemu_b = st.hosts[1].pid
        assert qemu_b is not None
        os.kill(qemu_b, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while standing.status(paths, lid, ask_agents=False).state != "degraded":
            assert time.monotonic() < deadline, "never degraded"
            time.sleep(0.5)
        after = standing.status(paths, lid)
        assert not after.ok
        assert [h.alive for h in after.hosts] == [True, False]
        assert after.hosts[0].answered is True
    finally:
        gone = standing.down(paths, lid)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert gone.found and gone.supervisor_stopped, gone
    assert not _alive(st.supervisor_pid)
    assert not any(_alive(h.pid) for h in st.hosts if h.pid)
    assert not folder.exists()
    assert not standing.shm_folder(paths, lid).exists()
    assert standing.status(paths, lid).state == "absent"
