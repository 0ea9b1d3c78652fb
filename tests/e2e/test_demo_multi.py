"""``kemari demo --vms N``: several protected VMs on one lab pair, in both directions,
one witness, every agent's ``/metrics`` scraped; the host holding most primaries is
killed and every VM must be served again with no acknowledged record lost.

Three 96 MiB guests under TCG: two primaries on host A (killed: they fail over to B)
and one on host B (its standby dies with A: it goes on unprotected).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.demo.multi import run_multi_demo
from tests.conftest import WORKER, needs_root, next_lab_id

pytestmark = [pytest.mark.e2e, needs_root]


@pytest.fixture
def short_paths(base_config: KemariConfig) -> Iterator[PathsConfig]:
    """Short run and shm folders: the agents' unix sockets live there (107 bytes)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"kmv-{WORKER}-"))
    shm_dir = Path(tempfile.mkdtemp(prefix=f"kmv-{WORKER}-", dir="/dev/shm"))
    try:
        yield PathsConfig(cache_dir=base_config.paths.cache_dir, run_dir=run_dir, shm_dir=shm_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)


def test_three_vms_survive_the_loss_of_the_host_holding_most(
    base_config: KemariConfig, short_paths: PathsConfig
) -> None:
    cfg = dataclasses.replace(base_config, paths=short_paths)
    res = run_multi_demo(cfg, count=3, lab_id=next_lab_id(), run_seconds=2.0)
    # What `kemari demo --vms 3 --json` prints as its last line.
    out = json.loads(json.dumps(res.to_dict()))
    assert out["resumed"], out
    assert [v["name"] for v in out["vms"]] == ["vm1", "vm2", "vm3"]
    by_outcome: dict[str, list[str]] = {}
    for v in out["vms"]:
        assert {"name", "resumed", "pause_ms_p50", "records_lost", "outcome"} <= set(v)
        assert v["resumed"] is True, v
        assert v["records_lost"] == 0, v
        assert v["counter_after"] >= v["counter_before_kill"] > 0, v
        assert v["pause_ms_p50"] is not None and v["pause_ms_p50"] > 0, v
        assert v["checkpoints"] > 0, v
        by_outcome.setdefault(v["outcome"], []).append(v["name"])
        if v["outcome"] == "failed_over":
            assert (v["primary_host"], v["role"], v["state"]) == ("primary", "secondary", "active")
            assert v["failover_ms"] is not None, v
        else:
            assert (v["primary_host"], v["role"], v["state"]) == (
                "secondary",
                "primary",
                "unprotected",
            )
    # Most primaries were on the killed host; the pair ran VMs in both directions.
    assert by_outcome == {"failed_over": ["vm1", "vm2"], "unprotected": ["vm3"]}
    # Six agents scraped once a second for seconds: far more than one scrape's worth.
    assert out["prometheus_scrapes"] >= 6, out
    assert out["prometheus_samples"] >= 6 * 50, out
    # Scrapes of live agents answer (a loaded machine may time out an odd one).
    assert out["prometheus_errors"] <= out["prometheus_scrapes"] // 10, out
    # Every guest address and port was its own: three distinct guests answered.
    assert len({v["guest_ip"] for v in out["vms"]}) == 3
