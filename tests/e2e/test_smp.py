"""A 2-vCPU guest (multi-threaded TCG here, KVM elsewhere) is protected and fails over."""

from __future__ import annotations

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.lab.pair import LabPair, PairOptions
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def test_two_vcpu_guest_fails_over(lab_factory, base_config: KemariConfig) -> None:
    lay = lab_factory()
    # Two counters, one per vCPU's worth of work, plus the served one.
    opts = PairOptions(vcpus=2, workload="counter -q 0 & counter -q -p 7000 100")
    pair = LabPair(lay, base_config, opts)
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        pair.wait_counter(120)
        pair.settle()
        assert "-smp" in (pair.run_dir("primary") / "kemari-guest" / "cmdline").read_text()
        pair.kill("primary")
        st = pair.wait_state("secondary", {"active"}, 60)
        probes = st["failover"]["probes"]
        assert "counter" in probes and len(probes["counters"]) == 2
        after = pair.wait_counter(60)
        assert after >= probes["counter"]
    finally:
        pair.stop()
