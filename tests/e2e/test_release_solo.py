"""`kemari release --solo` on a lab pair (issue 13, item 5).

No tiebreaker, the guest NIC behind the frame proxy (output commit). The secondary is
killed: the primary holds output (HELD), so the LAN client gets no answer from the
guest. ``release`` reports what is held and changes nothing; ``release --solo`` declares
the secondary dead: the primary goes on unprotected, the held output is released and the
client reads the counter again, never behind what it read before.
"""

from __future__ import annotations

import time

import pytest

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConnectError
from kemari_suite.lab.pair import LabPair, PairOptions
from kemari_suite.service import control
from tests.conftest import needs_root

pytestmark = [pytest.mark.e2e, needs_root]


def test_release_solo_ends_held_and_releases_the_output(
    lab_factory, base_config: KemariConfig
) -> None:
    lay = lab_factory()
    pair = LabPair(lay, base_config, PairOptions(tiebreaker="none", tapped_net=True))
    try:
        pair.start()
        pair.wait_state("primary", {"protected"}, 180)
        before = pair.wait_counter(120)
        pair.settle()
        pair.kill("secondary")
        st = pair.wait_state("primary", {"held"}, 30)
        assert "no tiebreaker" in st["reason"]
        assert st["held_limit_bytes"] == base_config.replication.held_limit_mib << 20
        # Output held: the guest's answers never reach the client.
        with pytest.raises(ConnectError):
            pair.read_counter(timeout=3)
        path = pair.control_path("primary")
        report = control.request(path, "release", solo=False)
        assert report["released"] is False and report["state"] == "held"
        assert report["held_bytes"] > 0, report  # at least the client's answers
        assert pair.status("primary")["state"] == "held"
        t0 = time.monotonic()
        res = control.request(path, "release", solo=True, timeout=60)
        assert res["released"] is True and res["state"] == "unprotected"
        st = pair.status("primary")
        assert st["state"] == "unprotected" and "release --solo" in st["reason"]
        assert st["held_bytes"] == 0
        after = pair.wait_counter(60)
        assert after >= before
        assert time.monotonic() - t0 < 60
        alerts = st["alerts"]
        assert any("release --solo" in a["reason"] for a in alerts), alerts
    finally:
        pair.stop()
