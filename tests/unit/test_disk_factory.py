"""open_backend: every backend kind from a config, through the DiskBackend contract only."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kemari_suite.config import DiskConfig, KemariConfig, ReplicationConfig, VMConfig
from kemari_suite.disk import DiskBackend, DiskCaps, DiskRole, guest_disk_size, open_backend
from kemari_suite.disk.drbd import DrbdTools
from kemari_suite.disk.factory import drbd_resource_name
from kemari_suite.disk.shared import (
    SHARED_RESERVED_BYTES,
    SharedDiskConfig,
    create_shared_image,
    format_shared,
)
from kemari_suite.errors import ConfigError, DiskError, LeaseError
from kemari_suite.ha.lease import Lease
from kemari_suite.tap.backend import BlockBackend

MIB = 1 << 20


def config(backend: str, path: Path | str, **disk: object) -> KemariConfig:
    return KemariConfig(
        vm=VMConfig(name="kemari0"),
        disk=DiskConfig(backend=backend, path=str(path), **disk),  # type: ignore[arg-type]
    )


def opened(cfg: KemariConfig, **kw: object) -> DiskBackend:
    backend = open_backend(cfg, **kw)  # type: ignore[arg-type]
    assert backend is not None
    assert isinstance(backend, DiskBackend) and isinstance(backend, BlockBackend)
    return backend


def write_through(disk: DiskBackend, offset: int, data: bytes, *, size: int | None = None) -> None:
    """Attach, promote, write ``data`` at guest ``offset`` and close ``disk``."""
    disk.attach()
    try:
        if size is not None:
            assert disk.size == size
        disk.promote()
        disk.apply([(offset, data)])
        disk.flush()
        assert disk.read(offset, len(data)) == data
    finally:
        disk.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_no_disk_is_none_and_a_missing_image_a_config_error(tmp_path: Path) -> None:
    assert open_backend(KemariConfig()) is None
    for kind in ("builtin", "shared"):
        with pytest.raises(ConfigError) as info:
            open_backend(config(kind, tmp_path / "missing.img"))
        assert info.value.key == "disk.path"


def test_builtin_from_config(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MIB))
    disk = opened(config("builtin", image), role=DiskRole.SECONDARY)
    assert disk.name == "builtin"
    assert disk.caps == DiskCaps(streams_copy=True, tracks_dirty=True, has_sidecar=True)
    disk.attach()
    try:
        assert disk.size == MIB and disk.status().role is DiskRole.SECONDARY
        disk.promote()
        assert disk.status().role is DiskRole.PRIMARY
        disk.apply([(4096, b"committed")])
        disk.flush()
        assert disk.read(4096, 9) == b"committed"
        assert disk.copy_chunks()[0] == (0, MIB)
        assert disk.read_state().known is False
        disk.write_state("abc", 7)
        assert disk.read_state().to_dict() == {"lineage": "abc", "epoch": 7}
    finally:
        disk.close()
    assert image.read_bytes()[4096:4105] == b"committed"


def test_shared_unfenced_without_a_node_id(tmp_path: Path) -> None:
    """No node id (or no lease tiebreaker): the device is written past its reserved
    head, and the engine's tiebreaker alone fences the writer (as before the backend)."""
    dev = create_shared_image(tmp_path / "lun.img", MIB)
    disk = opened(config("shared", dev))
    assert disk.name == "shared"
    assert disk.caps == DiskCaps(replays_log=True, reserved_bytes=SHARED_RESERVED_BYTES)
    disk.attach()
    try:
        assert disk.size == MIB
        with pytest.raises(DiskError, match="not the writer"):
            disk.apply([(0, b"x")])
        disk.promote()
        disk.apply([(0, b"guest block 0")])
        disk.flush()
        assert disk.read(0, 13) == b"guest block 0"
        assert disk.status().connected
        with pytest.raises(DiskError, match="no lease"):
            disk.tiebreaker()
    finally:
        disk.close()
    data = dev.read_bytes()
    assert data[SHARED_RESERVED_BYTES : SHARED_RESERVED_BYTES + 13] == b"guest block 0"
    assert data[:SHARED_RESERVED_BYTES] == bytes(SHARED_RESERVED_BYTES)


def test_shared_with_a_separate_lease_device_has_no_reserved_head(tmp_path: Path) -> None:
    dev = tmp_path / "data.img"
    dev.write_bytes(bytes(MIB))
    lease = tmp_path / "lease.img"
    lease.write_bytes(bytes(MIB))
    disk = opened(config("shared", dev, lease_device=str(lease)))
    assert disk.caps.reserved_bytes == 0 and not disk.caps.lease
    # The guest's data starts at the device's first byte (no reserved head) ...
    write_through(disk, 0, b"data at 0")
    assert dev.read_bytes()[:9] == b"data at 0"
    assert lease.read_bytes()[:9] != b"data at 0"
    # ... and past the reserved head when the lease lives on the data device.
    lun = create_shared_image(tmp_path / "lun.img", MIB)
    disk = opened(config("shared", lun))
    assert disk.caps.reserved_bytes == SHARED_RESERVED_BYTES
    write_through(disk, 0, b"data at 1M", size=MIB)
    data = lun.read_bytes()
    assert data[SHARED_RESERVED_BYTES : SHARED_RESERVED_BYTES + 10] == b"data at 1M"
    assert data[:10] != b"data at 1M"
    # What the VM profile compares: the guest-visible size.
    assert guest_disk_size(config("shared", lun)) == MIB
    assert guest_disk_size(config("shared", dev, lease_device=str(lease))) == MIB
    assert guest_disk_size(config("builtin", lun)) == MIB + SHARED_RESERVED_BYTES
    assert guest_disk_size(config("drbd", tmp_path / "absent")) == -1
    assert guest_disk_size(KemariConfig()) == 0


