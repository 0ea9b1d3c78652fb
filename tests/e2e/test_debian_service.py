"""Issue: protect a real VM. Debian's nginx in a 2-vCPU Debian guest, defined by a VM
definition, driven by Debian's curl from the client namespace; the host running the VM
is killed at random moments; every record the client saw stored is there afterwards,
on the running guest and, after a clean shutdown, on its disk (checked offline).

CI runs one kill, 4 and 16 clients and a one-minute soak with the product's heartbeat
defaults; ``make e2e`` also runs ``kemari bench service --kills 10 --soak-minutes 30``,
which records its figures in benchmarks/results/service.md."""

from __future__ import annotations

import os

import pytest

from kemari_suite.bench import service
from kemari_suite.config import KemariConfig
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def test_nginx_records_survive_random_kills(lab_factory, base_config: KemariConfig) -> None:
    kills = int(os.environ.get("KEMARI_SERVICE_KILLS", "1"))
    lay = lab_factory()
    soak_s = float(os.environ.get("KEMARI_SERVICE_SOAK_S", "60"))
    res = service.run(
        base_config,
        kills=kills,
        measure_s=6.0,
        clients=(4, 16),
        soak_s=soak_s,
        lay=lay,
        progress=print,
    )
    c = res["check"]
    assert c["committed"] > 20, c
    assert not c["missing_live"], c["missing_live"][:10]
    assert c["fsck_clean"], c
    assert c["offline_ok"], (
        c["offline_missing"][:10],
        c["offline_mismatched"][:10],
        c["offline_found"],
        c["final_checkpoint"],
        res["kills"],
    )
    assert len(res["kills"]) == kills
    for k in res["kills"]:
        assert k["outage_s"] is not None and k["outage_s"] < 60, k
        assert not k["spot_missing"], k
    assert res["unprotected"]["stored"] > 0 and res["protected"]["stored"] > 0
    assert set(res["by_clients"]) == {"4", "16"}
    for v in res["by_clients"].values():
        assert v["protected"]["stored"] > 0 and v["throughput_ratio"] is not None, v
    # No fault during the soak: no takeover, no fence, the primary protected throughout.
    sk = res["soak"]
    assert sk["false_failovers"] == 0 and sk["not_protected_samples"] == 0, sk
    assert sk["stored"] > 0, sk
    assert res["ok"]
