"""The suite's arithmetic and report files, on made-up measurements."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kemari_suite.bench import report
from kemari_suite.bench.markers import Loop
from kemari_suite.bench.scenarios import Scenario

BASE = Scenario("base", "Base", "base", "unlimited", "file", published="Base")
K10 = Scenario("kemari-10g-shared", "K10", "kemari", "10g", "shared", tiebreaker="lease")
K1 = Scenario("kemari-1g-builtin", "K1", "kemari", "1g", "builtin")

LM_US = {"fork": 1000.0, "exec": 4000.0, "sh": 8000.0, "pagefault": 2.0, "ctxsw": 50.0}


def loop(
    bench: str, rnd: int, us_per_op: float, *, start: float, stopped: float = 0.0, ops: int = 100
) -> Loop:
    """A loop of ``ops`` operations lasting ``us_per_op`` each on the host clock, of
    which the fraction ``stopped`` the guest's clock did not see."""
    host_s = us_per_op * ops / 1e6
    return Loop(
        bench=bench,
        round=rnd,
        iters=ops,
        ops=ops,
        guest_ns=round(host_s * (1 - stopped) * 1e9),
        bytes=(4 << 20) if bench.startswith("iozone") else 0,
        t_start=start,
        t_end=start + host_s,
        wall_start=1000.0 + start,
        wall_end=1000.0 + start + host_s,
    )


def raw_for(sc: Scenario, factor: dict[str, float], stopped: float = 0.0) -> report.ScenarioRaw:
    loops, t = [], 0.0
    for rnd, wobble in ((2, 0.9), (3, 1.0), (4, 1.3)):
        for bench, us in (LM_US | {"iozone_wbuf": 20.0, "iozone_osync": 800.0}).items():
            lp = loop(bench, rnd, us * factor.get(bench, 1.0) * wobble, start=t, stopped=stopped)
            loops.append(lp)
            t = lp.t_end + 0.01
    return report.ScenarioRaw(scenario=sc, loops=loops, ready_after_s=[1.0], elapsed_s=30.0)


def ckpt(start_wall: float, pause_ms: float, dirty: int, trigger: str = "interval") -> dict:
    """A checkpoint record whose pause began at ``start_wall`` (as the primary writes it:
    t_wall after the transfer that followed the resume)."""
    return {
        "pause_ms": pause_ms,
        "transfer_ms": 5.0,
        "t_wall": start_wall + pause_ms / 1e3 + 0.005,
        "dirty_pages": dirty,
        "precopied_pages": 10,
        "trigger": trigger,
    }


def test_spread() -> None:
    s = report.spread([3.0, 1.0, 2.0, 10.0])
    assert s == {"n": 4, "median": 2.5, "min": 1.0, "max": 10.0, "rel_spread": pytest.approx(3.6)}
    assert report.spread([])["median"] is None


def test_pause_interval_and_overlap() -> None:
    cp = ckpt(100.0, 20.0, 5)
    s, e = report.pause_interval(cp)
    assert s == pytest.approx(100.0) and e == pytest.approx(100.02)
    cps = [ckpt(100.0, 20.0, 5), ckpt(100.1, 30.0, 5), ckpt(100.5, 10.0, 5)]
    paused, n = report.paused_within(cps, 100.01, 100.2)
    # 10 ms of the first (it began before the window), all 30 of the second.
    assert paused == pytest.approx(0.040)
    assert n == 1


def test_sync_stats_over_windows() -> None:
    cps = [ckpt(10.0 + 0.1 * i, 20.0, 5, "policy:interval") for i in range(20)]
    st = report.sync_stats(cps, [(9.99, 10.94), (11.45, 11.51)])
    assert st["checkpoints"] == 11  # 10.0 ... 10.9, and 11.5
    assert st["syncs_per_s"] == pytest.approx(11 / 1.01)
    # The last pause runs past the second window's end: only 10 ms of it count.
    assert st["paused_share"] == pytest.approx(0.21 / 1.01)
    assert st["pause_ms"]["p50"] == pytest.approx(20.0)
    assert st["triggers"] == {"policy:interval": 11}


def test_io_sync_points_interval_and_dirtied_pages() -> None:
    cps = [
        ckpt(9.0, 10.0, 999),  # before the window: only the reference for the interval
        ckpt(10.05, 10.0, 100),
        ckpt(10.10, 10.0, 200),
        ckpt(10.30, 10.0, 300),
        ckpt(12.0, 10.0, 999),  # after
    ]
    io = report.io_sync_points(cps, [(10.0, 10.5)])
    assert io["sync_points"] == 3
    assert [p[0] for p in io["points"]] == pytest.approx([1050.0, 50.0, 200.0])
    assert io["sync_interval_ms_mean"] == pytest.approx(1300.0 / 3)
    # Dirty at the stop plus pre-copied during the epoch.
    assert io["dirtied_pages_mean"] == pytest.approx(210.0)


def test_stopped_share_from_host_and_guest_clocks() -> None:
    loops = [loop("fork", 2, 1000.0, start=0.0, stopped=0.2), loop("fork", 3, 1000.0, start=1.0)]
    assert report.stopped_share(loops) == pytest.approx(0.1)


