"""The protect-time compatibility check (profile comparison, trial stand-ins) and the
mapping from agent events to operator alerts."""

from __future__ import annotations

from pathlib import Path

from kemari_suite.alerts import AlertKind
from kemari_suite.config import KemariConfig, with_overrides
from kemari_suite.disk import guest_disk_size
from kemari_suite.disk.shared import SHARED_RESERVED_BYTES
from kemari_suite.replica import compat
from kemari_suite.service.metrics import Artifacts, alert_for
from kemari_suite.vm import profile
from kemari_suite.vm.qemu import VMSpec


def _spec(tmp_path: Path, **kw: object) -> VMSpec:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd"
    if not kernel.exists():
        kernel.write_bytes(b"k" * 100)
        initrd.write_bytes(b"i" * 100)
    return VMSpec(name="web", kernel=kernel, initrd=initrd, **kw)  # type: ignore[arg-type]


def test_profile_lives_with_the_vm_and_compat_reexports_it() -> None:
    assert compat.vm_profile is profile.vm_profile


def test_shared_disk_size_excludes_the_lease_area(tmp_path: Path) -> None:
    img = tmp_path / "shared.img"
    img.write_bytes(bytes(SHARED_RESERVED_BYTES + 4096))
    cfg = with_overrides(KemariConfig(), disk={"path": str(img), "backend": "shared"})
    assert guest_disk_size(cfg) == 4096
    missing = with_overrides(cfg, disk={"path": str(tmp_path / "nope")})
    assert guest_disk_size(missing) == -1


def test_compat_check_records_the_profile_verdict(tmp_path: Path) -> None:
    cfg = KemariConfig()
    problems: list[str] = []
    check = compat.CompatCheck(
        cfg,
        _spec(tmp_path, memory_mib=128),
        tmp_path / "ram",
        Artifacts(tmp_path / "art"),
        on_problem=problems.append,
    )
    ok = check.check_profile(compat.profile_here(cfg, _spec(tmp_path, memory_mib=128)))
    assert ok["ok"] and check.results["profile"] == "ok" and check.trial_pending
    assert check.restore_failure is None
    check.trial_pending = False
    bad = check.check_profile(compat.profile_here(cfg, _spec(tmp_path, memory_mib=256)))
    assert not bad["ok"] and "vm.memory_mib" in bad["reason"]
    assert check.results["profile"] == "refused" and not check.trial_pending
    check.results["restore"] = {"ok": False, "stage": "restore", "reason": "bad machine"}
    assert check.restore_failure == "bad machine"


def test_identical_profiles_pass(tmp_path: Path) -> None:
    cfg = KemariConfig()
    p = compat.profile_here(cfg, _spec(tmp_path))
    cmp = compat.compare(p, dict(p))
    assert cmp.ok and cmp.differences == [] and cmp.notes == []


def test_memory_mismatch_names_the_field(tmp_path: Path) -> None:
    cfg = KemariConfig()
    primary = compat.profile_here(cfg, _spec(tmp_path, memory_mib=256))
    here = compat.profile_here(cfg, _spec(tmp_path, memory_mib=128))
    cmp = compat.compare(primary, here)
    assert not cmp.ok
    assert cmp.differences == ["vm.memory_mib: primary has 256, this host 128"]


def test_kernel_content_and_machine_differ(tmp_path: Path) -> None:
    cfg = KemariConfig()
    primary = compat.profile_here(cfg, _spec(tmp_path))
    (tmp_path / "vmlinuz").write_bytes(b"other kernel")
    here = compat.profile_here(cfg, _spec(tmp_path, machine="pc-q35-7.2"))
    keys = {d.split(":")[0] for d in compat.compare(primary, here).differences}
    assert keys == {"vm.machine", "image.kernel (content)"}


def test_missing_disk_and_size(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 8192)
    cfg = with_overrides(KemariConfig(), disk={"path": str(disk), "backend": "builtin"})
    primary = compat.profile_here(cfg, _spec(tmp_path))
    assert primary["disk_size"] == 8192
    disk.unlink()
    here = compat.profile_here(cfg, _spec(tmp_path))
    diffs = compat.compare(primary, here).differences
    assert diffs == ["disk.path (size): the disk is missing on this host"]


def test_qemu_version_is_a_note_not_a_refusal(tmp_path: Path) -> None:
    cfg = KemariConfig()
    p = compat.profile_here(cfg, _spec(tmp_path))
    other = dict(p, qemu="8.0.0")
    cmp = compat.compare(other, p)
    assert cmp.ok and len(cmp.notes) == 1 and "trial restore" in cmp.notes[0]


def test_trial_stand_ins(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    cfg = with_overrides(KemariConfig(), disk={"path": str(disk)})
    tap = compat._trial_spec(cfg, _spec(tmp_path, netdev="tap,ifname=kt0,script=no"))
    assert tap.netdev is not None and tap.netdev.startswith("tap,ifname=kchk")
    assert "kt0" not in tap.netdev
    assert tap.blockdev == "driver=null-co,size=4096"
    assert tap.incoming and tap.name == "web-check"
    proxied = with_overrides(cfg, tap={"host_tap": "kt0"})
    assert compat._trial_spec(proxied, _spec(tmp_path)).netdev == "hubport,hubid=0"
    bare = compat._trial_spec(KemariConfig(), _spec(tmp_path))
    assert bare.netdev is None and bare.blockdev is None


def test_alerts_from_events() -> None:
    assert alert_for("state", {"state": "unprotected", "reason": "x"}) == (
        AlertKind.UNPROTECTED,
        "x",
    )
    assert alert_for("state", {"state": "syncing"}) is None
    assert alert_for("state", {"state": "active", "reason": "resumed"})[0] is AlertKind.FAILOVER  # type: ignore[index]
    kind, _ = alert_for("failover-failed", {"reason": "diverged copies, not resuming"})  # type: ignore[misc]
    assert kind is AlertKind.SPLIT_BRAIN
    kind, _ = alert_for("failover-refused", {"reason": "no tiebreaker"})  # type: ignore[misc]
    assert kind is AlertKind.FAILOVER_REFUSED
    assert alert_for("checkpoint", {}) is None


def test_qemu_pause_from_event_timestamps() -> None:
    from kemari_suite.service.metrics import qemu_pause

    def ev(name: str, t: float) -> dict[str, object]:
        return {"event": name, "timestamp": {"seconds": int(t), "microseconds": round(t % 1 * 1e6)}}

    events = [ev("STOP", 99.0), ev("RESUME", 99.5), ev("STOP", 100.010), ev("RESUME", 100.025)]
    got = qemu_pause(events, since=100.0)
    assert got is not None
    assert abs(got[0] - 100.010) < 1e-6 and abs(got[1] - 0.015) < 1e-6
    assert qemu_pause(events[:3], since=100.0) is None  # RESUME not seen yet
    assert qemu_pause([{"event": "STOP"}], since=0) is None
