"""SCSI-3 persistent reservations: parsing sg_persist's answers, keys, errors.

The fixtures in tests/fixtures/scsipr are sg_persist 1.46's real output against LIO,
captured in the kernel lab by ``klab/iscsi.py``'s scenario (see their README).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kemari_suite.disk.drbdadm import CommandResult
from kemari_suite.disk.scsipr import (
    KEY_PREFIX,
    PR_TYPE_WE_RO,
    PrKeys,
    PrReservation,
    ScsiPr,
    ScsiPrError,
    SgPersist,
    format_key,
    host_key,
    parse_read_keys,
    parse_read_reservation,
)
from kemari_suite.errors import DiskError

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "scsipr"
KEY_A = 0x4B4D52497CAE8B19
KEY_B = 0x4B4D52493A4A5F5A


def fixture(name: str) -> str:
    return (FIX / f"{name}.txt").read_text()


def test_host_keys_are_the_ones_the_lab_registered() -> None:
    assert host_key("l1a") == KEY_A
    assert host_key("l1b") == KEY_B
    assert host_key("l1a") >> 32 == KEY_PREFIX  # "KMRI": whose keys they are
    assert format_key(KEY_A) == "0x4b4d52497cae8b19"
    with pytest.raises(ValueError):
        host_key("")


@pytest.mark.parametrize(
    ("name", "generation", "keys"),
    [
        ("read_keys_none", 0, ()),
        ("read_keys_one", 1, (KEY_A,)),
        ("read_keys_two", 2, (KEY_A, KEY_B)),
        ("read_keys_two_inquiry", 2, (KEY_A, KEY_B)),
        ("read_keys_b_only", 3, (KEY_B,)),
    ],
)
def test_read_keys(name: str, generation: int, keys: tuple[int, ...]) -> None:
    assert parse_read_keys(fixture(name)) == PrKeys(generation, keys)


def test_no_reservation() -> None:
    res = parse_read_reservation(fixture("read_reservation_none"))
    assert res == PrReservation(0)
    assert not res.held


@pytest.mark.parametrize(
    ("name", "generation", "key"),
    [
        ("read_reservation_a", 2, KEY_A),
        ("read_reservation_a_inquiry", 2, KEY_A),
        ("read_reservation_b", 3, KEY_B),
    ],
)
def test_reservation_held(name: str, generation: int, key: int) -> None:
    res = parse_read_reservation(fixture(name))
    assert res.held and res.generation == generation and res.key == key
    assert res.type == PR_TYPE_WE_RO
    assert res.type_name == "Write Exclusive, registrants only"
    assert res.scope == "LU_SCOPE"


@pytest.mark.parametrize("text", ["", "sg_persist: no such device\n", "    0x1234\n"])
def test_not_an_answer(text: str) -> None:
    with pytest.raises(ScsiPrError):
        parse_read_keys(text)
    with pytest.raises(ScsiPrError):
        parse_read_reservation(text)


def test_holder_without_type_is_refused() -> None:
    text = "  PR generation=0x2, Reservation follows:\n    Key=0x1\n"
    with pytest.raises(ScsiPrError, match="scope/type"):
        parse_read_reservation(text)


def test_error_names_command_rc_and_stderr() -> None:
    err = ScsiPrError(
        "/dev/sda",
        "sg_persist --no-inquiry --out --reserve --param-rk=0x1 --prout-type=5 /dev/sda",
        24,
        fixture("reserve_conflict_stderr"),
    )
    assert isinstance(err, DiskError)
    assert err.conflict
    assert "exited 24" in str(err) and "--reserve" in str(err)
    assert "Reservation conflict" in str(err)
    assert "Reservation conflict" in fixture("a_sg_persist_after")


class Scripted(SgPersist):
    """Answers --in commands from fixtures; records every argv."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def run(self, device: str, args: Sequence[str]) -> CommandResult:
        argv = ("sg_persist", *args, device)
        self.calls.append(argv)
        what = next((a for a in args if a in ("--read-keys", "--read-reservation")), "")
        out = fixture(self.answers[what].pop(0)) if what else ""
        return CommandResult(argv, 0, out, "", 0.0)


def test_acquire_preempts_the_holder() -> None:
    tools = Scripted({"--read-reservation": ["read_reservation_a", "read_reservation_b"]})
    res = ScsiPr("/dev/sda", "l1b", tools=tools).acquire()
    assert res.key == KEY_B
    verbs = [c[3] for c in tools.calls]
    assert verbs == ["--register-ignore", "--read-reservation", "--preempt-abort",
                     "--read-reservation"]  # fmt: skip
    assert tools.calls[2] == (
        "sg_persist", "--no-inquiry", "--out", "--preempt-abort",
        f"--param-rk={format_key(KEY_B)}", f"--param-sark={format_key(KEY_A)}",
        "--prout-type=5", "/dev/sda",
    )  # fmt: skip


def test_acquire_reserves_when_free_and_checks_the_result() -> None:
    tools = Scripted({"--read-reservation": ["read_reservation_none", "read_reservation_a"]})
    assert ScsiPr("/dev/sda", "l1a", tools=tools).acquire().key == KEY_A
    assert [c[3] for c in tools.calls][2] == "--reserve"
    tools = Scripted({"--read-reservation": ["read_reservation_none", "read_reservation_b"]})
    with pytest.raises(ScsiPrError, match="not by us"):
        ScsiPr("/dev/sda", "l1a", tools=tools).acquire()


def test_missing_tool_is_a_disk_error() -> None:
    pr = ScsiPr("/dev/nonexistent", "h", tools=SgPersist(binary="/nonexistent/sg_persist"))
    with pytest.raises(ScsiPrError) as info:
        pr.read_keys()
    assert info.value.rc == 127