def summarize_three() -> dict:
    k10_factor = {"fork": 1.2, "exec": 1.3, "sh": 1.1, "pagefault": 1.25, "ctxsw": 1.5}
    base = raw_for(BASE, {})
    k10 = raw_for(K10, k10_factor | {"iozone_osync": 3.0}, stopped=0.2)
    k10.checkpoints = [ckpt(1000.0 + 0.1 * i, 20.0, 50) for i in range(400)]
    k1 = raw_for(K1, {})
    k1.loops = []
    k1.error = "pass 1: the primary agent exited"
    return report.summarize([base, k10, k1], meta={"quick": True, "rounds": 3})


def test_summarize_ratios_targets_and_decomposition() -> None:
    res = summarize_three()
    r = res["ratios"]["kemari-10g-shared"]
    assert list(r) == ["fork", "exec", "sh", "pagefault", "ctxsw"]
    assert r == pytest.approx(
        {"fork": 1.2, "exec": 1.3, "sh": 1.1, "pagefault": 1.25, "ctxsw": 1.5}
    )
    assert res["io_ratios"]["kemari-10g-shared"]["iozone_osync"] == pytest.approx(3.0)
    assert res["ratios_min"]["kemari-10g-shared"]["fork"] == pytest.approx(1.2)
    # A failed row is reported, never given ratios.
    assert "kemari-1g-builtin" not in res["ratios"]
    assert res["scenarios"]["kemari-1g-builtin"]["error"].startswith("pass 1")
    # Host time = guest time / (1 - stopped share): the pause factor is 1.25 everywhere.
    pf = res["pause_factor"]["kemari-10g-shared"]
    assert pf["fork"] == pytest.approx(1.25)
    assert res["guest_ratios"]["kemari-10g-shared"]["fork"] == pytest.approx(1.2 * 0.8)
    assert res["scenarios"]["kemari-10g-shared"]["stopped_share"] == pytest.approx(0.2)
    assert res["scenarios"]["base"]["stopped_share"] == pytest.approx(0.0)
    t = res["targets"]["kemari-10g-shared"]["benchmarks"]
    assert {b: v["met"] for b, v in t.items()} == {
        "fork": True,
        "exec": False,
        "sh": True,
        "pagefault": False,
        "ctxsw": False,
    }
    assert res["targets"]["kemari-10g-shared"]["all_met"] is False
    assert "kemari-1g-builtin" not in res["targets"]  # only 10g rows carry the target
    sync = res["scenarios"]["kemari-10g-shared"]["sync"]
    assert sync["syncs_per_s"] == pytest.approx(10.0, rel=0.1)
    assert sync["paused_share"] == pytest.approx(0.2, rel=0.1)


def test_published_ratios_match_the_issue() -> None:
    pr = report.published_ratios("Kemari(10GbE) + DRBD")
    assert {b: round(v, 2) for b, v in pr.items()} == report.TARGET_RATIOS


def test_explain_target_names_every_miss() -> None:
    res = summarize_three()
    lines = report.explain_target("kemari-10g-shared", res)
    assert len(lines) == 3
    assert lines[0].startswith("- exec: ratio 1.300, target below 1.19")
    assert "20.0%" in lines[0]  # the guest clock stood still a fifth of the time


def test_markdown_sets_measured_beside_published() -> None:
    res = summarize_three()
    md = report.render_markdown(res, {"ratios": "ratios.png"})
    assert "| published: Kemari(10GbE) + DRBD | 161.0 | 415.0 | 1388.0 | 1.3145 | 11.6 |" in md
    assert "| published: Kemari(10GbE) + DRBD | 1.41 | 1.19 | 1.16 | 1.02 | 1.41 |" in md
    assert "| measured: K10 | 1.20 | 1.30 | 1.10 | 1.25 | 1.50 |" in md
    assert "1.300 **not met**" in md
    # The pauses alone (20% of the time stopped) make any CPU-bound loop 1.25x slower:
    # the exec (1.19), sh (1.16) and P/F (1.02) targets lie below that.
    assert "can take less than 1.25x its Base time; the targets for exec, sh, P/F lie" in md
    assert "| measured: Base | 1000 (900-1300) |" in md
    assert "| published: O_SYNC | 10 | 80 |" in md
    assert "![overhead ratio per benchmark and scenario](ratios.png)" in md
    assert "the primary agent exited" in md


def test_write_report_files(tmp_path: Path) -> None:
    res = summarize_three()
    paths = report.write_report(res, tmp_path)
    for name in ("results.json", "report.md", "report.html", "ratios.png", "pauses.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["results"].read_text())
    assert data["ratios"]["kemari-10g-shared"]["fork"] == pytest.approx(1.2)
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and 'href="ratios.png"' in html
    assert "<td>measured: K10</td>" in html


def test_a_fast_guest_clock_keeps_its_pass_out_of_guest_figures() -> None:
    good = [loop("fork", 2, 1000.0, start=0.0, stopped=0.2)]
    # Pass 2: the guest's clock claims the loop took 4x longer than the host saw.
    bad = [replace(loop("fork", 2, 1000.0, start=5.0), pass_no=2)]
    bad = [replace(bad[0], guest_ns=bad[0].guest_ns * 4)]
    assert report.clock_fast_passes(good + bad) == {2}
    raw = report.ScenarioRaw(scenario=K10, loops=good + bad)
    row = report.summarize_scenario(raw)
    assert row["guest_clock_fast_passes"] == [2]
    fork = row["benchmarks"]["fork"]
    assert fork["host_us_per_op"]["n"] == 2  # host-timed loops all count
    assert fork["guest_us_per_op"]["n"] == 1
    assert fork["stopped_share"] == pytest.approx(0.2)
