"""``kemari demo``'s options that exclude each other are refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo refuses non-root first")


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kemari_suite.cli.main", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("--kernel-lab", "--vms", "2"),
        ("--kernel-lab", "--pacemaker"),
        ("--pacemaker", "--vms", "3"),
    ],
)
def test_two_demos_at_once_are_refused(args: tuple[str, ...]) -> None:
    proc = demo(*args)
    assert proc.returncode == 2, proc.stderr
    assert "separate demos" in proc.stderr


def test_a_disk_backend_without_the_kernel_lab_is_refused() -> None:
    proc = demo("--disk", "drbd")
    assert proc.returncode == 2, proc.stderr
    assert "add --kernel-lab" in proc.stderr


def test_a_disk_backend_the_kernel_lab_cannot_run_is_named() -> None:
    proc = demo("--kernel-lab", "--disk", "nfs", "--json")
    assert proc.returncode == 2, proc.stderr
    assert "--disk nfs" in proc.stderr and "builtin" in proc.stderr
    assert proc.stdout == ""
