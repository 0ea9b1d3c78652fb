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


def _devstate_sizes(pair: LabPair) -> list[int]:
    import json

    return [
        json.loads(line)["devstate_bytes"]
        for f in pair.run_dir("primary").glob("artifacts/*-primary-*/checkpoints.jsonl")
        for line in f.read_text().splitlines()
    ]


def test_video_memory_travels_in_every_capture(lab_factory, base_config: KemariConfig) -> None:
    """Standard VGA keeps 16 MiB of video RAM outside the shared RAM file: every
    device-state capture is a migration that walks all of it (each of its 4096 pages
    costs at least a page header, a non-zero page its 4 KiB), as docs/sizing.md says;
    failover still works."""
    sizes: dict[str, list[int]] = {}
    captures: dict[str, str] = {}
    for display in ("none", "std"):
        lay = lab_factory()
        pair = LabPair(lay, base_config, PairOptions(display=display))
        try:
            pair.start()
            pair.wait_state("primary", {"protected"}, 180)
            pair.wait_counter(120)
            pair.settle(5)
            sizes[display] = _devstate_sizes(pair)
            capture = pair.status("primary")["devstate_capture"]
            captures[display] = capture["method"]
            if display == "std":
                assert "vga.vram" in capture["why"], capture
            if display == "std":
                cmdline = (pair.run_dir("primary") / "kemari-guest" / "cmdline").read_text()
                assert "-vga std" in cmdline
                pair.kill("primary")
                st = pair.wait_state("secondary", {"active"}, 60)
                assert pair.wait_counter(60) >= st["failover"]["probes"]["counter"]
        finally:
            pair.stop()
    # Without video memory the device sections alone are saved; with it, every capture
    # is a migration (the guest writes vga.vram).
    assert captures == {"none": "xen-save-devices-state", "std": "migrate"}, captures
    plain, vga = min(sizes["none"]), min(sizes["std"])
    print(f"device state per capture: display none {plain} B, std {vga} B")
    assert vga >= plain + 4096 * 8, (plain, vga)
