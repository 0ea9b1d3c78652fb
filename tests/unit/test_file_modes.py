"""Files the agents write are 0600, folders they create 0700, whatever the umask of the
process that writes them (a wide umask is set on purpose in each test)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kemari_suite.config import KemariConfig, PathsConfig
from kemari_suite.protocol import wire
from kemari_suite.protocol.codec import PageEncoder
from kemari_suite.protocol.files import (
    mkdir_owner_only,
    open_owner_only,
    set_owner_only_umask,
    write_owner_only,
)
from kemari_suite.replica.store import ReplicaStore
from kemari_suite.service.metrics import Artifacts, CheckpointMetrics
from kemari_suite.vm.guestram import create_ram_file


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def wide_umask() -> Iterator[None]:
    old = os.umask(0o000)  # would give 0666 files and 0777 folders
    try:
        yield
    finally:
        os.umask(old)


def test_set_owner_only_umask_returns_the_old_one() -> None:
    old = os.umask(0o022)
    try:
        assert set_owner_only_umask() == 0o022
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(old)


@pytest.mark.usefixtures("wide_umask")
@pytest.mark.parametrize("mode", ["w", "a", "wb", "ab", "x", "r+"])
def test_open_owner_only_new_file(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "f"
    with open_owner_only(p, mode) as f:
        f.write(b"x" if "b" in mode else "x")
    assert _mode(p) == 0o600


@pytest.mark.usefixtures("wide_umask")
def test_open_owner_only_narrows_an_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("old")
    os.chmod(p, 0o644)
    with open_owner_only(p, "a") as f:
        f.write("new")
    assert _mode(p) == 0o600 and p.read_text() == "oldnew"


def test_open_owner_only_rejects_read_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported mode"):
        open_owner_only(tmp_path / "f", "r")


@pytest.mark.usefixtures("wide_umask")
@pytest.mark.parametrize("durable", [False, True])
def test_write_owner_only_replaces_atomically(tmp_path: Path, durable: bool) -> None:
    p = tmp_path / "status.json"
    p.write_text("old")
    os.chmod(p, 0o666)
    write_owner_only(p, "new", durable=durable)
    assert p.read_text() == "new" and _mode(p) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["status.json"]


@pytest.mark.usefixtures("wide_umask")
def test_mkdir_owner_only_new_folders_and_leaves_existing(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    d = mkdir_owner_only(tmp_path / "a" / "b")
    assert _mode(tmp_path / "a") == 0o700 and _mode(d) == 0o700
    assert _mode(tmp_path) == 0o755  # not ours: untouched
    mkdir_owner_only(d)  # exists: fine


@pytest.mark.usefixtures("wide_umask")
def test_artifacts_are_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "artifacts" / "run1"
    art = Artifacts(root)
    art.event("state", state="protected")
    art.checkpoint(CheckpointMetrics(1, "t", 1.0, 0, 0, 0, 0, 0, 0, 0))
    art.status({"state": "protected"})
    art.close()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["checkpoints.jsonl", "events.jsonl", "status.json"]
    for p in root.iterdir():
        assert _mode(p) == 0o600, p
    assert _mode(root) == 0o700 and _mode(root.parent) == 0o700


@pytest.mark.usefixtures("wide_umask")
def test_ram_file_is_owner_only(tmp_path: Path) -> None:
    p = tmp_path / "shm" / "kemari-g.ram"
    create_ram_file(p, 16 * 4096)
    assert _mode(p) == 0o600 and p.stat().st_size == 16 * 4096
    # Recreated over a stale file with a wide mode: narrowed, and emptied to zeros.
    os.chmod(p, 0o666)
    p.write_bytes(b"\x01" * 4096)
    create_ram_file(p, 2 * 4096)
    assert _mode(p) == 0o600 and p.read_bytes() == bytes(2 * 4096)


@pytest.mark.usefixtures("wide_umask")
def test_replica_ram_and_committed_devstate_are_owner_only(tmp_path: Path) -> None:
    n = 4
    paths = PathsConfig(cache_dir=tmp_path, run_dir=tmp_path / "run", shm_dir=tmp_path / "shm")
    cfg = KemariConfig(paths=paths)
    run_dir = tmp_path / "run" / "kemari-g"
    ram = tmp_path / "shm" / "kemari-g.ram"
    art = Artifacts(tmp_path / "art")
    store = ReplicaStore(cfg, ram, run_dir, n, art)
    store.open()
    try:
        assert _mode(ram) == 0o600 and _mode(ram.parent) == 0o700
        idx = np.arange(n, dtype=np.int64)
        new = np.full((n, 4096), 7, dtype=np.uint8)
        parts = [
            wire.Pages(epoch=1, encoded=PageEncoder("zstd").encode(idx, new, None)),
            wire.DeviceState(epoch=1, data=b"device-state"),
        ]
        dg = wire.EpochDigest(1)
        for m in parts:
            dg.update(m)

        async def one_epoch() -> int:
            await store.begin(
                wire.EpochBegin(
                    epoch=1, kind=wire.EpochKind.FULL, ram_size=n * 4096, page_size=4096
                )
            )
            await store.pages(parts[0])  # type: ignore[arg-type]
            await store.device_state(parts[1])  # type: ignore[arg-type]

            async def after(_e: int, _d: bytes) -> None:
                return None

            end = wire.EpochEnd(epoch=1, n_pages=n, digest=dg.digest())
            return await store.end(end, after)

        assert asyncio.run(one_epoch()) == 1
        committed = run_dir / "devstate.committed"
        assert committed.read_bytes() == b"device-state"
        assert _mode(committed) == 0o600 and _mode(run_dir) == 0o700
        assert [p.name for p in run_dir.iterdir()] == ["devstate.committed"]
    finally:
        store.close(keep_file=False)
        art.close()


@pytest.mark.usefixtures("wide_umask")
def test_devstate_socket_is_owner_only(tmp_path: Path) -> None:
    from kemari_suite.vm.devstate import DeviceStateCapturer

    sock = tmp_path / "devstate.sock"
    cap = DeviceStateCapturer(None, sock)  # type: ignore[arg-type]
    try:
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert _mode(sock) & 0o077 == 0
        # Its owner still connects.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(sock))
    finally:
        cap.close()


@pytest.mark.usefixtures("wide_umask")
def test_builtin_disk_sidecar_and_full_copy_are_owner_only(tmp_path: Path) -> None:
    from kemari_suite.disk.base import CopyState
    from kemari_suite.disk.builtin import BuiltinDisk, write_sidecar

    image = tmp_path / "disk.img"
    with open_owner_only(image, "wb") as f:
        f.truncate(1 << 20)
    # A stale temporary sidecar with a wide mode: narrowed, not kept.
    sidecar = tmp_path / "disk.img.kemari.json"
    stale = sidecar.with_name(f".{sidecar.name}.tmp")
    stale.write_text("{}")
    os.chmod(stale, 0o666)
    write_sidecar(sidecar, CopyState("L", 3))
    assert _mode(sidecar) == 0o600
    disk = BuiltinDisk(image)
    disk.attach()
    try:
        disk.begin_copy(full=True)
        assert _mode(disk.next_path) == 0o600
        disk.commit_copy("L2", 4)
        assert _mode(image) == 0o600 and _mode(disk.state_path) == 0o600
    finally:
        disk.close()


@pytest.mark.usefixtures("wide_umask")
def test_trial_restore_ram_copy_is_owner_only(tmp_path: Path) -> None:
    from kemari_suite.replica.compat import copy_replica

    src = tmp_path / "replica.ram"
    src.write_bytes(b"\x05" * 8192)
    dst = tmp_path / "shm" / "kemari-g-check.ram"
    copy_replica(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert _mode(dst) == 0o600 and _mode(dst.parent) == 0o700
