"""A real DRBD split brain in two L1 hosts (DRBD 8.4.11): the engine's DRBD backend,
attached in one of them (python3 from the shared checkout), sees it in events2, records
it, refuses to promote (a second backend, a failover's, too), alerts through the hook,
and nothing is discarded: each side still holds its own write.

About two minutes here (image cached); see kemari_suite/klab/splitbrain.py for the steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.disk.drbdwatch import RUNBOOK
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.pair import L1Pair, PairSpec
from kemari_suite.klab.splitbrain import run_split_brain

from .conftest import lab_id, needs_lab, print_consoles, slot

pytestmark = [*needs_lab, pytest.mark.slow, pytest.mark.timeout(1200)]

CHECKOUT = Path(__file__).resolve().parents[2]


def test_a_real_split_brain_is_seen_refused_and_alerted(
    klab_nested_image: HostImage, klab_dirs: tuple[Path, PathsConfig]
) -> None:
    lab, paths = klab_dirs
    pair = L1Pair(
        PairSpec(lab_id(2), slot=slot(2), data_disk_mib=32, share=str(CHECKOUT)),
        klab_nested_image,
        lab_dir=lab,
        run_root=paths.run_dir,
        shm_dir=paths.shm_dir,
    )
    try:
        pair.start()
        run = run_split_brain(pair, str(CHECKOUT), progress=print)
    except BaseException:
        print_consoles(pair)
        raise
    finally:
        pair.stop()
    report = {k: v for k, v in run.as_dict().items() if k != "events"}
    print(json.dumps(report, indent=1))
    for host, text in run.events.items():
        print(f"--- {host} events2\n{text}")
    b = run.backend
    assert "error" not in b, b.get("error")
    assert run.module_version.startswith("8.4") and b["dialect"] == "8.4"
    # Seen from events2: recorded with when, unresolved (the split-brain helper ran).
    sb = b["split_brain"]
    assert sb is not None and sb["unresolved"] and sb["resource"] == "r0"
    assert sb["peer"] == "l1b" or sb["peer"] == "peer"
    assert sb["timestamp"] and sb["detected_at"] > 0
    # Both L1s' own events2 showed DRBD's helpers.
    for text in run.events.values():
        assert "helper:initial-split-brain" in text and "helper:split-brain" in text
    # Truthful status, refused promotion (ours: DRBD would have let l1a promote).
    assert b["status"]["up_to_date"] is False and b["status"]["split_brain"] == sb
    assert b["refused_type"] == "SplitBrainError"
    assert "split brain" in b["refused"] and RUNBOOK in b["refused"]
    assert "split brain" in b["later_refused"]
    assert "ro:Secondary/" in run.states[0]  # DRBD was never asked to promote l1a
    # One alert, through the real hook.
    assert [a["kind"] for a in b["alerts"]] == ["split-brain"]
    assert b["alerts"][0]["details"]["runbook"] == RUNBOOK
    # close() stopped the watch.
    assert b["threads_after_close"] == []
    # Nothing discarded: both StandAlone, each backing disk holds its own write.
    assert all("cs:StandAlone" in s for s in run.states)
    assert run.written[0] != run.written[1]
    assert run.found == run.written
    assert run.ok
