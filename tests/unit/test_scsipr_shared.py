"""``disk.fencing = "scsi-pr"``: the config key, and the shared backend's calls.

sg_persist is scripted here with the answers captured in the kernel lab
(tests/fixtures/scsipr); the real thing runs in tests/klab/test_iscsi_pr.py.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from kemari_suite.config import DiskConfig, KemariConfig, VMConfig, load, with_overrides
from kemari_suite.disk.base import DiskRole
from kemari_suite.disk.drbdadm import CommandResult
from kemari_suite.disk.factory import open_backend
from kemari_suite.disk.scsipr import SgPersist, format_key, host_key
from kemari_suite.disk.shared import SharedDiskBackend, SharedDiskConfig, create_shared_image
from kemari_suite.errors import ConfigError, DiskError

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "scsipr"


def write_config(tmp_path: Path, disk: str) -> Path:
    path = tmp_path / "kemari.toml"
    path.write_text(f'[vm]\nname = "kemari0"\n\n[disk]\n{disk}\n')
    return path


def test_scsi_pr_on_a_shared_disk_loads(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path, 'backend = "shared"\npath = "/dev/sdb"\nfencing = "scsi-pr"'))
    assert cfg.disk.fencing == "scsi-pr"
    assert KemariConfig().disk.fencing == ""  # the default: the lease or the tiebreaker


@pytest.mark.parametrize("backend", ["builtin", "drbd"])
def test_scsi_pr_needs_the_shared_backend(tmp_path: Path, backend: str) -> None:
    path = write_config(tmp_path, f'backend = "{backend}"\nfencing = "scsi-pr"')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "disk.fencing"
    assert 'needs backend = "shared"' in info.value.reason and backend in info.value.reason
    with pytest.raises(ConfigError, match=r"disk\.fencing"):
        with_overrides(KemariConfig(), disk={"backend": backend, "fencing": "scsi-pr"})


def test_an_unknown_fencing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write_config(tmp_path, 'backend = "shared"\nfencing = "scsi"'))
    assert info.value.key == "disk.fencing"
    assert "'scsi-pr'" in info.value.reason


class Scripted(SgPersist):
    """Answers READ RESERVATION from fixtures, in order; records every argv."""

    def __init__(self, *reservations: str) -> None:
        super().__init__()
        self.reservations = list(reservations)
        self.calls: list[tuple[str, ...]] = []

    def run(self, device: str, args: Sequence[str]) -> CommandResult:
        argv = ("sg_persist", *args, device)
        self.calls.append(argv)
        out = ""
        if "--read-reservation" in args:
            out = (FIX / f"{self.reservations.pop(0)}.txt").read_text()
        return CommandResult(argv, 0, out, "", 0.0)

    @property
    def verbs(self) -> list[str]:
        return [c[3] for c in self.calls]


def shared(tmp_path: Path, node: str, tools: Scripted) -> SharedDiskBackend:
    dev = create_shared_image(tmp_path / f"lun-{node}.img", 1 << 20)
    cfg = SharedDiskConfig(str(dev), "kemari0", fenced=False, scsi_pr=True)
    return SharedDiskBackend(cfg, node, pr_tools=tools)


def test_the_writer_registers_and_reserves(tmp_path: Path) -> None:
    tools = Scripted("read_reservation_none", "read_reservation_a")
    disk = shared(tmp_path, "l1a", tools)
    disk.attach()
    try:
        assert tools.calls == []  # attaching (a standby) changes nothing on the LUN
        disk.promote()
        assert disk.role is DiskRole.PRIMARY
        assert tools.verbs == ["--register-ignore", "--read-reservation", "--reserve",
                               "--read-reservation"]  # fmt: skip
        assert disk.status().detail["scsi_pr_key"] == format_key(host_key("l1a"))
        disk.apply([(0, b"written by the holder")])
        disk.demote()
        assert tools.verbs[-1] == "--release"
    finally:
        disk.close()


def test_the_standby_preempts_and_aborts_at_failover(tmp_path: Path) -> None:
    tools = Scripted("read_reservation_a", "read_reservation_b")
    disk = shared(tmp_path, "l1b", tools)
    disk.attach()
    try:
        disk.promote()
        assert tools.calls[2][3:-1] == (
            "--preempt-abort",
            f"--param-rk={format_key(host_key('l1b'))}",
            f"--param-sark={format_key(host_key('l1a'))}",
            "--prout-type=5",
        )
        assert disk.role is DiskRole.PRIMARY
    finally:
        disk.close()


def test_a_refused_promotion_keeps_the_role(tmp_path: Path) -> None:
    tools = Scripted("read_reservation_a", "read_reservation_a")  # the preempt did not take
    disk = shared(tmp_path, "l1b", tools)
    disk.attach()
    try:
        with pytest.raises(DiskError, match="not by us"):
            disk.promote()
        assert disk.role is DiskRole.SECONDARY
    finally:
        disk.close()


@pytest.mark.parametrize("step", ["apply", "flush"])
def test_a_write_refused_by_the_target_means_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    tools = Scripted("read_reservation_none", "read_reservation_a", "read_reservation_b")
    disk = shared(tmp_path, "l1a", tools)
    disk.attach()
    try:
        disk.promote()

        def refused(*args: object) -> None:
            # A buffered write on a preempted LUN fails at the flush, with EIO.
            raise DiskError("file", "fdatasync: Input/output error") from OSError(
                errno.EIO, "Input/output error"
            )

        monkeypatch.setattr(disk.disk, step, refused)
        with pytest.raises(DiskError, match="we are fenced") as info:
            disk.apply([(0, b"x")]) if step == "apply" else disk.flush()
        assert format_key(host_key("l1b")) in str(info.value)
        assert disk.role is DiskRole.SECONDARY
    finally:
        disk.close()


def test_other_errors_stay_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = Scripted("read_reservation_none", "read_reservation_a", "read_reservation_a")
    disk = shared(tmp_path, "l1a", tools)
    disk.attach()
    try:
        disk.promote()

        def failed(*args: object) -> None:
            raise DiskError("file", "fdatasync: Input/output error")

        monkeypatch.setattr(disk.disk, "flush", failed)
        with pytest.raises(DiskError, match="Input/output error"):
            disk.flush()
        assert disk.role is DiskRole.PRIMARY  # still ours: not fenced, just an I/O error
    finally:
        disk.close()


def test_factory_wires_scsi_pr_with_a_key_per_host(tmp_path: Path) -> None:
    dev = create_shared_image(tmp_path / "lun.img", 1 << 20)
    cfg = KemariConfig(
        vm=VMConfig(name="kemari0"),
        disk=DiskConfig(backend="shared", path=str(dev), fencing="scsi-pr"),
    )
    named = open_backend(cfg, node_id="alpha")
    assert isinstance(named, SharedDiskBackend) and named.pr is not None
    assert named.pr.key == host_key("alpha") and named.pr.device == str(dev)
    unnamed = open_backend(cfg)
    assert isinstance(unnamed, SharedDiskBackend) and unnamed.pr is not None
    assert unnamed.pr.key == host_key(socket.gethostname())
    plain = open_backend(with_overrides(cfg, disk={"fencing": ""}))
    assert isinstance(plain, SharedDiskBackend) and plain.pr is None
