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


def test_report_names_command_and_every_vm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from kemari_suite.bench.multivm import MultiVmResult, write_report
    from kemari_suite.lab.pair import HostLoss

    good = VmFigures("vm1", "primary", Window(10.0, 20, 100.0), Window(11.0, 21, 95.0))
    bad = VmFigures("vm2", "secondary", Window(10.0, 20, 100.0), Window(30.0, 9, 40.0))
    for f in (good, bad):
        judge(f)
    res = MultiVmResult(vms=[good, bad], window_s=10, cores=2, vcpus=4)
    res.host_loss = [
        HostLoss(
            name="vm1", primary_host="primary", outcome="failed_over", resumed=True, records_lost=0
        ),
        HostLoss(
            name="vm2",
            primary_host="secondary",
            outcome="unprotected",
            resumed=True,
            records_lost=0,
        ),
    ]
    md = write_report(res, tmp_path, "kemari bench multivm -o X").read_text()
    assert "Command: `kemari bench multivm -o X`" in md
    assert "| vm1 | primary | 10.0 | 11.0 | 1.10 |" in md and md.count("| yes |") >= 1
    assert "| vm2 | secondary | 10.0 | 30.0 | 3.00 |" in md
    assert "1 of 2 VMs within 1.2x" in md and "every VM served again" in md
    data = json.loads((tmp_path / "multivm.json").read_text())
    assert data["command"] == "kemari bench multivm -o X" and data["machine"]["cpus"]
    assert [v["name"] for v in data["vms"]] == ["vm1", "vm2"]
