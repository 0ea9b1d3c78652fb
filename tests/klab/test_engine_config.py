"""Kemari's engine in the L1s, on paper: the shared tree and the LAN NIC on the L1's
QEMU line, the role configs (the host lab's renderer with the L1's values over it, loaded
by the suite's own loader), the commands run in the L1, and what makes a run ``ok``.
Nothing is started."""

from __future__ import annotations

from pathlib import Path

from kemari_suite.cli.klab import protect_demo_result
from kemari_suite.config import PathsConfig
from kemari_suite.klab.engine import (
    FENCE_PEER_LOG,
    GUEST_IP,
    TAP,
    EngineSpec,
    check_tree,
    fence_peer_calls,
    fence_peer_script,
    l1_trees,
    witness_port,
    witness_tree,
)
from kemari_suite.klab.host import l1_vm_spec, lan_mac
from kemari_suite.klab.image import HostImage
from kemari_suite.klab.pair import PairSpec
from kemari_suite.klab.protectdemo import ProtectRun
from kemari_suite.klab.share import kemari_command, mount_command, python_env, share_socket
from kemari_suite.vm.qemu import VMPaths, qemu_argv

IMAGE = HostImage(Path("/c/disk.img"), Path("/c/vmlinuz"), "6.1.0-57-cloud-amd64", "k", True)
SPEC = EngineSpec("t7", 5, "/work/main", "/var/lib/klab/l2/vmlinuz", "/var/lib/klab/l2/initrd.img",
                  workload="records -d /dev/vda -p 7000")  # fmt: skip
ADDRESSES = ("10.99.5.1", "10.99.5.2")


def test_the_l1_line_shares_the_tree_by_virtiofs_and_has_a_user_network_nic(
    tmp_path: Path,
) -> None:
    a, _ = PairSpec("t0", slot=3, share="/work/main", lan=True).l1_specs()
    spec = l1_vm_spec("klab-t0-l1a", a, IMAGE, tmp_path / "l1a")
    line = " ".join(qemu_argv(spec, VMPaths.for_vm(spec.name, tmp_path / "run", tmp_path / "shm")))
    assert f"path={share_socket(tmp_path / 'l1a')}" in line
    assert "vhost-user-fs-pci,chardev=klabfs,tag=kemari" in line
    assert "share=on" in line  # vhost-user needs the L1's RAM shared
    assert "-netdev user,id=klablan" in line and lan_mac(a.mac) in line
    assert lan_mac(a.mac) != a.mac


def test_without_share_or_lan_the_l1_line_is_as_before(tmp_path: Path) -> None:
    a, _ = PairSpec("t0", slot=3).l1_specs()
    spec = l1_vm_spec("klab-t0-l1a", a, IMAGE, tmp_path / "l1a")
    line = " ".join(qemu_argv(spec, VMPaths.for_vm(spec.name, tmp_path / "run", tmp_path / "shm")))
    assert "vhost-user" not in line and "user,id=" not in line


def test_the_role_configs_load_and_carry_the_l1s_values(tmp_path: Path) -> None:
    trees = l1_trees(SPEC, ADDRESSES)
    pri = check_tree(trees["primary"], tmp_path / "primary.toml")
    sec = check_tree(trees["secondary"], tmp_path / "secondary.toml")
    assert pri.replication.listen == sec.replication.peer == "10.99.5.1:7410"
    assert sec.replication.listen == pri.replication.peer == "10.99.5.2:7410"
    for cfg in (pri, sec):
        assert cfg.vm.netns == "" and cfg.vm.accel == "kvm"
        assert cfg.vm.ip == f"{GUEST_IP}/24" and cfg.tap.host_tap == TAP
        assert cfg.replication.tiebreaker == "witness"
        assert cfg.replication.witness == f"10.0.2.2:{witness_port(5)}"
        assert cfg.image.kernel == SPEC.kernel and cfg.disk.backend == "builtin"
        assert cfg.metrics.listen == ""
    assert pri.disk.path != sec.disk.path


def test_tracker_verify_reaches_both_configs(tmp_path: Path) -> None:
    assert l1_trees(SPEC, ADDRESSES)["primary"]["replication"]["tracker_verify"] is False
    spec = EngineSpec("t7", 5, "/w", "/k", "/i", tracker_verify=True)
    trees = l1_trees(spec, ADDRESSES)
    pri = check_tree(trees["primary"], tmp_path / "primary.toml")
    assert pri.replication.tracker_verify is True


