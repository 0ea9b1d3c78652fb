"""The built-in copy killed at every step of recording an epoch: the sidecar is never
ahead of the data it describes, and the copy opens again afterwards.

The secondary runs in a child process that SIGKILLs itself just before the k-th
durability step (fdatasync of the data, fsync of the new record, the rename, the
directory fsync); power-loss trials belong in the kernel lab.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kemari_suite.disk.base import CopyState, DiskRole
from kemari_suite.disk.builtin import BuiltinDisk, read_sidecar, sidecar_path

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = b"old-data" * 512, b"new-data" * 512
STEPS = ("fdatasync", "fsync", "replace", "fsync")

CHILD = """
import os, signal, sys
from kemari_suite.disk.base import DiskRole
from kemari_suite.disk.builtin import BuiltinDisk

kill_at = int(sys.argv[2])
seen = [0]

def before(real):
    def call(*args):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return call

disk = BuiltinDisk(sys.argv[1], role=DiskRole.SECONDARY)
disk.attach()
disk.apply([(0, bytes.fromhex(sys.argv[3]))])
for name in ("fdatasync", "fsync", "replace"):
    setattr(os, name, before(getattr(os, name)))
disk.write_state("lin", 2)
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    disk = BuiltinDisk(path, role=DiskRole.SECONDARY)
    disk.attach()
    disk.apply([(0, OLD)])
    disk.write_state("lin", 1)
    disk.close()
    return path


@pytest.mark.parametrize("kill_at", range(1, len(STEPS) + 2))
def test_killed_at_each_step_the_record_is_never_ahead_of_the_data(
    image: Path, kill_at: int
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(image), str(kill_at), NEW.hex()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    finished = kill_at > len(STEPS)
    assert child.returncode == (0 if finished else -signal.SIGKILL), child.stderr
    record = read_sidecar(sidecar_path(image))
    data = image.read_bytes()[: len(NEW)]
    if finished:
        assert record == CopyState("lin", 2) and data == NEW
    elif record == CopyState("lin", 2):
        # Only a kill after the rename may leave the new record, and its data is there.
        assert kill_at == len(STEPS) and data == NEW
    else:
        assert record == CopyState("lin", 1)
    # The copy opens again, whatever the kill left behind (a stray temporary record).
    disk = BuiltinDisk(image, role=DiskRole.SECONDARY)
    disk.attach()
    assert disk.read_state() == record
    disk.close()