def test_shared_fenced_by_the_lease_tiebreaker(tmp_path: Path) -> None:
    dev = create_shared_image(tmp_path / "lun.img", MIB)
    cfg = replace(
        config("shared", dev, lease_device=str(dev)),
        replication=ReplicationConfig(tiebreaker="lease"),
    )
    format_shared(SharedDiskConfig(str(dev), "kemari0"))
    clock = FakeClock()
    lease = Lease(
        dev, resource="kemari0", lease_s=3.0, io_timeout_s=0.75, clock=clock, sleep=clock.sleep
    )
    disk = opened(cfg, node_id="alpha", lease=lease)
    assert disk.caps.lease and disk.caps.reserved_bytes == SHARED_RESERVED_BYTES
    disk.attach()
    try:
        disk.promote()  # claims the free lease
        assert disk.tiebreaker().lease is lease
        disk.apply([(0, b"fenced")])
        clock.t += 10  # never renewed: our view of the lease ran out
        with pytest.raises(LeaseError, match="lapsed"):
            disk.apply([(0, b"late")])
    finally:
        disk.close()
    # With a node id and the lease tiebreaker the backend makes its own lease object.
    own = opened(cfg, node_id="alpha")
    assert own.caps.lease
    with pytest.raises(ConfigError, match="node id"):
        open_backend(cfg, lease=lease)


def test_drbd_from_config_in_dry_run(tmp_path: Path) -> None:
    """The DRBD device is the configured path; the resource file exists (the playbooks
    wrote it): attach adjusts, promote makes this host Primary and opens the device."""
    dev = tmp_path / "drbd0"
    dev.write_bytes(bytes(1 << 16))
    tools = DrbdTools(dry_run=True)
    disk = opened(config("drbd", dev), drbd_tools=tools)
    assert disk.name == "drbd" and disk.caps == DiskCaps(replays_log=True)
    disk.attach()
    assert disk.size == 1 << 16
    disk.promote()
    disk.apply([(512, b"replicated")])
    disk.flush()
    assert disk.read(512, 10) == b"replicated"
    disk.demote()
    with pytest.raises(DiskError, match="not primary"):
        disk.apply([(0, b"x")])
    disk.close()
    conf = "/etc/drbd.d/kemari0.res"
    # The module's dialect is asked first (a dry run names none: the "9" default).
    assert tools.recorded == [
        ("drbdadm", "--version"),
        ("drbdadm", "-c", conf, "adjust", "kemari0"),
        ("drbdadm", "-c", conf, "primary", "kemari0"),
        ("drbdadm", "-c", conf, "secondary", "kemari0"),
    ]
    assert dev.read_bytes()[512:522] == b"replicated"


def test_drbd_resource_name_and_missing_device() -> None:
    assert drbd_resource_name(config("drbd", "/dev/drbd/by-res/vm7/0")) == "vm7"
    assert drbd_resource_name(config("drbd", "/dev/drbd3")) == "kemari0"
    # The device appears only with `drbdadm up`: no existence check at open.
    disk = opened(config("drbd", "/dev/drbd/by-res/vm7/0"), drbd_tools=DrbdTools(dry_run=True))
    disk.attach()
    assert disk.size == 0  # not known before promotion
    with pytest.raises(DiskError):
        disk.promote()


def test_capability_methods_do_nothing_without_the_capability(tmp_path: Path) -> None:
    dev = create_shared_image(tmp_path / "lun.img", MIB)
    disk = opened(config("shared", dev))
    disk.attach()
    disk.tracking = True
    disk.promote()
    disk.apply([(0, b"x")])
    assert disk.dirty_chunks() == [] and disk.copy_chunks() == []
    assert disk.read_state().known is False
    disk.write_state("abc", 1)  # no sidecar: nothing written
    assert not Path(str(dev) + ".kemari.json").exists()
    with pytest.raises(DiskError, match="streamed copy"):
        disk.begin_copy(full=True)
    disk.close()


def test_a_block_device_that_refuses_to_open_is_sized_from_sysfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A DRBD 8.4 Secondary refuses open() (the module is not on this machine: the refusal
    # is simulated for a real block device); the kernel's sysfs entry still has its size.
    import errno
    import os

    from kemari_suite.disk import base

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    assert base.device_size(image) == 4096
    assert base.device_size(tmp_path / "missing") is None
    blk = next((p for p in Path("/dev").iterdir() if p.is_block_device()), None)
    if blk is None:
        pytest.skip("no block device node in /dev")
    st = os.stat(blk)
    sysfs = tmp_path / "sys"
    entry = sysfs / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    entry.mkdir(parents=True)
    (entry / "size").write_text("2048\n")
    real_open = os.open

    def refuse(path, *args, **kw):  # type: ignore[no-untyped-def]
        if str(path) == str(blk):
            raise OSError(errno.EMEDIUMTYPE, "Wrong medium type", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(base.os, "open", refuse)
    assert base.device_size(blk, sysfs=sysfs) == 2048 * 512
    (entry / "size").write_text("garbage")
    assert base.device_size(blk, sysfs=sysfs) is None
    # Not a block device and not openable: no size.
    assert base.device_size(tmp_path / "missing", sysfs=sysfs) is None
