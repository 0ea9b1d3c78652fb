"""The benchmarks' device-state warm-up: its bookkeeping, verdicts and report lines, and
the ktouch probe program. No QEMU; no timed assertions."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.bench import report, touchprobe, warmup
from kemari_suite.bench.scenarios import Scenario
from kemari_suite.bench.warmup import WarmupCheck, WarmupParams, WarmupStatus
from kemari_suite.config import ImageConfig, KemariConfig, PathsConfig
from kemari_suite.vm import guestmem
from kemari_suite.vm.image import GuestImage

BASE = Scenario("base", "Base", "base", "unlimited", "file", published="Base")
K10 = Scenario("kemari-10g-shared", "K10", "kemari", "10g", "shared", tiebreaker="lease")


# --------------------------------------------------------------------------- parameters


def test_probe_outlives_the_hosts_windows() -> None:
    p = WarmupParams(settle_s=1, cold_s=2, capture_s=6, gap_s=0.5, warm_s=2, margin_s=5)
    assert p.probe_s == pytest.approx(16.5)
    assert p.guest_command() == "ktouch -m 16 -t 16.5"
    assert p.then("kbench -r 0") == "ktouch -m 16 -t 16.5; kbench -r 0"
    host_windows = p.settle_s + p.cold_s + p.capture_s + p.gap_s + p.warm_s
    assert p.probe_s - host_windows == p.margin_s > 0


def test_default_captures_at_a_sync_points_rhythm() -> None:
    d = warmup.DEFAULT
    # At least a few dozen captures (the trap lifted after about five here).
    assert d.capture_s / d.interval_s >= 30
    assert d.min_ratio > 1


# --------------------------------------------------------------------------- verdicts


def check(**kw: Any) -> WarmupCheck:
    return WarmupCheck(**({"accel": "tcg", "captures": 60, "capture_s": 6.0} | kw))


def test_took_hold_when_warm_is_at_least_min_ratio_times_cold() -> None:
    c = check(cold_rate=6_300_000.0, warm_rate=126_000_000.0)
    assert c.ratio == pytest.approx(20.0)
    assert c.status is WarmupStatus.HELD and c.ok
    assert c.describe().startswith("took hold: cold 6,300,000 -> warm 126,000,000")
    assert "(20.0x, threshold 2x)" in c.describe() and "60 captures in 6.0 s" in c.describe()
    edge = check(cold_rate=100.0, warm_rate=200.0)
    assert edge.status is WarmupStatus.HELD


def test_not_held_below_the_threshold() -> None:
    c = check(cold_rate=100.0, warm_rate=150.0)
    assert c.status is WarmupStatus.NOT_HELD and not c.ok
    assert c.describe().startswith("DID NOT TAKE HOLD")
    stricter = check(cold_rate=100.0, warm_rate=250.0, min_ratio=3.0)
    assert stricter.status is WarmupStatus.NOT_HELD


@pytest.mark.parametrize(("cold", "warm"), [(None, 5.0), (5.0, None), (None, None), (0.0, 5.0)])
def test_not_measured_without_both_rates(cold: float | None, warm: float | None) -> None:
    c = check(cold_rate=cold, warm_rate=warm, error="ktouch never appeared in guest RAM")
    assert c.ratio is None
    assert c.status is WarmupStatus.NOT_MEASURED and not c.ok
    assert "NOT MEASURED (ktouch never appeared" in c.describe()


def test_kvm_is_not_checked_but_recorded() -> None:
    c = check(accel="kvm", cold_rate=100.0, warm_rate=100.0)
    assert c.status is WarmupStatus.NOT_APPLICABLE and c.ok
    assert c.describe().startswith("not checked (kvm")


def test_to_dict_is_the_results_json_form() -> None:
    d = check(cold_rate=10.0, warm_rate=40.0).to_dict()
    assert d["ratio"] == 4.0 and d["status"] == "held" and d["ok"] is True
    assert d["cold_rate"] == 10.0 and d["captures"] == 60 and d["probe"] == "ktouch"
    assert warmup.describe(d) == check(cold_rate=10.0, warm_rate=40.0).describe()


def test_summarize_and_alarm() -> None:
    good = [check(cold_rate=10.0, warm_rate=200.0).to_dict() for _ in range(3)]
    s = warmup.summarize(good)
    assert s["ok"] and s["checks"] == 3 and s["problems"] == []
    assert s["ratio_median"] == 20.0 and s["cold_rate_median"] == 10.0 and s["min_ratio"] == 2.0
    assert warmup.alarm(s) is None

    bad = [*good, check(cold_rate=10.0, warm_rate=11.0).to_dict()]
    s = warmup.summarize(bad)
    assert not s["ok"] and len(s["problems"]) == 1
    loud = warmup.alarm(s)
    assert loud is not None and loud.startswith("WARNING: the Base warm-up did not take hold")
    assert "DID NOT TAKE HOLD" in loud and "suspect" in loud

    none = warmup.summarize([])
    assert not none["ok"] and none["ratio_median"] is None
    assert "no unprotected baseline" in (warmup.alarm(none, "baseline") or "")


# --------------------------------------------------------------------------- the report


def _raws(*checks: WarmupCheck) -> list[report.ScenarioRaw]:
    base = report.ScenarioRaw(scenario=BASE, ready_after_s=[1.0], elapsed_s=10.0)
    for c in checks:
        base.merge(report.ScenarioRaw(scenario=BASE, warmup=[c.to_dict()]))
    return [base, report.ScenarioRaw(scenario=K10, ready_after_s=[2.0], elapsed_s=10.0)]


def test_results_and_run_conditions_carry_the_warm_up() -> None:
    c1 = check(cold_rate=6_000_000.0, warm_rate=120_000_000.0)
    c2 = check(cold_rate=6_000_000.0, warm_rate=60_000_000.0)
    res = report.summarize(_raws(c1, c2), meta={"warmup": dataclasses.asdict(warmup.DEFAULT)})
    assert res["warmup"]["ok"] and res["warmup"]["checks"] == 2
    assert res["warmup"]["ratio_median"] == pytest.approx(15.0)
    assert [c["ratio"] for c in res["scenarios"]["base"]["warmup"]] == [20.0, 10.0]
    md = report.render_markdown(res, {})
    assert "WARNING" not in md
    assert "warm-up: ktouch loops/s cold -> warm (ratio)" in md
    assert "| 6000000 -> 120000000 (20.0x), 6000000 -> 60000000 (10.0x) |" in md
    assert "captured at every sync point |" in md
    assert "every Base boot's warm-up took hold (2 checked" in md


def test_report_opens_with_a_warning_when_it_did_not_take_hold() -> None:
    res = report.summarize(_raws(check(cold_rate=100.0, warm_rate=110.0)))
    assert not res["warmup"]["ok"]
    md = report.render_markdown(res, {})
    first = md.split("\n\n")[1]
    assert first.startswith("**WARNING: the Base warm-up did not take hold")
    assert "**100 -> 110 (1.1x) NOT-HELD**" in md
    assert "**not every** Base boot" in md


def test_a_base_row_without_a_warm_up_is_flagged() -> None:
    res = report.summarize(_raws())
    assert not res["warmup"]["ok"]
    md = report.render_markdown(res, {})
    assert "**WARNING" in md and "| **none** |" in md


# --------------------------------------------------------------------------- ktouch


def test_source_never_holds_the_magic_plain() -> None:
    src = touchprobe.source()
    assert guestmem.TOUCH_MAGIC.decode() not in src
    masked = ", ".join(f"0x{b ^ 0x5A:02x}" for b in guestmem.TOUCH_MAGIC)
    assert masked in src and "@MASKED@" not in src


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_ktouch_builds_once_and_runs(tmp_path: Path) -> None:
    exe = touchprobe.build_probe(tmp_path)
    assert exe.parent == tmp_path / "bench" and exe.stat().st_mode & 0o111
    assert touchprobe.build_probe(tmp_path) == exe  # cached
    assert not list((tmp_path / "bench").glob(".ktouch-*"))
    done = subprocess.run(
        [str(exe), "-m", "1", "-t", "0.05"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "KEMARI-TOUCH-START mib=1 seconds=0.05"
    assert lines[1].startswith("KEMARI-TOUCH-END loops=")
    assert int(lines[1].split("=")[1]) >= 65536
    bad = subprocess.run([str(exe), "-m", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_agents_boot_the_bench_image(tmp_path: Path) -> None:
    img = GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.img", "6.1", "key", True)
    cfg = KemariConfig(image=ImageConfig(add=("a:/b",), init="x"))
    agents = touchprobe.BenchImage(img, has_probe=True).config_for_agents(cfg)
    assert agents.image.kernel == str(img.kernel) and agents.image.initrd == str(img.initrd)
    assert agents.image.add == () and agents.image.init == ""
    assert agents.vm == cfg.vm and agents.replication == cfg.replication


def test_a_prebuilt_config_image_gets_no_probe(tmp_path: Path) -> None:
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    cfg = KemariConfig(
        paths=PathsConfig(cache_dir=tmp_path / "cache"),
        image=ImageConfig(kernel=str(k), initrd=str(i)),
    )
    bench = touchprobe.bench_image(cfg)
    assert not bench.has_probe and "prebuilt" in bench.note
    assert bench.image.kernel == k
    assert not (tmp_path / "cache").exists()  # nothing compiled or built
