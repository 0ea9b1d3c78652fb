"""The protect demo on an iSCSI LUN, its pure parts: the engine's config for the LUN, the
fencing verdict, the reservation read after the loss, the offline record count, and
what the demo's JSON and the campaign's report say. The demo itself runs in the kernel
lab (tests/klab/test_iscsi_protect.py, make e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kemari_suite.cli.klab import KERNEL_LAB_DISKS, protect_demo_result
from kemari_suite.config import PathsConfig
from kemari_suite.disk.scsipr import PrKeys, PrReservation, format_key, host_key
from kemari_suite.errors import ConfigError, LabError
from kemari_suite.klab.campaign import Trial, write_report
from kemari_suite.klab.engine import EngineSpec, check_tree, disk_tree, l1_trees
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.iscsi import IscsiLab, IscsiLabSpec
from kemari_suite.klab.iscsidemo import (
    ISCSI_NESTED_PACKAGES,
    FenceCheck,
    count_valid,
    reservation_after,
)
from kemari_suite.klab.kvmrecords import _FNV_OFFSET, RECORD_MAGIC, RECORD_SIZE, _fnv1a
from kemari_suite.klab.protectdemo import ProtectRun, ProtectScenario

ADDRESSES = ("10.98.7.1", "10.98.7.2")
SPEC = EngineSpec("t7", 7, "/work/main", "/k", "/i", disk_backend="iscsi",
                  lun_devices=("/dev/sda", "/dev/sdb"))  # fmt: skip


def test_the_lun_is_the_shared_backend_fenced_by_scsi_pr_on_each_hosts_device(
    tmp_path: Path,
) -> None:
    trees = l1_trees(SPEC, ADDRESSES)
    for role, dev in (("primary", "/dev/sda"), ("secondary", "/dev/sdb")):
        disk = trees[role]["disk"]
        assert disk["backend"] == "shared" and disk["fencing"] == "scsi-pr"
        assert disk["path"] == dev
        # The witness breaks ties: no lease, so the backend is unfenced but for scsi-pr.
        assert trees[role]["replication"]["tiebreaker"] == "witness"
        cfg = check_tree(trees[role], tmp_path / f"{role}.toml")
        assert (cfg.disk.backend, cfg.disk.path, cfg.disk.fencing) == ("shared", dev, "scsi-pr")


def test_the_lun_needs_both_devices_and_unknown_disks_are_refused() -> None:
    with pytest.raises(ConfigError, match="LUN"):
        disk_tree(EngineSpec("t7", 7, "/w", "/k", "/i", disk_backend="iscsi"), "primary")
    with pytest.raises(ConfigError, match="nfs"):
        disk_tree(EngineSpec("t7", 7, "/w", "/k", "/i", disk_backend="nfs"), "primary")
    builtin = disk_tree(EngineSpec("t7", 7, "/w", "/k", "/i"), "secondary")
    assert builtin["backend"] == "builtin" and builtin["path"].endswith("disk-secondary.img")


OLD, NEW = format_key(host_key("l1a")), format_key(host_key("l1b"))


def fence(**kw: object) -> FenceCheck:
    base: dict[str, object] = {
        "old_key": OLD,
        "keys_after": (NEW,),
        "holder_after": NEW,
        "restart_s": 40.0,
        "device": "/dev/sda",
        "write_rc": 1,
        "write_error": "dd: error writing '/dev/sda': Invalid exchange",
        "conflicts_logged": 2,
        "old_key_reserve_rc": 24,
    }
    return FenceCheck(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"keys_after": (OLD, NEW)},  # the old key is still registered
        {"holder_after": OLD},  # the old primary still holds the reservation
        {"holder_after": ""},  # nobody holds it
        {"write_rc": 0},  # the target took the old primary's write
        {"conflicts_logged": 0},  # refused, but not for a reservation conflict
        {"old_key_reserve_rc": 0},  # the old key could still reserve
        {"old_key_reserve_rc": 255},  # the reservation command never reached the target
        {"old_key": ""},  # the old key was never read
    ],
)
def test_fenced_needs_the_key_gone_and_the_target_refusing(change: dict[str, object]) -> None:
    assert fence().fenced is True
    assert fence().as_dict()["fenced"] is True
    assert fence(**change).fenced is False


def test_the_reservation_after_the_loss_names_its_holder() -> None:
    before = {"keys_before": [OLD], "holder_before": OLD, "type_before": 5}
    keys = PrKeys(generation=4, keys=(host_key("l1b"),))
    held = PrReservation(generation=4, key=host_key("l1b"), type=5)
    r = reservation_after(before, keys, held, host_key("l1b"))
    assert r["holder_before"] == OLD and r["keys_after"] == [NEW]
    assert r["holder_after"] == NEW and r["held_by_survivor"] is True
    # A killed standby: the primary (the survivor) keeps it.
    assert reservation_after(before, PrKeys(2, (host_key("l1a"),)),
                             PrReservation(2, host_key("l1a"), 5),
                             host_key("l1a"))["held_by_survivor"]  # fmt: skip
    # Nobody holds it after the loss: not the survivor.
    nobody = reservation_after(before, PrKeys(5, ()), PrReservation(5, None, None), host_key("l1b"))
    assert nobody["holder_after"] == "" and nobody["held_by_survivor"] is False


def record(n: int) -> bytes:
    """Record ``n`` as guest/workloads/records.c writes it."""
    head = RECORD_MAGIC + n.to_bytes(8, "little")
    body = bytes((n + i) % 251 for i in range(RECORD_SIZE - 32))
    total = _fnv1a(_fnv1a(_FNV_OFFSET, head), body)
    return head + total.to_bytes(8, "little") + body


def reader(disk: bytes, calls: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    def read(first: int, count: int) -> bytes:
        calls.append((first, count))
        return disk[first * RECORD_SIZE : (first + count) * RECORD_SIZE]

    return read


def test_records_are_counted_chunk_by_chunk_up_to_the_first_invalid_one() -> None:
    disk = b"".join(record(n) for n in range(7)) + bytes(RECORD_SIZE) + record(8)
    calls: list[tuple[int, int]] = []
    assert count_valid(reader(disk, calls), limit=100, chunk=3) == 7
    assert calls == [(0, 3), (3, 3), (6, 3)]  # stops in the chunk of the first bad one
    assert count_valid(reader(disk, []), limit=5, chunk=3) == 5  # at most the limit
    assert count_valid(reader(disk[: 4 * RECORD_SIZE], []), limit=100, chunk=3) == 4  # disk end
    swapped = record(1) + record(0)
    assert count_valid(reader(swapped, []), limit=10) == 0  # record n must sit at n


def test_ok_needs_the_old_primary_fenced_and_the_survivor_holding_the_reservation() -> None:
    def run(**kw: object) -> ProtectRun:
        r = ProtectRun(disk_backend="iscsi", resumed=True, protected=True, records_acked=30,
                       records_found=30, wrote_after_resume=True)  # fmt: skip
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    assert run(fenced=True, reservation={"held_by_survivor": True}).ok
    assert not run(fenced=False, reservation={"held_by_survivor": True}).ok
    assert not run(fenced=True, reservation={"held_by_survivor": False}).ok
    # A killed standby: no old primary to fence, the primary keeps the reservation.
    assert run(victim="secondary", fenced=None, reservation={"held_by_survivor": True}).ok
    assert run().ok  # the other disks have neither


def test_the_demo_json_leads_with_fenced_for_iscsi() -> None:
    assert "iscsi" in KERNEL_LAB_DISKS
    r = ProtectRun(disk_backend="iscsi", fenced=True).as_dict()
    keys = list(protect_demo_result(r))
    assert keys[:7] == ["resumed", "accel", "disk_backend", "records_acked", "records_lost",
                        "failover_ms", "fenced"]  # fmt: skip
    assert "fenced" not in list(protect_demo_result(ProtectRun().as_dict()))[:7]


def test_the_lab_gives_the_hosts_the_tree_and_eth1_never_the_storage(tmp_path: Path) -> None:
    spec = IscsiLabSpec("t9", slot=9, memory_mib=1024, storage_memory_mib=512, share="/w",
                        lan=True)  # fmt: skip
    storage, a, b = spec.l1_specs()
    assert (storage.memory_mib, storage.lan, storage.share) == (512, False, "")
    assert (a.memory_mib, a.lan, a.share) == (1024, True, "/w") and b.lan
    assert IscsiLabSpec("t9").l1_specs()[0].memory_mib == 512  # as the hosts by default
    image = HostImage(tmp_path / "disk.img", tmp_path / "vmlinuz", "6.1", "k", cached=True)
    lab = IscsiLab(spec, image, lab_dir=tmp_path, run_root=tmp_path, shm_dir=tmp_path)
    pair = lab.pair
    assert pair[0] is lab.a and pair[1] is lab.b and lab.storage not in pair.hosts
    assert pair.spec.address(0) == "10.98.9.1" and pair.spec.address(1) == "10.98.9.2"
    # The demo's disk is the LUN: without one, prepare refuses before touching an L1.
    paths = PathsConfig(cache_dir=tmp_path, run_dir=tmp_path, shm_dir=tmp_path)
    sc = ProtectScenario(pair, tmp_path / "work", paths)
    with pytest.raises(LabError, match="LUN"):
        sc.prepare(object(), "/w", disk_backend="iscsi")  # type: ignore[arg-type]


def test_the_image_has_qemu_and_the_initiator() -> None:
    assert {"qemu-system-x86", "open-iscsi", "sg3-utils"} <= set(ISCSI_NESTED_PACKAGES)


def test_the_iscsi_report_has_a_fenced_column(tmp_path: Path) -> None:
    trials = [
        Trial(n=0, backend="iscsi", victim="primary", acks=10, ok=True,
              run={"resumed": True, "records_acked": 12, "records_found": 13,
                   "records_offline": 13, "fenced": True, "failover_ms": 19000.0}),
        Trial(n=1, backend="iscsi", victim="secondary", acks=20, ok=True,
              run={"resumed": True, "records_acked": 22, "records_found": 40,
                   "records_offline": 41, "fenced": None}),
    ]  # fmt: skip
    md = write_report(trials, tmp_path, "iscsi", ["# head"]).read_text()
    assert "| old primary fenced |" in md and "iSCSI: a third L1 serves the LUN" in md
    assert "| 0 | primary | 10 | 12 | 13 | 13 | 19000.0 | yes | yes |" in md
    assert "| 1 | secondary | 20 | 22 | 40 | 41 | - | - | yes |" in md
    assert "fenced" not in write_report(trials, tmp_path, "builtin", ["# h"]).read_text()
