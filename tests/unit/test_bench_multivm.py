"""``kemari bench multivm``'s verdict per VM: both ratios at most 1.2 (no QEMU)."""

from __future__ import annotations

from kemari_suite.bench.multivm import BOUND, VmFigures, Window, judge


def _figures(alone: tuple[float, float], together: tuple[float, float]) -> VmFigures:
    f = VmFigures(
        name="vm1",
        primary_host="primary",
        alone=Window(pause_ms_p50=alone[0], sync_points=10, throughput=alone[1]),
        together=Window(pause_ms_p50=together[0], sync_points=10, throughput=together[1]),
    )
    judge(f)
    return f


def test_within_the_bound() -> None:
    f = _figures((20.0, 100.0), (23.0, 90.0))
    assert (f.pause_ratio, f.throughput_ratio, f.ok) == (1.15, 1.111, True)


def test_a_slower_pause_or_a_lower_throughput_fails() -> None:
    assert not _figures((20.0, 100.0), (20.0 * BOUND + 0.1, 100.0)).ok
    assert not _figures((20.0, 100.0), (20.0, 100.0 / BOUND - 1)).ok


def test_a_missing_figure_fails() -> None:
    f = VmFigures(name="vm1", primary_host="primary")
    judge(f)
    assert (f.pause_ratio, f.throughput_ratio, f.ok) == (None, None, False)
