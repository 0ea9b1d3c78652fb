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
