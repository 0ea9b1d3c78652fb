"""FileDisk on temp files, and the DiskBackend protocol every backend satisfies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kemari_suite.disk.base import DiskBackend, DiskRole, FileDisk
from kemari_suite.disk.drbd import DrbdBackend, DrbdConfig, DrbdNode, DrbdTools
from kemari_suite.disk.shared import SharedDiskBackend, SharedDiskConfig
from kemari_suite.errors import DiskError


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * 1024))
    yield path
    path.unlink(missing_ok=True)


def test_apply_in_order_and_flush(image: Path) -> None:
    with FileDisk(image) as disk:
        assert disk.size == 64 * 1024
        assert disk.role is DiskRole.SECONDARY
        disk.apply([(0, b"aaaa"), (2, b"bb"), (65532, b"zzzz")])
        disk.flush()
        assert disk.read(0, 4) == b"aabb"  # the later write wins: order is kept
        st = disk.status()
        assert st.backend == "file" and st.up_to_date and not st.connected
        assert st.detail["size"] == 64 * 1024
    data = image.read_bytes()
    assert data[:4] == b"aabb" and data[-4:] == b"zzzz"


def test_offset_skips_a_reserved_head(image: Path) -> None:
    with FileDisk(image, offset=4096, size=8192) as disk:
        disk.apply([(0, b"guest")])
        with pytest.raises(DiskError, match="outside the 8192-byte disk"):
            disk.apply([(8190, b"abc")])
    data = image.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096:4101] == b"guest"


@pytest.mark.parametrize("write", [(-1, b"x"), (64 * 1024, b"x"), (64 * 1024 - 1, b"xy")])
def test_out_of_bounds_batch_is_refused_whole(image: Path, write: tuple[int, bytes]) -> None:
    with FileDisk(image) as disk:
        with pytest.raises(DiskError, match="outside"):
            disk.apply([(0, b"first"), write])
        assert disk.read(0, 5) == bytes(5)  # nothing of the batch was written


def test_errors(tmp_path: Path, image: Path) -> None:
    with pytest.raises(DiskError, match="cannot open"):
        FileDisk(tmp_path / "missing.img").attach()
    with pytest.raises(DiskError, match="neither a file nor a block device"):
        FileDisk(os.devnull).attach()
    with pytest.raises(DiskError, match="fewer than"):
        FileDisk(image, offset=1 << 20).attach()
    with pytest.raises(DiskError, match="fewer than"):
        FileDisk(image, size=1 << 20).attach()
    disk = FileDisk(image)
    with pytest.raises(DiskError, match="not attached"):
        disk.apply([(0, b"x")])
    with pytest.raises(DiskError, match="not attached"):
        disk.flush()


def test_roles_and_idempotent_attach(image: Path) -> None:
    disk = FileDisk(image)
    disk.attach()
    fd = disk._fd
    disk.attach()
    assert disk._fd == fd
    disk.promote()
    assert disk.status().role is DiskRole.PRIMARY
    disk.demote()
    assert disk.role is DiskRole.SECONDARY
    disk.close()
    assert disk.role is DiskRole.UNKNOWN and disk._fd is None
    with pytest.raises(OSError):
        os.fstat(fd)  # type: ignore[arg-type]


def test_every_backend_implements_the_protocol(tmp_path: Path, image: Path) -> None:
    cfg = DrbdConfig(
        "r0", (DrbdNode("a", "10.0.0.1", 0), DrbdNode("b", "10.0.0.2", 1)), disk="/dev/sdb"
    )
    backends = [
        FileDisk(image),
        DrbdBackend(cfg, "a", config_path=tmp_path / "r0.res", tools=DrbdTools(dry_run=True)),
        SharedDiskBackend(SharedDiskConfig(str(image), "r0"), "a"),
    ]
    for b in backends:
        assert isinstance(b, DiskBackend), type(b).__name__
        assert b.name in ("file", "drbd", "shared")
