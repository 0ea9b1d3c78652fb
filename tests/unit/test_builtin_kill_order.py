"""The built-in copy killed at every step of recording an epoch: the sidecar is never
ahead of the data it describes, and the copy opens again afterwards.

The secondary runs in a child process that SIGKILLs itself just before the k-th
durability step (fdatasync of the data, fsync of the new record, the rename, the
directory fsync); power-loss trials belong in the kernel lab. The order of those steps
is asserted in-process, whatever the temporary record is called.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.disk import builtin
from kemari_suite.disk.base import CopyState, DiskRole
from kemari_suite.disk.builtin import BuiltinDisk, read_sidecar, sidecar_path
from kemari_suite.errors import DiskError
from kemari_suite.protocol import files

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


def _fd_path(fd: int) -> Path:
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def test_recording_an_epoch_makes_each_step_durable_in_order(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data fdatasync, then the new record written and fsynced beside the sidecar (under
    whatever temporary name), renamed over it, then the directory fsynced."""
    steps: list[tuple[str, Path, Path | None]] = []
    real_fdatasync, real_fsync, real_replace = os.fdatasync, os.fsync, os.replace

    def fdatasync(fd: int) -> None:
        steps.append(("fdatasync", _fd_path(fd), None))
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        steps.append(("fsync", _fd_path(fd), None))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        steps.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    disk = BuiltinDisk(image, role=DiskRole.SECONDARY)
    disk.attach()
    try:
        disk.apply([(0, NEW)])
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        disk.write_state("lin", 2)
    finally:
        monkeypatch.undo()
        disk.close()
    sidecar = sidecar_path(image)
    assert [s[0] for s in steps] == list(STEPS), steps
    (_, data, _), (_, record, _), (_, src, dst), (_, folder, _) = steps
    assert data == image
    assert record.parent == sidecar.parent and record != sidecar
    assert src == record and dst == sidecar
    assert folder == sidecar.parent
    assert read_sidecar(sidecar) == CopyState("lin", 2)
    assert sorted(p.name for p in image.parent.iterdir()) == [image.name, sidecar.name]


def test_the_sidecar_is_written_by_the_shared_owner_only_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second copy of the durable atomic writer: the sidecar goes through
    :func:`kemari_suite.protocol.files.write_owner_only`, durably."""
    calls: list[tuple[Path, bool]] = []
    real = files.write_owner_only

    def spy(path: Any, data: bytes | str, *, durable: bool = False) -> Path:
        calls.append((Path(path), durable))
        return real(path, data, durable=durable)

    monkeypatch.setattr(builtin, "write_owner_only", spy)
    sidecar = tmp_path / "disk.img.kemari.json"
    builtin.write_sidecar(sidecar, CopyState("L", 3), generation=7)
    assert calls == [(sidecar, True)]
    assert read_sidecar(sidecar) == CopyState("L", 3)
    assert builtin.read_sidecar_generation(sidecar) == 7


def test_a_failed_sidecar_write_is_a_disk_error_and_keeps_the_old_record(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(DiskError, match="Read-only"):
        builtin.write_sidecar(sidecar_path(image), CopyState("lin", 5))
    monkeypatch.undo()
    assert read_sidecar(sidecar_path(image)) == CopyState("lin", 1)
    assert sorted(p.name for p in image.parent.iterdir()) == [
        image.name,
        sidecar_path(image).name,
    ]
