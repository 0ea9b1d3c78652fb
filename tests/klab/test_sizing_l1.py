"""``kemari bench sizing``'s trackers inside an L1 on Debian's kernel: soft-dirty is
chosen by the benchmark's own probe and measured beside compare, guests under nested
KVM (make e2e: about three minutes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.klab.conftest import needs_lab

pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_sizing_in_the_l1_measures_soft_dirty_beside_compare(klab_nested_image: object) -> None:
    import json

    done = subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.main", "klab", "sizing", "--sizes", "128",
         "--samples", "5", "--json"],
        capture_output=True, text=True, timeout=1700, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["tracker"] == "soft-dirty", res
    assert "soft-dirty tracking works" in res["reason"]
    assert res["l1"]["kvm_in_the_l1"] is True and res["l1"]["kernel"].endswith("-cloud-amd64")
    for figures in (res, res["compare"]):
        assert figures["pause_ms_p50"]["128"] > 0, res
    # What the fast tracker is for: its scan is cheaper than a full compare.
    assert res["scan_ms_p50"]["128"] < res["compare"]["scan_ms_p50"]["128"], res
