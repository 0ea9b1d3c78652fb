"""The sizing benchmark: fits, guidance and report on synthetic input; one tiny real run;
the helpers through which the benchmarks drive the product's stopped window."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kemari_suite.bench import memsync, sizing
from kemari_suite.checkpoint.tracker import (
    CompareTracker,
    DirtyTracker,
    SoftDirtyTracker,
    allocate_index,
    allocate_pages,
)
from kemari_suite.checkpoint.window import StoppedWindow, WindowResult
from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.vm.guestram import PAGE_SIZE


def _case(key: str, frac: float, pages: int, t2: float, stage: float) -> dict[str, Any]:
    return {
        "case": key,
        "pattern": "random",
        "dirty_fraction": frac,
        "dirty_pages": pages,
        "samples": 5,
        "scan_t1_ms": {"p50": t2 * 1.5, "p99": t2 * 2},
        "scan_t2_ms": {"min": t2 * 0.5, "p50": t2, "p99": t2 * 1.2},
        "stage_ms": {"p50": stage, "p99": stage * 1.1},
        "scan_t2_plus_stage_ms_p50": t2 + stage,
    }


def synthetic() -> dict[str, Any]:
    """Scan time exactly 60 ms/GiB (clean) and 120 ms/GiB (1%); stage 0.5 ms per 1000
    pages; a VM pause of 10 + 70 ms/GiB; primary memory 3 MiB per MiB + 2 MiB."""
    scan, prim, sec, vm = [], [], [], []
    for mib in (256, 512, 1024):
        gib = mib / 1024
        pages = mib * 256 // 100
        scan.append(
            {
                "memory_mib": mib,
                "n_pages": mib * 256,
                "cases": [
                    _case("clean", 0.0, 0, 60 * gib, 0.0),
                    _case("1% random", 0.01, pages, 120 * gib, 0.5 * pages / 1000),
                ],
            }
        )
        prim.append(
            {
                "memory_mib": mib,
                "agent_anon_mib": 3 * mib + 2,
                "agent_vmrss_mib": 4 * mib + 2,
                "agent_shmem_mib": float(mib),
                "anon_per_ram": (3 * mib + 2) / mib,
            }
        )
        sec.append(
            {
                "memory_mib": mib,
                "replica_file_mib": float(mib),
                "undo": [
                    {
                        "dirty_fraction": 0.01,
                        "dirty_pages": pages,
                        "held_mib": 0.01 * mib,
                        "anon_mib": 0.01 * mib,
                    }
                ],
            }
        )
        vm.append(
            {
                "memory_mib": mib,
                "total_ms_min": 8 + 50 * gib,
                "total_ms_p50": 10 + 70 * gib,
                "total_ms_p99": 20 + 70 * gib,
                "fixed_ms_p50": 10.0,
                "parts_ms_p50": {
                    "stop": 1.0,
                    "devstate": 4.0,
                    "scan": 65 * gib,
                    "stage": 1.0,
                    "cont": 5.0,
                },
                "dirty_pages_p50": 4000.0,
                "boot_s": 3.0,
                "samples": 10,
            }
        )
    vm.append({"memory_mib": 2048, "skipped": "VM time budget spent (301 s)"})
    res: dict[str, Any] = {
        "machine": {
            "cpu": "Test CPU 9000",
            "cpus": 2,
            "kernel": "6.1.0",
            "date": "2026-01-02T03:04:05Z",
            "loadavg_start": [0.5, 0.4, 0.3],
            "loadavg_end": [0.6, 0.5, 0.4],
        },
        "soft_dirty": {"available": False, "reason": "CONFIG_MEM_SOFT_DIRTY is not set"},
        "scan": scan,
        "vm": vm,
        "memory": {"primary": prim, "secondary": sec},
    }
    res["fits"] = sizing.compute_fits(res)
    res["guidance"] = sizing.guidance(res, 100.0)
    return res


# --------------------------------------------------------------------------- linear fit


def test_linear_fit_recovers_an_exact_line() -> None:
    fit = sizing.linear_fit([0.125, 0.5, 1.0], [3 + 60 * 0.125, 3 + 60 * 0.5, 3 + 60 * 1.0])
    assert fit is not None
    assert fit["slope"] == pytest.approx(60.0)
    assert fit["intercept"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["n"] == 3


def test_linear_fit_r2_drops_with_scatter() -> None:
    fit = sizing.linear_fit([1, 2, 3, 4], [1.0, 5.0, 2.0, 6.0])
    assert fit is not None
    assert 0 < fit["r2"] < 0.9


def test_linear_fit_needs_two_distinct_x() -> None:
    assert sizing.linear_fit([1.0], [2.0]) is None
    assert sizing.linear_fit([1.0, 1.0], [2.0, 3.0]) is None
    with pytest.raises(ValueError):
        sizing.linear_fit([1.0, 2.0], [1.0])


def test_gib_where_pause_reaches() -> None:
    fit = {"slope": 60.0, "intercept": 0.0, "r2": 1.0, "n": 2}
    # 10 ms fixed + 60 ms/GiB reaches 100 ms at 1.5 GiB.
    assert sizing.gib_where_pause_reaches(fit, 10.0, 100.0) == pytest.approx(1.5)
    assert sizing.gib_where_pause_reaches(None, 10.0, 100.0) is None
    assert sizing.gib_where_pause_reaches({**fit, "slope": 0.0}, 10.0, 100.0) is None
    # Already over the limit with no RAM at all: 0, never negative.
    assert sizing.gib_where_pause_reaches(fit, 150.0, 100.0) == 0.0


def test_read_status_parses_kib_fields() -> None:
    text = "Name:\tpython\nVmRSS:\t  2048 kB\nRssAnon:\t  1024 kB\nRssShmem:\t 512 kB\n"
    st = sizing.read_status(text)
    assert st == {"VmRSS": 2048, "RssAnon": 1024, "RssShmem": 512}
    d = sizing.status_delta_mib(st, {**st, "RssAnon": 1024 + 3072})
    assert d["RssAnon"] == pytest.approx(3.0)
    assert d["VmRSS"] == 0


# --------------------------------------------------------------------------- fits, guidance


def test_compute_fits_on_synthetic_points() -> None:
    fits = synthetic()["fits"]
    assert fits["scan_t2_ms_per_gib[clean]"]["slope"] == pytest.approx(60.0)
    assert fits["scan_t2_ms_per_gib[1% random]"]["slope"] == pytest.approx(120.0)
    assert fits["scan_t1_ms_per_gib[clean]"]["slope"] == pytest.approx(90.0)
    assert fits["stage_ms_per_1000_pages"]["slope"] == pytest.approx(0.5)
    assert fits["vm_pause_ms_per_gib"]["slope"] == pytest.approx(70.0)
    assert fits["vm_pause_ms_per_gib"]["intercept"] == pytest.approx(10.0)
    assert fits["vm_pause_min_ms_per_gib"]["slope"] == pytest.approx(50.0)
    assert fits["scan_t2_min_ms_per_gib[clean]"]["slope"] == pytest.approx(30.0)
    # The skipped 2048 MiB VM is not a point.
    assert fits["vm_pause_ms_per_gib"]["n"] == 3
    assert fits["primary_anon_mib_per_gib"]["slope"] == pytest.approx(3072.0)
    assert fits["primary_anon_mib_per_gib"]["intercept"] == pytest.approx(2.0)
    assert fits["secondary_replica_mib_per_gib"]["slope"] == pytest.approx(1024.0)
    assert fits["secondary_undo_mib_per_gib[1%]"]["slope"] == pytest.approx(10.24)


def test_guidance_uses_the_vm_fixed_part() -> None:
    g = synthetic()["guidance"]
    assert g["fixed_ms"] == pytest.approx(10.0)
    assert g["from_vm"] is True
    # 10 + 60 g = 100 -> 1.5 GiB; 10 + 60 g = 50 -> 2/3 GiB.
    assert g["clean"]["gib_at_interval"] == pytest.approx(1.5)
    assert g["clean"]["gib_at_half_interval"] == pytest.approx(40 / 60)
    assert g["clean"]["pause_ms_at"]["2"] == pytest.approx(130.0)
    # The VM line carries its own intercept: 10 + 70 g = 100 -> 9/7 GiB.
    assert g["vm"]["gib_at_interval"] == pytest.approx(90 / 70)


def test_guidance_without_vm_has_no_fixed_part() -> None:
    res = synthetic()
    res["vm"] = []
    res["fits"] = sizing.compute_fits(res)
    g = sizing.guidance(res, 100.0)
    assert g["fixed_ms"] == 0.0
    assert g["from_vm"] is False
    assert g["clean"]["gib_at_interval"] == pytest.approx(100 / 60)
    assert g["vm"]["gib_at_interval"] is None


# --------------------------------------------------------------------------- report


def test_format_report_holds_command_machine_and_figures() -> None:
    md = sizing.format_report(synthetic(), "kemari bench sizing --samples 5")
    assert "Command: `kemari bench sizing --samples 5`" in md
    assert "Test CPU 9000 (2 CPUs)" in md
    assert "2026-01-02T03:04:05Z" in md
    assert "NOT available (CONFIG_MEM_SOFT_DIRTY is not set)" in md
    assert "60.0 ms/GiB, intercept 0.0 ms (R² 1.000, 3 points)" in md
    assert "120.0 ms/GiB" in md
    assert "3072.0 MiB/GiB, intercept 2.0 MiB" in md
    assert "0.5 ms per 1000 pages, intercept 0.0 ms" in md
    assert "| 2048 | not run: VM time budget spent (301 s) |" in md
    assert "-0.0" not in md
    assert "| 1024 | 58.0 | 80.0 | 90.0 |" in md  # VM pause min / p50 / p99 at 1 GiB
    # Guidance row for clean RAM: half interval at 0.67 GiB, full at 1.50 GiB.
    assert "| clean RAM | 0.67 | 1.50 |" in md


def test_format_report_lists_the_capture_methods() -> None:
    res = synthetic()
    base = res["vm"][0]  # 256 MiB
    base["devstate_by_method"] = {
        "migrate": {"samples": 6, "ms_p50": 5.0, "bytes_p50": 320000.0, "pause_ms_p50": 12.0},
        "xen-save-devices-state": {
            "samples": 14, "ms_p50": 1.5, "bytes_p50": 13000.0, "pause_ms_p50": 8.0,
        },
    }  # fmt: skip
    md = sizing.format_report(res, "x")
    assert "| 256 | migrate | 6 | 5.0 | 320000 | 12.0 |" in md
    assert "| 256 | xen-save-devices-state | 14 | 1.5 | 13000 | 8.0 |" in md


def test_devstate_by_method_splits_the_rows() -> None:
    rows = [
        {"capture": 5.0, "devstate_bytes": 300.0, "total": 10.0},
        {"capture": 1.0, "devstate_bytes": 10.0, "total": 6.0},
        {"capture": 2.0, "devstate_bytes": 12.0, "total": 8.0},
    ]
    got = sizing.devstate_by_method(rows, ["migrate", "save", "save"])
    assert list(got) == ["migrate", "save"]
    assert got["migrate"]["samples"] == 1 and got["migrate"]["bytes_p50"] == 300.0
    assert got["save"]["samples"] == 2 and 1.0 <= got["save"]["ms_p50"] <= 2.0


def test_format_report_without_fits_says_so() -> None:
    res = synthetic()
    res["scan"] = res["scan"][:1]
    res["memory"] = {"primary": res["memory"]["primary"][:1], "secondary": []}
    res["vm"] = []
    res["fits"] = sizing.compute_fits(res)
    res["guidance"] = sizing.guidance(res, 100.0)
    md = sizing.format_report(res, "x")
    assert "- (fewer than 2 sizes)" in md
    assert "no VM in this run" in md
    assert "60.0 ms/GiB" not in md


def test_write_results_writes_json_and_markdown(tmp_path: Path) -> None:
    res = synthetic()
    md = sizing.write_results(res, tmp_path / "out", "cmd --x")
    assert md == tmp_path / "out" / "sizing.md"
    data = json.loads((tmp_path / "out" / "sizing.json").read_text())
    assert data["command"] == "cmd --x"
    assert data["fits"]["scan_t2_ms_per_gib[clean]"]["slope"] == pytest.approx(60.0)
    assert "cmd --x" in md.read_text()


# --------------------------------------------------------------------------- a tiny real run


def test_tiny_real_run(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    cfg = KemariConfig(
        paths=PathsConfig(run_dir=tmp_path / "run", shm_dir=shm / f"kemari-test-{tmp_path.name}")
    )
    try:
        res = sizing.run_sizing(
            cfg, sizes_mib=(64,), samples=2, vm_sizes_mib=(), tracker_sizes_mib=()
        )
    finally:
        import shutil

        shutil.rmtree(cfg.paths.shm_dir, ignore_errors=True)
    assert res["vm"] == []
    assert res["machine"]["cpus"] >= 1 and res["machine"]["date"]
    (scan,) = res["scan"]
    assert scan["memory_mib"] == 64 and scan["n_pages"] == 64 * 256
    assert [c["case"] for c in scan["cases"]] == [
        sizing.case_key(f, p) for f, p in sizing.SCAN_CASES
    ]
    for c in scan["cases"]:
        assert c["dirty_pages"] == round(64 * 256 * c["dirty_fraction"])
        assert c["scan_t1_ms"]["p50"] > 0 and c["scan_t2_ms"]["p50"] > 0
        assert c["stage_ms"]["p50"] > 0
        assert c["scan_t2_ms"]["p99"] >= c["scan_t2_ms"]["p50"] >= c["scan_t2_ms"]["min"] > 0
    (prim,) = res["memory"]["primary"]
    # Shadow + staging + previous: about 3 x 64 MiB of anonymous memory (64 MiB: small
    # allocations may be served from memory the allocator already holds).
    assert 2.5 * 64 < prim["agent_anon_mib"] < 3.5 * 64
    assert prim["map_ram_shmem_mib"] > 0
    (sec,) = res["memory"]["secondary"]
    assert sec["replica_file_mib"] == pytest.approx(64.0)
    assert all(u["held_mib"] > 0 for u in sec["undo"])
    # One size: no line can be fitted.
    assert res["fits"]["scan_t2_ms_per_gib[clean]"] is None
    md = sizing.format_report(res, "test")
    assert "| 64 | clean RAM | 0 |" in md


def test_merge_scans_pools_raw_samples() -> None:
    def one(values: list[float]) -> dict[str, Any]:
        case = {
            "case": "clean",
            "pattern": "random",
            "dirty_fraction": 0.0,
            "dirty_pages": 0,
            "raw_s": {"scan_t1": values, "scan_t2": values, "stage": [0.001] * len(values)},
        }
        return {
            "memory_mib": 64,
            "n_pages": 64 * 256,
            "loadavg_1min": [1.0],
            "cases": [sizing._case_stats(case)],
        }

    merged = sizing.merge_scans(one([0.010, 0.010, 0.010]), one([0.020, 0.020, 0.020, 0.020]))
    (c,) = merged["cases"]
    assert c["samples"] == 7
    assert c["scan_t2_ms"]["p50"] == pytest.approx(20.0)
    assert c["scan_t2_plus_stage_ms_p50"] == pytest.approx(21.0)
    assert merged["loadavg_1min"] == [1.0, 1.0]
    with pytest.raises(ValueError):
        sizing.merge_scans(one([0.01]), {**one([0.01]), "memory_mib": 128})


# --------------------------------------------------------------------------- the window


class _VM:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.log.append(cmd)
        return {}


class _Capturer:
    async def capture(self) -> bytes:
        return b"devstate"


class _Pagemap:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def read(self, out: np.ndarray) -> None:
        out[:] = 0

    def clear(self) -> None:
        self.log.append("clear_refs")

    def close(self) -> None:
        pass


def _window(tracker: DirtyTracker, log: list[str], ram: np.ndarray) -> StoppedWindow:
    n = tracker.n_pages
    return StoppedWindow(
        _VM(log),
        _Capturer(),
        tracker,
        ram,
        staging=allocate_pages(n),
        index=allocate_index(n),
        scan_threads=1,
    )


@pytest.mark.parametrize("kind", ["compare", "soft-dirty"])
def test_initial_sync_stops_the_guest_only_when_the_tracker_says_so(kind: str) -> None:
    log: list[str] = []
    ram = np.random.default_rng(0).integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)
    tracker: DirtyTracker = (
        CompareTracker(16) if kind == "compare" else SoftDirtyTracker(16, source=_Pagemap(log))
    )
    window = _window(tracker, log, ram)
    try:
        asyncio.run(memsync.initial_sync(window))
        assert log == (["stop", "clear_refs", "cont"] if kind == "soft-dirty" else [])
        assert np.array_equal(tracker.baseline(), ram)
        # The baseline came from the staging buffer, as the engine takes it.
        assert np.array_equal(window.staging, ram)
        log.clear()
        res = asyncio.run(window.run(resume=True))
        assert res.dirty_pages == 0 and log[0] == "stop" and log[-1] == "cont"
    finally:
        window.close()
        tracker.close()


def _result(**ms: float) -> WindowResult:
    empty = np.zeros(0, dtype=np.int64)
    return WindowResult(
        devstate=b"",
        idx=empty,
        staged=np.zeros((0, PAGE_SIZE), dtype=np.uint8),
        t_start=0.0,
        t_end=0.0,
        t_start_wall=0.0,
        resumed=True,
        **ms,
    )


def test_window_row_takes_the_window_timings() -> None:
    res = _result(stop_ms=1.0, devstate_ms=4.0, scan_ms=10.0, stage_ms=2.0, pause_ms=20.0)
    row = memsync.window_row(res, overlapped=False)
    assert row == {
        "total": 20.0,
        "stop": 1.0,
        "devstate": 4.0,
        "scan": 10.0,
        "stage": 2.0,
        "cont": 3.0,
    }
    # Beside the capture, the scan's time is inside devstate: not subtracted twice.
    res = _result(stop_ms=1.0, devstate_ms=10.0, scan_ms=9.0, stage_ms=2.0, pause_ms=16.0)
    assert memsync.window_row(res, overlapped=True)["cont"] == pytest.approx(3.0)
    assert set(memsync.window_row(res, overlapped=True)) == {"total", *memsync.FLOOR_PARTS}


def test_trackers_summary_has_the_json_shape_and_targets() -> None:
    from kemari_suite.bench import trackers

    def row(name: str, mib: int, p50: float, extra: float) -> dict[str, object]:
        return {
            "tracker": name,
            "reason": f"{name} works",
            "memory_mib": mib,
            "pause_ms_p50": p50,
            "pause_ms_p99": p50 * 2,
            "scan_ms_p50": p50 / 4,
            "stage_ms_p50": 1.0,
            "dirty_pages_p50": 4000.0,
            "primary_extra_mib": extra,
            "primary_extra_per_guest": extra / mib,
            "accel": "tcg",
        }

    res = {
        "available": ["uffd-wp", "compare"],
        "unavailable": {"soft-dirty": "no bit 55"},
        "samples": 5,
        "rows": [
            row("uffd-wp", 128, 5.0, 16.0),
            {**row("uffd-wp", 128, 6.0, 17.0), "variant": "stage_during_capture true"},
            row("compare", 128, 25.0, 384.0),
            row("uffd-wp", 4096, 9.0, 512.0),
            row("compare", 4096, 350.0, 12288.0),
            {"tracker": "soft-dirty", "memory_mib": 128, "error": "boom"},
        ],
    }
    s = trackers.summary(res)
    assert s["tracker"] == "uffd-wp" and s["reason"] == "uffd-wp works"
    assert s["pause_ms_p50"] == {"128": 5.0, "4096": 9.0}
    assert s["pause_ms_p99"] == {"128": 10.0, "4096": 18.0}
    # (512 - 16) MiB over (4 - 0.125) GiB
    assert s["primary_extra_mib_per_gib"] == pytest.approx(496 / 3.875)
    assert s["compare"]["pause_ms_p50"] == {"128": 25.0, "4096": 350.0}
    assert s["errors"][0]["tracker"] == "soft-dirty"
    text = "\n".join(trackers.targets(res))
    assert "pause p50 <= 6 ms at 128 MiB: met" in text
    assert "pause p50 <= 8 ms at 4 GiB: NOT met" in text
    assert "pause grows <= 1.5x from 128 MiB to 4 GiB: NOT met (1.80x)" in text
    assert "primary extra memory <= 0.25x guest RAM: met" in text
    section = trackers.format_section(res)
    assert "| uffd-wp | 4096 | 9.0 | 18.0 |" in section and "failed: boom" in section
    # The variant is its own row, compared with the row before it, never in the summary.
    assert "| uffd-wp (stage_during_capture true) | 128 | 6.0 |" in section
    assert "pause p50 1.20x (6.0 against 5.0 ms)" in section


def test_tracker_variants_flip_one_setting_each() -> None:
    from kemari_suite.bench import trackers
    from kemari_suite.config import KemariConfig, with_overrides

    base = KemariConfig()
    assert trackers.variants(base) == [
        ("stage_during_capture", False),
        ("pipelining", False),
        ("precopy_period_ms", 0),
    ]
    off = with_overrides(base, replication={"pipelining": False})
    assert trackers.variants(off) == [("stage_during_capture", False), ("pipelining", True)]
    halfway = with_overrides(base, replication={"precopy_period_ms": 0})
    assert ("precopy_period_ms", 25) in trackers.variants(halfway)
    # Above the size "auto" stages beside the capture at, that staging forced on.
    assert trackers.large_variants(base, 4096) == [("stage_during_capture", True)]
    assert trackers.large_variants(base, 1024) == []
    forced = with_overrides(base, replication={"stage_during_capture": True})
    assert trackers.large_variants(forced, 4096) == []


def test_precopy_labels_and_the_summary_names_the_default() -> None:
    from kemari_suite.bench import trackers

    assert trackers.precopy_label({}) == "-"
    assert trackers.precopy_label({"precopy": False}) == "off"
    assert trackers.precopy_label({"precopy": True, "precopy_period_ms": 0}) == "half-way"
    assert trackers.precopy_label({"precopy": True, "precopy_period_ms": 25}) == "every 25 ms"
    common = {"memory_mib": 128, "pause_ms_p50": 5.0, "pause_ms_p99": 9.0, "scan_ms_p50": 1.0}
    res = {
        "available": ["uffd-wp", "compare"],
        "unavailable": {},
        "samples": 3,
        "rows": [
            {**common, "tracker": "uffd-wp", "primary_extra_mib": 16.0, "precopy": True,
             "precopy_period_ms": 0},
            {**common, "tracker": "uffd-wp", "primary_extra_mib": 16.0, "precopy": False,
             "variant": "pipelining false"},
            {**common, "tracker": "compare", "primary_extra_mib": 384.0, "precopy": False},
        ],
    }  # fmt: skip
    assert trackers.summary(res)["precopy"] == "half-way"
