"""Scenario files, the suite's parameters, pass order and the ``kemari bench`` hook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer.testing import CliRunner

from kemari_suite.bench import scenarios as scmod
from kemari_suite.bench import suite
from kemari_suite.bench.scenarios import QUICK, Scenario, load_scenarios, parse_scenario, select
from kemari_suite.config import ReplicationConfig
from kemari_suite.errors import BenchmarkError, ConfigError
from kemari_suite.vm.image import kernel_cmdline


def test_shipped_scenarios() -> None:
    scs = load_scenarios()
    names = [s.name for s in scs]
    assert names == [
        "base",
        "kemari-10g-shared",
        "kemari-10g-builtin",
        "kemari-1g-shared",
        "kemari-1g-builtin",
        "remus-10g-builtin",
        "seed-10g-builtin",
    ]
    kemari = [s for s in scs if s.protected]
    # The Kemari rows run the product's default policy; Remus and the seed's rule beside.
    assert {s.name: s.policy for s in kemari if s.policy != "output"} == {
        "remus-10g-builtin": "remus",
        "seed-10g-builtin": "kemari",
    }
    assert all(s.policy == "output" for s in kemari if s.name.startswith("kemari-"))
    assert {s.remus_interval_ms for s in kemari if s.policy == "remus"} == {100}
    # Every Kemari row runs the product's default interval bound.
    assert {s.max_interval_ms for s in kemari} == {ReplicationConfig().max_interval_ms}
    assert all(("1g" in s.name) != ("10g" in s.name) for s in kemari)
    assert {s.profile for s in kemari if "10g" in s.name} == {"10g"}
    assert {s.disk for s in kemari} == {"shared", "builtin"}


def _write(folder: Path, name: str, text: str) -> None:
    (folder / f"{name}.toml").write_text(text)


BASE = 'name = "base"\nkind = "base"\nprofile = "unlimited"\ndisk = "file"\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "k"\nkind = "kemari"\nprofile = "10g"\ndisk = "file"\n', "disk"),
        ('name = "k"\nkind = "kemari"\nprofile = "40g"\ndisk = "shared"\n', "profile"),
        ('name = "k"\nkind = "kemari"\nprofile = "1g"\ndisk = "shared"\nspeed = 1\n', "speed"),
        ('name = "k"\nkind = "kemari"\nprofile = "1g"\n', "disk"),
        ('name = "k"\nkind = "kemari"\nprofile = "1g"\ndisk = "shared"\norder = "1"\n', "order"),
        (
            'name = "k"\nkind = "kemari"\nprofile = "1g"\ndisk = "shared"\npolicy = "colo"\n',
            "policy",
        ),
        (
            'name = "k"\nkind = "kemari"\nprofile = "1g"\ndisk = "shared"\nremus_interval_ms = 0\n',
            "remus_interval_ms",
        ),
    ],
)
def test_bad_scenario_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    _write(tmp_path, "base", BASE)
    _write(tmp_path, "k", text)
    with pytest.raises(ConfigError, match=needle):
        load_scenarios(tmp_path)


def test_kemari_rows_must_share_the_interval(tmp_path: Path) -> None:
    _write(tmp_path, "base", BASE)
    for name, ms in (("a-1g", 100), ("b-10g", 25)):
        _write(
            tmp_path,
            name,
            f'name = "{name}"\nkind = "kemari"\nprofile = "1g"\ndisk = "shared"\n'
            f"max_interval_ms = {ms}\n",
        )
    with pytest.raises(ConfigError, match="max_interval_ms"):
        load_scenarios(tmp_path)


def test_name_must_match_file_and_one_base(tmp_path: Path) -> None:
    _write(tmp_path, "base", BASE.replace('"base"\nkind', '"other"\nkind'))
    with pytest.raises(ConfigError, match="file name"):
        load_scenarios(tmp_path)
    (tmp_path / "base.toml").unlink()
    with pytest.raises(ConfigError, match="exactly one base"):
        load_scenarios(tmp_path)


def test_select_always_keeps_base() -> None:
    scs = load_scenarios()
    got = select(scs, ["kemari-1g-shared"])
    assert [s.name for s in got] == ["base", "kemari-1g-shared"]
    assert select(scs, None) == scs
    with pytest.raises(ConfigError, match="unknown"):
        select(scs, ["kemari-40g"])


def test_parse_defaults() -> None:
    sc = parse_scenario({"name": "x", "kind": "kemari", "profile": "1g", "disk": "builtin"})
    default = ReplicationConfig().max_interval_ms
    assert (sc.title, sc.tiebreaker, sc.max_interval_ms) == ("x", "witness", default)


def test_guest_command_fits_the_kernel_command_line() -> None:
    iters = {"fork": 123456, "exec": 2000, "sh": 900, "pagefault": 800, "ctxsw": 9_000_000}
    cmd = QUICK.guest_command(iters)
    assert cmd.startswith("kbench -t 0.7 -r 0 ")
    assert "-i ctxsw=9000000,exec=2000,fork=123456,pagefault=800,sh=900" in cmd
    assert "-b fork,exec,sh,pagefault,ctxsw,iozone_wbuf,iozone_osync" in cmd
    kernel_cmdline(ip="10.0.0.2/24", run=cmd)  # raises when too long


def test_quick_fits_in_ten_minutes_on_paper() -> None:
    """Rough budget: per scenario and pass, about 12 s of set-up and warm-up, then
    the kept rounds (five lmbench loops plus the writers, at most about 4 s)."""
    p = QUICK
    per_run = 12 + p.rounds * (5 * p.loop_s + 4)
    assert (5 * p.passes + 1) * per_run < 8 * 60


def test_pass_order_alternates_kemari_rows() -> None:
    scs = load_scenarios()
    one = [s.name for s in suite.pass_order(scs, 1)]
    two = [s.name for s in suite.pass_order(scs, 2)]
    assert one[0] == two[0] == "base"
    assert one[1:] == two[1:][::-1]


def test_schedule_brackets_kemari_rows_with_base() -> None:
    scs = load_scenarios()
    plan = suite.schedule(scs, 2)
    assert [(k, sc.name) for k, sc in plan][:2] == [(1, "base"), (1, "kemari-10g-shared")]
    assert plan[-1][0] == 3 and plan[-1][1].name == "base"
    assert [k for k, sc in plan if sc.name == "base"] == [1, 2, 3]
    # Base three times, six protected rows in each of two passes.
    assert len(plan) == 15
    only_base = [s for s in scs if not s.protected]
    assert [k for k, _ in suite.schedule(only_base, 2)] == [1, 2]


def test_other_share_excludes_this_run() -> None:
    a = suite.CpuSample(t=0.0, busy_s=10.0, mine_s=4.0)
    b = suite.CpuSample(t=2.0, busy_s=13.0, mine_s=5.0)
    # 3 CPU-seconds busy in 2 s on 2 CPUs, 1 of them ours: others used half a CPU.
    assert suite.other_share(a, b, 2) == pytest.approx(0.5)
    s = suite.cpu_sample()
    assert s.busy_s > 0 and s.mine_s > 0


# ---- the CLI hook, exactly as the lead wires it into the ``bench`` group ----------------


def _app() -> typer.Typer:
    from kemari_suite.cli.benchsuite import suite_command

    bench_app = typer.Typer(no_args_is_help=True)

    @bench_app.callback(invoke_without_command=True)
    def bench(
        ctx: typer.Context,
        config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
        quick: Annotated[bool, typer.Option("--quick")] = False,
        scenarios: Annotated[list[str] | None, typer.Option("--scenarios")] = None,
        out: Annotated[Path, typer.Option("--out", "-o")] = Path("benchmarks/results/suite"),
        json_out: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        suite_command(config, quick, scenarios, out, json_out)

    @bench_app.command("other")
    def other() -> None:
        print("other ran")

    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    return app


def _fake_result() -> dict[str, Any]:
    return {
        "ratios": {
            "kemari-10g-shared": {
                "fork": 1.21,
                "exec": 1.1,
                "sh": 1.1,
                "pagefault": 1.0,
                "ctxsw": 1.3,
            }
        },
        "io_ratios": {"kemari-10g-shared": {"iozone_wbuf": 2.0, "iozone_osync": 3.0}},
        "targets": {"kemari-10g-shared": {"all_met": True}},
        "scenarios": {"base": {}, "kemari-10g-shared": {}},
    }


def test_cli_json_last_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake(cfg: Any, **kw: Any) -> dict[str, Any]:
        seen.update(kw)
        kw["progress"](suite.SuiteProgress("x", 1, 2))
        return _fake_result()

    monkeypatch.setattr(suite, "run_suite", fake)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    res = CliRunner().invoke(
        _app(),
        [
            "bench",
            "--quick",
            "--scenarios",
            "kemari-10g-shared,kemari-1g-shared",
            "-o",
            str(tmp_path),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["ratios"]["kemari-10g-shared"]["fork"] == 1.21
    assert last["failed"] == {}
    assert seen["quick"] is True and seen["out_dir"] == tmp_path
    assert seen["scenarios"] == ["kemari-10g-shared", "kemari-1g-shared"]


def test_cli_subcommands_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "run_suite", lambda *a, **k: pytest.fail("suite ran"))
    res = CliRunner().invoke(_app(), ["bench", "other"])
    assert res.exit_code == 0 and "other ran" in res.stdout


def test_cli_error_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(cfg: Any, **kw: Any) -> dict[str, Any]:
        raise BenchmarkError("base", "QEMU exited")

    monkeypatch.setattr(suite, "run_suite", fail)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    res = CliRunner().invoke(_app(), ["bench", "-o", str(tmp_path), "--json"])
    assert res.exit_code == 2
    assert "QEMU exited" in res.output


def test_scenario_is_frozen() -> None:
    sc = Scenario("a", "A", "base", "unlimited", "file")
    with pytest.raises(AttributeError):
        sc.name = "b"  # type: ignore[misc]
    assert scmod.SCENARIO_DIR.is_dir()


def test_tsc_skew_detection() -> None:
    ok = ("clocksource=tsc", "settle_ms=1", "cpu_mhz=2594.730")
    bad = ("clocksource=tsc", "settle_ms=3", "cpu_mhz=658.621")
    assert suite.tsc_skewed(ok, 2596.1) is None
    assert suite.tsc_skewed(bad, 2596.1) == pytest.approx(658.621)
    assert suite.tsc_skewed(("cpu_mhz=?",), 2596.1) is None
    assert suite.tsc_skewed(bad, None) is None
    err = suite.GuestClockSkew("k", 658.6, 2596.1)
    assert isinstance(err, BenchmarkError) and "659 MHz" in str(err)
