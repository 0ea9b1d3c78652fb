"""The standing kernel lab's pure parts: ids, slots, the netem profiles and their qdiscs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.errors import ConfigError
from kemari_suite.klab import standing
from kemari_suite.klab.netem import PROFILES, get_profile, parse_qdisc, tc_command


@pytest.mark.parametrize("bad", ["", "ABC", "abcde", "a-b", "ü"])
def test_a_bad_id_is_named(bad: str) -> None:
    with pytest.raises(ConfigError, match="1-4 lower-case"):
        standing.validate_id(bad)


def test_slots_stay_clear_of_the_tests_and_scenarios() -> None:
    slots = {standing.default_slot(f"k{i}") for i in range(200)}
    assert min(slots) >= 20 and max(slots) < 100
    assert len(slots) > 50  # spread, not one slot for all


def test_every_profile_renders_and_reads_back() -> None:
    assert set(PROFILES) == {"1g", "10g", "wan", "unlimited"}
    wan = tc_command(get_profile("wan"))
    assert wan.startswith("tc qdisc replace dev eth0 root netem delay 5000us 1000us")
    assert wan.endswith("rate 100mbit")
    assert "del" in tc_command(get_profile("unlimited"))
    with pytest.raises(ConfigError, match="1g, 10g, wan, unlimited"):
        get_profile("5g")


def test_parse_qdisc_reads_what_tc_prints() -> None:
    shown = (
        "qdisc netem 8001: root refcnt 2 limit 1000 delay 5ms  1ms rate 100Mbit seed 42\n"
        "qdisc pfifo_fast 0: dev eth1 root refcnt 2\n"
    )
    assert parse_qdisc(shown) == {"delay": "5ms", "jitter": "1ms", "rate": "100Mbit"}
    assert parse_qdisc("qdisc noqueue 0: root refcnt 2\n") == {}


def test_status_and_down_of_an_absent_lab(tmp_path: Path) -> None:
    paths = PathsConfig(cache_dir=tmp_path, run_dir=tmp_path / "run", shm_dir=tmp_path / "shm")
    st = standing.status(paths, "zz")
    assert st.state == "absent" and not st.ok
    assert not standing.down(paths, "zz").found
    with pytest.raises(ConfigError, match="no kernel lab zz"):
        standing.exec_in(paths, "zz", "l1a", "true", 5)


def test_a_stale_state_file_is_named_stale(tmp_path: Path) -> None:
    paths = PathsConfig(cache_dir=tmp_path, run_dir=tmp_path / "run", shm_dir=tmp_path / "shm")
    folder = standing.lab_folder(paths, "zz")
    folder.mkdir(parents=True)
    # A supervisor that is gone: a PID that exited.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    state = {"state": "ready", "supervisor_pid": int(done.stdout), "hosts": {}}
    (folder / "state.json").write_text(json.dumps(state))
    st = standing.status(paths, "zz")
    assert st.state == "stale" and "supervisor" in st.error
    assert standing.down(paths, "zz").found
    assert not folder.exists()