def test_the_drbd_configs_name_the_device() -> None:
    spec = EngineSpec("t7", 5, "/w", "/k", "/i", disk_backend="drbd", vm_name="r0")
    trees = l1_trees(spec, ADDRESSES)
    assert trees["primary"]["disk"]["path"] == trees["secondary"]["disk"]["path"] == "/dev/drbd0"
    assert trees["primary"]["disk"]["backend"] == "drbd"


def test_the_witness_config_keeps_its_files_in_its_folder(tmp_path: Path) -> None:
    paths = PathsConfig(cache_dir=tmp_path / "c", run_dir=tmp_path / "r", shm_dir=tmp_path / "s")
    cfg = check_tree(witness_tree(SPEC, paths, tmp_path / "w"), tmp_path / "witness.toml")
    assert cfg.witness.keys_dir == tmp_path / "w" / "witness.d"
    assert cfg.witness.state_file == tmp_path / "w" / "witness.json"


def test_the_l1_runs_the_shared_tree_with_its_own_python() -> None:
    assert "mount -t virtiofs -o ro kemari /work/main" in mount_command("/work/main")
    env = python_env("/work/main")
    assert "PYTHONPATH=/work/main:/work/main/.venv/lib/python3." in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    cmd = kemari_command("/work/main", ["standby", "-c", "/x/secondary.toml"])
    assert cmd.endswith("python3 -m kemari_suite.cli.main standby -c /x/secondary.toml")


def test_drbds_fence_peer_handler_is_the_engines_own_command() -> None:
    """DRBD runs the handler with a bare environment: the wrapper runs the suite as the
    agents do, with the role's config (whose node id the agents use too), and logs each
    call and exit code."""
    text = fence_peer_script(SPEC, "secondary")
    assert text.startswith("#!/bin/sh\n")
    line = next(ln for ln in text.splitlines() if "fence-peer -c" in ln)
    assert line.startswith(
        f"env {python_env('/work/main')} /usr/bin/python3 -m kemari_suite.cli.main"
    )
    assert 'fence-peer -c /var/lib/kemari-klab/t7/secondary.toml --resource "$1"' in line
    assert f"LOG={FENCE_PEER_LOG}" in text and text.rstrip().endswith("exit $rc")
    assert "/t7/primary.toml --resource" in fence_peer_script(SPEC, "primary")


def test_the_fence_peer_log_gives_each_calls_exit_code() -> None:
    log = (
        "1765080000.1 call r0 resource=r0 peer=l1a\n"
        "fence-peer r0: we hold the lease (generation 3)\n"
        "1765080004.2 exit 7\n"
        "1765080010.0 call r0 resource=r0 peer=l1a\n"
    )
    assert fence_peer_calls(log) == [7, -1]
    assert fence_peer_calls("") == []


def test_a_run_is_ok_only_when_protected_resumed_and_nothing_acknowledged_is_lost() -> None:
    good = ProtectRun(accel="kvm", protected=True, resumed=True, records_acked=40,
                      records_found=41, wrote_after_resume=True)  # fmt: skip
    assert good.ok and good.records_lost == 0
    lost = ProtectRun(protected=True, resumed=True, records_acked=40, records_found=39,
                      wrote_after_resume=True)  # fmt: skip
    assert not lost.ok and lost.records_lost == 1
    assert not ProtectRun(protected=True, records_acked=4, records_found=4).ok
    drbd = ProtectRun(protected=True, resumed=True, records_acked=4, records_found=4,
                      wrote_after_resume=True, promoted=False)  # fmt: skip
    assert not drbd.ok
    promoted = ProtectRun(protected=True, resumed=True, records_acked=4, records_found=4,
                          wrote_after_resume=True, promoted=True, fence_peer_calls=1,
                          fence_peer_exits=[7])  # fmt: skip
    assert promoted.ok
    # The handler said the peer holds the lease (or never answered): not a clean takeover.
    assert not ProtectRun(**{**promoted.__dict__, "fence_peer_exits": [6]}).ok


def test_the_demo_json_leads_with_the_demo_keys() -> None:
    run = ProtectRun(accel="kvm", records_acked=3, records_found=3, failover_ms=1.5).as_dict()
    out = protect_demo_result(run)
    assert list(out)[:6] == [
        "resumed", "accel", "disk_backend", "records_acked", "records_lost", "failover_ms"
    ]  # fmt: skip
    assert out["records_lost"] == 0 and out["accel"] == "kvm"
    assert "promoted" in protect_demo_result({**run, "disk_backend": "drbd"})
