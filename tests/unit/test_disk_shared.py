"""The shared-storage backend: two hosts on one temp "LUN", fenced by the lease."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.disk.base import DiskRole
from kemari_suite.disk.shared import (
    SHARED_RESERVED_BYTES,
    SharedDiskBackend,
    SharedDiskConfig,
    create_shared_image,
    format_shared,
)
from kemari_suite.errors import ConfigError, DiskError, LeaseError
from kemari_suite.ha.lease import Lease


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def lun(tmp_path: Path) -> Iterator[Path]:
    path = create_shared_image(tmp_path / "lun.img", 1 << 20)
    yield path
    path.unlink(missing_ok=True)


def backend(cfg: SharedDiskConfig, node: str, clock: FakeClock) -> SharedDiskBackend:
    lease = Lease(
        cfg.lease_path,
        resource=cfg.resource,
        lease_s=cfg.lease_s,
        io_timeout_s=cfg.io_timeout_s,
        offset=cfg.lease_offset,
        clock=clock,
        sleep=clock.sleep,
    )
    b = SharedDiskBackend(cfg, node, lease=lease)
    b.attach()
    return b


def test_failover_between_two_hosts(lun: Path) -> None:
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ca, cb = FakeClock(), FakeClock()
    a, b = backend(cfg, "alpha", ca), backend(cfg, "beta", cb)
    try:
        a.promote()
        a.apply([(0, b"from alpha"), (4096, b"block 1")])
        a.flush()
        with pytest.raises(LeaseError, match="held by alpha"):
            b.promote()
        with pytest.raises(DiskError, match="not the writer"):
            b.apply([(0, b"x")])
        st = b.status()
        assert st.connected and st.detail["owner"] == "alpha" and st.role is DiskRole.SECONDARY
        # alpha dies. Its own view lapses first, and it can no longer write.
        ca.t += cfg.lease_s
        with pytest.raises(LeaseError, match="refusing writes"):
            a.apply([(0, b"late write")])
        # beta watches the renew counter stand still for the lease period, then promotes.
        tie = b.tiebreaker()
        assert b.lease is not None
        b.lease.try_acquire("beta")
        cb.t += cfg.lease_s
        b.promote()
        assert b.status().role is DiskRole.PRIMARY
        b.apply([(10, b"beta")])
        b.flush()
        assert b.status().detail["generation"] == 2
        assert tie.node == "beta"
        # The old primary's renewal fails with the reason.
        with pytest.raises(LeaseError, match="now held by beta"):
            a.renew()
        assert a.status().role is DiskRole.SECONDARY
    finally:
        a.close()
        b.close()
    data = lun.read_bytes()
    head, guest = data[:SHARED_RESERVED_BYTES], data[SHARED_RESERVED_BYTES:]
    assert head[:8] == b"KEMLEASE"
    assert guest[:14] == b"from alphabeta"
    assert guest[4096:4103] == b"block 1"


def test_demote_releases_and_the_other_host_claims_at_once(lun: Path) -> None:
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ca, cb = FakeClock(), FakeClock()
    a, b = backend(cfg, "alpha", ca), backend(cfg, "beta", cb)
    try:
        a.promote()
        a.demote()
        assert a.status().detail["owner"] is None
        b.promote()
        assert b.status().detail["owner"] == "beta"
    finally:
        a.close()
        b.close()


def test_separate_lease_device(tmp_path: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(bytes(1 << 16))
    lease = tmp_path / "lease.img"
    lease.write_bytes(bytes(8192))
    cfg = SharedDiskConfig(str(data), "kemari0", lease_device=str(lease), lease_offset=4096)
    assert cfg.data_offset == 0
    format_shared(cfg)
    b = backend(cfg, "alpha", FakeClock())
    try:
        b.promote()
        b.apply([(0, b"guest block 0")])
    finally:
        b.close()
    assert data.read_bytes()[:13] == b"guest block 0"
    assert lease.read_bytes()[4096:4104] == b"KEMLEASE"


def test_unformatted_or_corrupted_lease_refuses_attach(lun: Path) -> None:
    cfg = SharedDiskConfig(str(lun), "kemari0")
    b = SharedDiskBackend(cfg, "alpha")
    with pytest.raises(LeaseError, match="not formatted"):
        b.attach()
    b.close()
    format_shared(cfg)
    with pytest.raises(LeaseError, match="already holds"):
        format_shared(cfg)
    with open(lun, "r+b") as f:
        f.seek(90)
        f.write(b"\x07")
    b = SharedDiskBackend(cfg, "alpha")
    try:
        with pytest.raises(LeaseError, match="checksum mismatch"):
            b.attach()
        st = b.status()
        assert not st.connected and "checksum" in st.detail["lease_error"]
    finally:
        b.close()


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"device": ""}, "shared.device"),
        ({"resource": ""}, "shared.resource"),
        ({"lease_offset": 100}, "shared.lease_offset"),
        ({"lease_offset": SHARED_RESERVED_BYTES}, "shared.lease_offset"),
        ({"lease_s": 1.0}, "shared.lease_s"),
        ({"io_timeout_s": 0}, "shared.io_timeout_s"),
    ],
)
def test_config_errors_name_the_field(kw: dict[str, object], key: str) -> None:
    args: dict[str, object] = {"device": "/dev/sdx", "resource": "kemari0"}
    args.update(kw)
    with pytest.raises(ConfigError) as info:
        SharedDiskConfig(**args)  # type: ignore[arg-type]
    assert info.value.key == key


def test_create_shared_image_refuses_to_overwrite(lun: Path) -> None:
    with pytest.raises(DiskError, match="cannot create"):
        create_shared_image(lun, 1024)
