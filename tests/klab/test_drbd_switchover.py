"""A planned switchover on DRBD 8.4 in the kernel lab: ``kemari switchover`` in l1a hands
the protected guest to l1b; l1a's engine demotes DRBD before it asks, so l1b's promotion
meets a Secondary; the guest answers from l1b with every acknowledged record, l1a stands
by, and the pair is protected again (DRBD connected, UpToDate/UpToDate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.switchdemo import SwitchRun, run_drbd_switchover
from kemari_suite.vm.image import GuestImage

from .conftest import CHECKOUT, engine_pair, needs_lab, print_consoles

# A long scenario (about 10-15 minutes on a loaded machine): `make e2e`, not `make test`.
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(2400)]


def test_a_switchover_demotes_drbd_on_the_old_primary_and_reprotects(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    lab, paths = klab_dirs
    pair = engine_pair(klab_nested_image, klab_dirs, 1)
    run = SwitchRun()
    try:
        pair.start()
        run_drbd_switchover(
            pair,
            guest_image,
            tree=str(CHECKOUT),
            work=lab / "engine",
            host_paths=paths,
            progress=print,
            run=run,
        )
    except BaseException:
        print(json.dumps(run.as_dict(), indent=1, default=str))
        # run_drbd_switchover reported the L1s' DRBD logs and the agents' events.
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    (leg,) = run.legs
    assert (leg.source, leg.target) == ("l1a", "l1b")
    # DRBD's roles swapped: the new primary promoted, the old one demoted, and the
    # connection stayed up (the old primary demoted before asking: nothing to fence).
    assert leg.switched and leg.promoted and leg.demoted, leg
    assert leg.drbd_conn_lost == 0, leg
    assert "disk_demote" in leg.spans_ms, leg.spans_ms
    assert leg.pause_ms is not None and leg.pause_ms > 0
    assert leg.wrote_after_switch
    # Re-protected: l1b protected again, DRBD connected and in sync both ways.
    assert leg.reprotected, leg
    assert all("cs:Connected" in s and "UpToDate/UpToDate" in s for s in leg.drbd.values())
    assert run.records_acked >= 30
    assert run.records_lost == 0
    assert leg.records_found >= run.records_acked
    assert run.ok
