"""``--intervals`` and ``--clients`` parse comma-separated integers with one helper, and
a bad item stops the command (exit 2) with a message naming the option (no root, no
QEMU: the commands stop before doing anything)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from kemari_suite.cli.main import _int_list, app


def test_int_list_parses_and_skips_empty_items() -> None:
    assert _int_list("--x", "100, 250,,1000 ") == [100, 250, 1000]
    assert _int_list("--x", "") == []


def test_int_list_exits_2() -> None:
    with pytest.raises(typer.Exit) as info:
        _int_list("--clients", "4,x")
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["bench", "interval", "--intervals", "100,ten"], "--intervals"),
        (["bench", "service", "--clients", "4,1.5"], "--clients"),
    ],
)
def test_both_options_refuse_a_bad_item(argv: list[str], option: str) -> None:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"{option}: not a list of numbers" in result.output


def test_demo_refuses_zero_vms() -> None:
    result = CliRunner().invoke(app, ["demo", "--vms", "0"])
    assert result.exit_code == 2
