"""Several VMs on one lab pair: slots, addresses, ports and folders from the VM's name
never clash, a clash is refused with both names, and the configs of VMs running in
opposite directions load and differ where they must (no root, no namespaces)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from kemari_suite.config import KemariConfig, PathsConfig, load
from kemari_suite.demo.multi import reversed_count, vm_names
from kemari_suite.errors import LabError
from kemari_suite.lab import configs as labconfigs
from kemari_suite.lab import layout
from kemari_suite.lab.addressing import VM_SLOTS, vm_addresses, vm_slot, vm_slots
from kemari_suite.lab.configs import PairOptions

LAB = "q8"


def test_the_default_vm_keeps_the_labs_own_addresses() -> None:
    lay = layout(LAB)
    a = vm_addresses(lay, "guest")
    assert (a.slot, a.guest_ip, a.repl_port) == (0, lay.guest_ip, 7410)
    assert (a.tap_primary, a.tap_secondary) == (lay.tap_primary, lay.tap_secondary)


def test_a_hundred_numbered_names_never_clash() -> None:
    names = [f"vm{i}" for i in range(100)] + ["guest"]
    slots = vm_slots(names)
    assert len(set(slots.values())) == len(names)
    lay = layout("zzz")  # the longest direct lab id: its interface names are the longest
    addrs = [vm_addresses(lay, n) for n in names]
    for field in ("guest_ip", "mac", "tap_primary", "tap_secondary", "repl_port", "metrics_port"):
        values = [getattr(a, field) for a in addrs]
        assert len(set(values)) == len(values), field
    # A guest address stays in the LAN /24, beside the hosts' .1-.3, and every TAP
    # name fits the kernel's 15 characters.
    assert all(10 <= int(a.guest_ip.rsplit(".", 1)[1]) <= 254 for a in addrs)
    assert all(len(a.tap_primary) <= 15 and len(a.tap_secondary) <= 15 for a in addrs)
    ports = {a.repl_port for a in addrs} | {a.metrics_port for a in addrs}
    assert not ports & {7000, labconfigs.WITNESS_PORT}


def test_hashed_names_stay_in_range_and_are_stable() -> None:
    names = ["web", "db", "cache", "mail-1x", "a_b", "frontend"]
    for name in names:
        slot = vm_slot(name)
        assert 101 <= slot < VM_SLOTS
        assert vm_slot(name) == slot


def test_a_clash_is_refused_naming_both_vms() -> None:
    with pytest.raises(LabError, match=r"'web1' and 'db1' both take slot 2.*rename one"):
        vm_slots(["web1", "db1"])
    hashed = [f"svc-{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    clash = next((a, b) for a, b in itertools.combinations(hashed, 2) if vm_slot(a) == vm_slot(b))
    with pytest.raises(LabError, match=f"'{clash[0]}' and '{clash[1]}' both take slot"):
        vm_slots(list(clash))
    with pytest.raises(LabError, match="given twice"):
        vm_slots(["vm1", "vm1"])
    with pytest.raises(LabError, match="letters, digits"):
        vm_slot("a/b")


def test_the_demo_splits_primaries_with_most_on_one_host() -> None:
    assert vm_slots(vm_names(4)) == {"vm1": 2, "vm2": 3, "vm3": 4, "vm4": 5}
    assert [reversed_count(n) for n in (1, 2, 3, 4, 5)] == [0, 1, 1, 1, 2]


@pytest.fixture
def base(tmp_path: Path) -> KemariConfig:
    paths = PathsConfig(
        cache_dir=tmp_path / "cache", run_dir=tmp_path / "run", shm_dir=tmp_path / "shm"
    )
    return KemariConfig(paths=paths)


def test_vms_in_both_directions_get_their_own_everything(
    base: KemariConfig, tmp_path: Path
) -> None:
    lay = layout(LAB)
    keys = tmp_path / "witness.d"
    loaded: dict[str, dict[str, KemariConfig]] = {}
    for name, reverse in (("vm1", False), ("vm2", True)):
        opts = PairOptions(
            vm_name=name, slotted=True, reverse=reverse, tapped_net=True, witness_keys_dir=str(keys)
        )
        written = labconfigs.write(lay, base, opts, tmp_path / name, key="k" * 64)
        loaded[name] = {role: load(path) for role, path in written.configs.items()}
        assert written.launch("primary").namespace == (
            lay.ns_secondary if reverse else lay.ns_primary
        )
    one, two = loaded["vm1"], loaded["vm2"]
    # vm2 runs the other way: its primary in the secondary's namespace, on its address.
    assert two["primary"].vm.netns == lay.ns_secondary
    assert two["primary"].replication.listen == f"{lay.repl_secondary_ip}:7503"
    assert two["primary"].replication.peer == f"{lay.repl_primary_ip}:7503"
    assert two["primary"].tap.host_tap == f"{lay.tap_secondary}3"
    assert two["primary"].metrics.listen == f"{lay.lan_secondary_ip}:9403"
    assert one["primary"].metrics.listen == f"{lay.lan_primary_ip}:9402"
    # Two agents on one host (vm1's primary, vm2's standby) share nothing.
    a, b = one["primary"], two["secondary"]
    assert a.vm.netns == b.vm.netns == lay.ns_primary
    assert a.paths.run_dir != b.paths.run_dir and a.paths.shm_dir != b.paths.shm_dir
    assert a.replication.listen != b.replication.listen
    assert a.metrics.listen != b.metrics.listen
    assert a.vm.mac != b.vm.mac and a.vm.ip != b.vm.ip
    assert a.tap.host_tap != b.tap.host_tap
    # One witness folder of pair keys, a key per VM.
    assert sorted(p.name for p in keys.iterdir()) == ["vm1.key", "vm2.key"]
    assert one["witness"].witness.keys_dir == two["witness"].witness.keys_dir == keys
