"""The cycle of a host loss under Kemari on DRBD 8.4 in two L1s: l1a loses power, l1b
resumes the guest; l1a comes back from its own disk as the standby (DRBD resyncs it),
l1b is protected again; then l1b loses power and the guest comes back in l1a with every
record acknowledged in either run (``kemari klab protect-demo --reprotect``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.reprotectdemo import ReprotectRun, run_reprotect_demo
from kemari_suite.vm.image import GuestImage

from .conftest import CHECKOUT, engine_pair, needs_lab, print_consoles

# Three L1 boots and two failovers (about 15 minutes on a loaded machine): `make e2e`.
pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(2400)]


def test_drbd_failover_reprotect_and_failover_back(
    klab_nested_image: HostImage,
    guest_image: GuestImage,
    klab_dirs: tuple[Path, PathsConfig],
) -> None:
    lab, paths = klab_dirs
    pair = engine_pair(klab_nested_image, klab_dirs, 2)
    run = ReprotectRun()
    try:
        pair.start()
        run_reprotect_demo(
            pair,
            guest_image,
            tree=str(CHECKOUT),
            work=lab / "engine",
            host_paths=paths,
            disk_backend="drbd",
            progress=print,
            run=run,
        )
    except BaseException:
        print(json.dumps(run.as_dict(), indent=1, default=str))
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    print(json.dumps(run.as_dict(), indent=1))
    first, second = run.first, run.second
    # l1a lost power: l1b promoted (its fence-peer handler granted) and resumed.
    assert first.resumed and first.promoted and first.records_lost == 0, first
    # l1a back as the standby, DRBD resynced from l1b, both UpToDate.
    assert run.reprotected, run.drbd
    assert run.drbd is not None
    assert all("cs:Connected" in s and "UpToDate/UpToDate" in s for s in run.drbd.values())
    # l1b lost power: l1a promoted (its handler, with l1a's node id, granted) and
    # resumed with every record of both runs.
    assert second.resumed and second.promoted, second
    assert second.fence_peer_exits is not None and 7 in second.fence_peer_exits
    assert second.records_acked > first.records_found
    assert second.records_found >= second.records_acked
    assert run.records_lost == 0 and second.wrote_after_resume
    assert run.ok
