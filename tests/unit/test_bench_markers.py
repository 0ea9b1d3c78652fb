"""Console markers: parsing, pairing into timed loops, and host-clock tailing."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kemari_suite.bench.markers import ConsoleTail, Kind, Marker, assemble, parse_line

WORKLOADS = Path(__file__).resolve().parents[2] / "kemari_suite" / "guest" / "workloads"


def m(line: str, t: float | None, wall: float | None = None) -> Marker:
    out = parse_line(line, t, t + 1000.0 if wall is None and t is not None else wall)
    assert out is not None, line
    return out


def loop_lines(bench: str, rnd: int, t0: float, t1: float, ops: int, ns: int) -> list[Marker]:
    return [
        m(f"KB-START {bench} {rnd} {ops}", t0),
        m(f"KB-END {bench} {rnd}", t1),
        m(f"KB-GUEST {bench} {rnd} {ops} {ns} 0", t1),
    ]


# ---- parse_line ---------------------------------------------------------------------------


def test_parse_start_end_guest() -> None:
    s = parse_line("KB-START fork 3 800", 1.0, 2.0)
    assert s == Marker(Kind.START, ("fork", "3", "800"), 1.0, 2.0)
    g = parse_line("KB-GUEST iozone_wbuf 2 1024 71247488 4194304\r")
    assert g is not None and g.kind is Kind.GUEST
    assert g.fields == ("iozone_wbuf", "2", "1024", "71247488", "4194304")
    assert g.t_mono is None


def test_parse_finds_marker_after_kernel_output() -> None:
    line = "[   12.345] random: crng init done KB-END exec 4"
    got = parse_line(line)
    assert got is not None and got.kind is Kind.END and got.fields == ("exec", "4")


@pytest.mark.parametrize(
    "line",
    [
        "",
        "kemari-init: running: kbench",
        "KB-START fork",  # too few fields
        "KB-START fork x 800",  # round not a number
        "KB-GUEST fork 1 12 3x4 0",  # garbled by interleaved output
        "KB-ENDING fork 1",  # not a marker word
    ],
)
def test_parse_rejects(line: str) -> None:
    assert parse_line(line) is None


# ---- assemble -----------------------------------------------------------------------------


def test_assemble_times_loops_on_the_host_clock() -> None:
    marks = [
        m("KB-READY clocksource=tsc settle_ms=0", 0.5),
        m("KB-CAL fork 100", 0.6),
        m("KB-ROUND 1", 1.0),
        *loop_lines("fork", 1, 1.0, 1.5, 100, 400_000_000),
        *loop_lines("ctxsw", 1, 1.5, 2.5, 2000, 800_000_000),
    ]
    asm = assemble(marks)
    assert asm.calibration == {"fork": 100}
    assert asm.ready is not None
    fork, ctx = asm.loops
    # Host time is END - START as seen by the host, not the guest's own figure.
    assert fork.host_s == pytest.approx(0.5)
    assert fork.host_us_per_op == pytest.approx(5000.0)
    assert fork.guest_us_per_op == pytest.approx(4000.0)
    assert ctx.host_us_per_op == pytest.approx(500.0)
    assert fork.wall_start == pytest.approx(1001.0)


def test_assemble_drops_loops_without_host_times_or_mismatched() -> None:
    marks = [
        m("KB-ROUND 1", None),
        # Started before tailing began: its host duration is unknown.
        m("KB-START fork 1 10", None),
        m("KB-END fork 1", 2.0),
        m("KB-GUEST fork 1 10 1000 0", 2.0),
        # END of another loop than the START.
        m("KB-START exec 1 10", 3.0),
        m("KB-END sh 1", 4.0),
        m("KB-GUEST sh 1 10 1000 0", 4.0),
        # GUEST naming another benchmark than START/END.
        m("KB-START sh 1 10", 5.0),
        m("KB-END sh 1", 6.0),
        m("KB-GUEST exec 1 10 1000 0", 6.0),
        # Zero operations.
        *loop_lines("pagefault", 1, 7.0, 8.0, 0, 1000),
        # A failure between START and END voids the loop.
        m("KB-START ctxsw 1 10", 9.0),
        m("KB-FAIL ctxsw errno-32", 9.5),
        m("KB-END ctxsw 1", 10.0),
        m("KB-GUEST ctxsw 1 10 1000 0", 10.0),
    ]
    asm = assemble(marks)
    assert asm.loops == []
    assert asm.failures == ["ctxsw errno-32"]


def test_accepted_rounds_need_time_and_completeness() -> None:
    marks = [
        m("KB-SKIP iozone_osync no-device", 0.1),
        m("KB-ROUND 1", 1.0),
        *loop_lines("fork", 1, 1.0, 2.0, 1, 1),
        *loop_lines("exec", 1, 2.0, 3.0, 1, 1),
        m("KB-ROUND 2", 10.0),
        *loop_lines("fork", 2, 10.0, 11.0, 1, 1),
        *loop_lines("exec", 2, 11.0, 12.0, 1, 1),
        m("KB-ROUND 3", 20.0),
        *loop_lines("fork", 3, 20.0, 21.0, 1, 1),  # exec still running
    ]
    asm = assemble(marks)
    benches = ["fork", "exec", "iozone_osync"]  # the skipped one is not required
    assert asm.accepted_rounds(0.0, benches) == [1, 2]
    assert asm.accepted_rounds(5.0, benches) == [2]
    assert asm.accepted_rounds(10.5, benches) == []
    assert [lp.round for lp in asm.loops_of([2])] == [2, 2]


# ---- ConsoleTail --------------------------------------------------------------------------


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_tail_stamps_lines_when_they_appear(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("boot noise\nKB-START fork 1 5\nKB-END fork 1\nKB-GUEST fork 1 5 10 0\n")
    with ConsoleTail(console) as tail:
        time.sleep(0.2)
        t0 = time.monotonic()
        _append(console, "KB-ROUND 2\nKB-START fork 2 5\n")
        time.sleep(0.3)
        # A line written in two pieces is stamped when its newline arrives.
        _append(console, "KB-END f")
        time.sleep(0.1)
        t1 = time.monotonic()
        _append(console, "ork 2\nKB-GUEST fork 2 5 1000 0\n")
        time.sleep(0.2)
        marks = tail.markers()
    assert tail.error is None
    # Lines that were there before tailing began carry no time.
    assert [x.t_mono for x in marks[:3]] == [None, None, None]
    asm = assemble(marks)
    assert [lp.round for lp in asm.loops] == [2]
    lp = asm.loops[0]
    # Stamped when the host saw the lines (with room for a busy test machine).
    assert t0 <= lp.t_start <= t0 + 0.25
    assert t1 <= lp.t_end <= t1 + 0.25
    # The host saw the loop last about 0.4 s; the guest claimed 1 microsecond.
    assert 0.25 <= lp.host_s <= 0.7
    assert lp.guest_us_per_op == pytest.approx(0.2)


def test_tail_waits_for_the_file_and_follows_a_replacement(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    with ConsoleTail(console) as tail:
        time.sleep(0.15)
        # The file appears after tailing began: everything in it is timed.
        console.write_text("KB-ROUND 1\n")
        time.sleep(0.2)
        # QEMU restarted: a new, shorter file under the same name.
        os.unlink(console)
        console.write_text("KB-DONE\n")
        time.sleep(0.3)
        marks = tail.markers()
    kinds = [x.kind for x in marks]
    assert kinds == [Kind.ROUND, Kind.DONE]
    assert all(x.t_mono is not None for x in marks)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_kbench_runs_natively_and_its_markers_assemble(tmp_path: Path) -> None:
    """The guest program itself, built for the host: its markers parse and pair up."""
    exe = tmp_path / "kbench"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(WORKLOADS / "kbench.c")],
        check=True,
        capture_output=True,
    )
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    console = tmp_path / "console.log"
    with ConsoleTail(console) as tail, console.open("wb") as out:
        proc = subprocess.run(
            [
                str(exe),
                *("-t", "0.05", "-r", "2", "-w", "0", "-d", str(disk)),
                *("-F", "256", "-S", "64", "-i", "ctxsw=200"),
                *("-b", "fork,ctxsw,iozone_wbuf,iozone_osync"),
            ],
            stdout=out,
            timeout=60,
            check=False,
        )
        time.sleep(0.3)
        marks = tail.markers()
    assert proc.returncode == 0, console.read_text()
    asm = assemble(marks)
    assert asm.done and not asm.failures
    assert asm.calibration["ctxsw"] == 200  # given, not calibrated
    assert asm.accepted_rounds(0.0, ["fork", "ctxsw", "iozone_wbuf", "iozone_osync"]) == [1, 2]
    by = {(lp.bench, lp.round): lp for lp in asm.loops}
    # Round 1 is the shortened warm-up; round 2 runs the full count.
    assert by[("ctxsw", 1)].iters == 50 and by[("ctxsw", 2)].iters == 200
    assert by[("ctxsw", 2)].ops == 400  # two switches per round trip
    assert by[("iozone_wbuf", 2)].bytes == 256 * 1024
    assert by[("iozone_osync", 2)].ops == 16
    for lp in asm.loops:
        # Host stamps are taken when the tail reads a line: a short loop's begin and
        # end can arrive in one read on a busy host (same stamp), never out of order.
        assert lp.host_s >= 0 and lp.guest_ns > 0
