"""The latency bench's verdicts (the runs themselves need a lab: ``kemari bench latency``)."""

from __future__ import annotations

from pathlib import Path

from kemari_suite.bench.latency import Run, verdicts, write_results


def _run(name: str, added: float | None) -> Run:
    r = Run(name, samples_ms=[1.0])
    r.requests, r.p50_ms, r.p90_ms, r.p99_ms, r.added_p50_ms = 1, 1.0, 1.0, 1.0, added
    return r


def test_each_policy_is_set_against_remus(tmp_path: Path) -> None:
    runs = [_run("base", 0.0), _run("output", 9.0), _run("kemari", 31.0), _run("remus", 20.0)]
    v = verdicts(runs)
    assert v == {"output_adds_less_than_remus": True, "kemari_adds_less_than_remus": False}
    assert verdicts([_run("base", 0.0), _run("output", 1.0)]) == {
        "output_adds_less_than_remus": False  # no Remus run: nothing shown
    }
    res = {
        "profile": "10g",
        "remus_interval_ms": 25,
        "runs": [vars(r) | {"samples_ms": None} for r in runs],
        "base_warmup": {},
        **v,
    }
    md = write_results(res, tmp_path, "kemari bench latency").read_text()
    assert "The output policy adds less latency than Remus with 25 ms epochs: met." in md
    assert "The kemari policy adds less latency than Remus with 25 ms epochs: NOT met." in md
