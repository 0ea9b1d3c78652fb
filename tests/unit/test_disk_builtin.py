"""The built-in replicated disk: dirty tracking, the standby's copy, and the sidecar,
whose record must never be ahead of the data (checked by the order of the syscalls)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.config import DiskConfig, KemariConfig
from kemari_suite.disk import builtin
from kemari_suite.disk.base import CopyState, DiskRole
from kemari_suite.disk.builtin import (
    BuiltinDisk,
    read_disk_state,
    read_sidecar,
    sidecar_path,
    write_disk_state,
)
from kemari_suite.errors import DiskError

SIZE = 1 << 20
BLOCK = 64 << 10


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    return path


@pytest.fixture
def disk(image: Path) -> Iterator[BuiltinDisk]:
    d = BuiltinDisk(image, role=DiskRole.PRIMARY)
    d.attach()
    yield d
    d.close()


# ---- dirty tracking ---------------------------------------------------------------------


def test_tracks_only_while_tracking(disk: BuiltinDisk) -> None:
    disk.apply([(0, b"a")])
    assert disk.dirty_chunks() == []
    disk.tracking = True
    disk.apply([(BLOCK - 1, b"ab"), (5 * BLOCK, bytes(BLOCK + 1)), (SIZE - 1, b"z")])
    assert disk.dirty_blocks() == [0, 1, 5, 6, SIZE // BLOCK - 1]
    assert disk.dirty_chunks()[-1] == (SIZE - BLOCK, BLOCK)
    assert disk.status().detail["dirty_blocks"] == 5
    disk.clear_dirty()
    assert disk.dirty_chunks() == []


def test_last_partial_block_and_full_copy_chunks(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(BLOCK * 2 + 100))
    d = BuiltinDisk(path, copy_chunk=BLOCK)
    d.attach()
    try:
        d.tracking = True
        d.apply([(BLOCK * 2 + 50, b"x")])
        assert d.dirty_chunks() == [(BLOCK * 2, 100)]
        assert d.copy_chunks() == [(0, BLOCK), (BLOCK, BLOCK), (BLOCK * 2, 100)]
    finally:
        d.close()


# ---- the standby's copy -------------------------------------------------------------


def test_full_copy_is_swapped_in_at_commit(disk: BuiltinDisk, image: Path) -> None:
    disk.write_state("old", 3)
    disk.apply([(0, b"old data")])
    target = disk.begin_copy(full=True)
    assert target is not disk and disk.next_path.exists()
    target.apply([(0, b"new data")])
    assert disk.read(0, 8) == b"old data"  # the old copy serves until the commit
    assert disk.read_state() == CopyState("old", 3)
    disk.commit_copy("new", 9)
    assert disk.read(0, 8) == b"new data" and not disk.next_path.exists()
    assert disk.read_state() == CopyState("new", 9)
    assert disk.status().role is DiskRole.PRIMARY


def test_incremental_copy_is_nobodys_until_commit(disk: BuiltinDisk) -> None:
    disk.write_state("lin", 3)
    target = disk.begin_copy(full=False)
    assert target is disk
    assert disk.read_state() == CopyState()  # neither the old copy nor the new one
    target.apply([(0, b"block")])
    disk.abort_copy()  # rolled back: stays nobody's
    assert disk.read_state() == CopyState()
    disk.begin_copy(full=False)
    disk.commit_copy("lin", 4)
    assert disk.read_state() == CopyState("lin", 4)


def test_aborted_full_copy_leaves_the_old_one(disk: BuiltinDisk) -> None:
    disk.write_state("old", 3)
    disk.begin_copy(full=True).apply([(0, b"junk")])
    disk.abort_copy()
    assert not disk.next_path.exists()
    assert disk.read_state() == CopyState("old", 3) and disk.read(0, 4) == bytes(4)
    with pytest.raises(DiskError, match="not attached"):
        BuiltinDisk(disk.path).begin_copy(full=True)


# ---- the sidecar: crash-safe order ----------------------------------------------------


class SyscallLog:
    """Records fdatasync/fsync/replace/unlink as (call, path) through /proc/self/fd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, OSError] = {}
        for name in ("fdatasync", "fsync"):
            monkeypatch.setattr(os, name, self._fd_call(name, getattr(os, name)))
        real_replace, real_unlink = os.replace, Path.unlink

        def replace(src: Any, dst: Any) -> None:
            self._check("replace")
            self.calls.append(("replace", f"{src} -> {dst}"))
            real_replace(src, dst)

        def unlink(path: Path, missing_ok: bool = False) -> None:
            self.calls.append(("unlink", str(path)))
            real_unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)

    def _check(self, name: str) -> None:
        if name in self.fail:
            raise self.fail[name]

    def _fd_call(self, name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            self._check(name)
            self.calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        return call


def assert_durable_order(calls: list[tuple[str, str]], image: Path) -> None:
    """The steps, in order, whatever the temporary record is called: the data, then the
    new record (a file beside the sidecar) made durable, renamed over the sidecar, then
    the directory (the rename itself)."""
    side = sidecar_path(image)
    assert [c for c, _ in calls] == ["fdatasync", "fsync", "replace", "fsync"], calls
    (_, data), (_, record), (_, rename), (_, folder) = calls
    assert data == str(image)  # the data first
    tmp = Path(record)  # the new record, durable before it is visible
    assert tmp.parent == side.parent and tmp != side and tmp != image
    assert rename == f"{tmp} -> {side}"
    assert folder == str(image.parent)
    assert not tmp.exists()


def test_write_state_flushes_data_then_replaces_the_sidecar_durably(
    disk: BuiltinDisk, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk.apply([(0, b"data")])
    log = SyscallLog(monkeypatch)
    disk.write_state("lin", 5)
    assert_durable_order(log.calls, image)
    assert json.loads(sidecar_path(image).read_text()) == {"lineage": "lin", "epoch": 5}


def test_write_disk_state_by_config_has_the_same_order(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = KemariConfig(disk=DiskConfig(path=str(image)))
    log = SyscallLog(monkeypatch)
    write_disk_state(cfg, "lin", 6)
    assert_durable_order(log.calls, image)
    assert read_disk_state(cfg) == {"lineage": "lin", "epoch": 6}


@pytest.mark.parametrize("step", ["fdatasync", "fsync", "replace"])
def test_a_failed_step_keeps_the_old_record(
    disk: BuiltinDisk, image: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    disk.write_state("old", 1)
    log = SyscallLog(monkeypatch)
    log.fail[step] = OSError(5, "Input/output error")
    with pytest.raises(DiskError):
        disk.write_state("new", 2)
    assert read_sidecar(sidecar_path(image)) == CopyState("old", 1)
    assert [p.name for p in image.parent.iterdir() if p.name.endswith(".tmp")] == []
    if step == "fdatasync":
        assert [c for c, _ in log.calls] == []  # no record written at all


def test_clear_state_unlinks_then_syncs_the_directory(
    disk: BuiltinDisk, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk.write_state("lin", 1)
    log = SyscallLog(monkeypatch)
    disk.clear_state()
    assert log.calls == [("unlink", str(sidecar_path(image))), ("fsync", str(image.parent))]
    assert disk.read_state() == CopyState()
    disk.clear_state()  # already gone: fine


def test_unreadable_sidecars_are_an_unknown_copy(image: Path) -> None:
    side = sidecar_path(image)
    for text in ("not json", "[1]", '{"lineage": 3, "epoch": 1}', '{"epoch": true}'):
        side.write_text(text)
        assert read_sidecar(side) == CopyState()
    cfg = KemariConfig(disk=DiskConfig(path=str(image)))
    assert read_disk_state(cfg) == {}
    assert builtin.disk_state_path(cfg) == side
