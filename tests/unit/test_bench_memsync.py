"""The memsync report's derived figures, from recorded phases (no guest)."""

from __future__ import annotations

from kemari_suite.bench.linkcost import tls_cost
from kemari_suite.bench.memsync import Phase


def phase(tls: str, tracker: str, pause: float, ratio: float, *, pre: bool = False) -> Phase:
    return Phase(
        pattern="compressible",
        tls=tls,
        tracker=tracker,
        pipelining=pre,
        pause_ms_p50=pause,
        pause_ms_p99=2 * pause,
        throughput_ratio=ratio,
    )


def test_tls_cost_pairs_runs_that_differ_in_tls_alone() -> None:
    phases = [
        phase("on", "uffd-wp", 7.8, 0.80),
        Phase(pattern="incompressible", tls="on", tracker="uffd-wp", pause_ms_p50=150.0),
        phase("off", "uffd-wp", 7.6, 0.82),
        phase("on", "uffd-wp", 7.0, 0.82, pre=True),
        phase("on", "compare", 23.5, 0.67),
    ]
    c = tls_cost(phases)
    assert round(c["pause_ms_p50_delta"], 2) == 0.2
    assert round(c["pause_ms_p99_delta"], 2) == 0.4
    assert round(c["throughput_ratio_delta"], 2) == -0.02


def test_tls_cost_is_empty_without_a_matching_pair() -> None:
    assert tls_cost([phase("on", "compare", 23.5, 0.67), phase("off", "uffd-wp", 7.6, 0.8)]) == {}


def test_precopy_pays_compares_the_default_row_with_its_pre_copy_off_twin() -> None:
    from kemari_suite.bench.memsync import Result, _check

    def result(*phases: Phase) -> Result:
        res = Result(profile="10g", memory_mib=256, pages_per_100ms=4000, accel="tcg")
        res.phases = list(phases)
        _check(res)
        return res

    default_on = phase("on", "uffd-wp", 6.0, 0.94, pre=True)
    other = [phase("off", "uffd-wp", 6.2, 0.93, pre=True), phase("on", "compare", 25.0, 0.9)]
    pays = result(default_on, *other, phase("on", "uffd-wp", 60.0, 0.93))
    assert pays.checks["precopy_pays"] is True
    costs = result(default_on, *other, phase("on", "uffd-wp", 60.0, 0.97))
    assert costs.checks["precopy_pays"] is False, "pre-copy cost throughput"
    # Pre-copy off by default, on in the twin: the same comparison, the other way round.
    off_first = result(
        phase("on", "uffd-wp", 9.0, 0.90), phase("on", "uffd-wp", 7.0, 0.91, pre=True)
    )
    assert off_first.checks["precopy_pays"] is True
    assert "precopy_pays" not in result(default_on, *other).checks


def test_the_incompressible_pair_is_checked_on_its_own() -> None:
    from kemari_suite.bench.memsync import Result, _check, precopy_pair

    def inc(pause: float, ratio: float, *, pre: bool) -> Phase:
        return Phase(
            pattern="incompressible",
            tls="on",
            tracker="uffd-wp",
            pipelining=pre,
            pause_ms_p50=pause,
            throughput_ratio=ratio,
        )

    on, off = inc(9.0, 0.66, pre=True), inc(140.0, 0.86, pre=False)
    phases = [phase("on", "uffd-wp", 6.0, 0.9, pre=True), on, off]
    assert precopy_pair(phases, "incompressible") == (on, off)
    res = Result(profile="10g", memory_mib=256, pages_per_100ms=4000, accel="tcg")
    res.phases = phases
    _check(res)
    assert res.checks["precopy_pays_incompressible"] is False
    assert "precopy_pays" not in res.checks  # no compressible twin
