"""Pure lab computations: names, addresses, profiles. No root, no namespaces."""

from __future__ import annotations

import ipaddress
import itertools
import string

import pytest

from kemari_suite.errors import LabError
from kemari_suite.lab import (
    PROFILES,
    LabLayout,
    get_profile,
    layout,
    netns_exec_argv,
    profile_for_rate,
    subnet_index,
    validate_lab_id,
    worker_lab_id,
)

SAMPLE_IDS = ["0", "1", "a", "z9", "abc", "zzz", "t0a", "abcd", "ZZZZ", "Web1", "9999"]


def _ifnames(lay: LabLayout) -> list[str]:
    return [
        lay.repl_primary_if,
        lay.repl_secondary_if,
        lay.lan_primary_if,
        lay.lan_secondary_if,
        lay.lan_client_primary_if,
        lay.lan_client_secondary_if,
        lay.host_bridge,
        lay.client_bridge,
        lay.tap_primary,
        lay.tap_secondary,
    ]


@pytest.mark.parametrize("lab_id", SAMPLE_IDS)
def test_interface_names_fit_ifnamsiz(lab_id: str) -> None:
    lay = layout(lab_id)
    for name in _ifnames(lay):
        assert 1 <= len(name) <= 15, name
        assert "/" not in name and ":" not in name and " " not in name


@pytest.mark.parametrize("lab_id", SAMPLE_IDS)
def test_namespace_names(lab_id: str) -> None:
    lay = layout(lab_id)
    assert lay.namespaces == (
        f"kemari-{lab_id}-pri",
        f"kemari-{lab_id}-sec",
        f"kemari-{lab_id}-cli",
    )
    assert lay.ns_for("primary") == lay.ns_primary
    assert lay.ns_for("secondary") == lay.ns_secondary
    assert lay.ns_for("client") == lay.ns_client


def test_names_within_one_lab_are_distinct_per_namespace() -> None:
    lay = layout("abcd")
    pri = [lay.repl_primary_if, lay.lan_primary_if, lay.host_bridge, lay.tap_primary]
    sec = [lay.repl_secondary_if, lay.lan_secondary_if, lay.host_bridge, lay.tap_secondary]
    cli = [lay.client_bridge, lay.lan_client_primary_if, lay.lan_client_secondary_if]
    for names in (pri, sec, cli):
        assert len(set(names)) == len(names)


def test_lab_specific_names_do_not_collide_between_labs() -> None:
    shared = {"br0", "lan"}
    seen: dict[str, str] = {}
    for lab_id in SAMPLE_IDS:
        for name in set(_ifnames(layout(lab_id))) - shared:
            assert name not in seen, f"{name} used by labs {seen.get(name)} and {lab_id}"
            seen[name] = lab_id


def test_addresses_of_one_lab() -> None:
    lay = layout("t0a")
    lan = ipaddress.ip_network(lay.lan_subnet)
    repl = ipaddress.ip_network(lay.repl_subnet)
    assert lan.prefixlen == lay.lan_prefix == 24
    assert repl.prefixlen == lay.repl_prefix == 30
    lan_ips = [lay.lan_client_ip, lay.lan_primary_ip, lay.lan_secondary_ip, lay.guest_ip]
    assert len(set(lan_ips)) == 4
    for ip in lan_ips:
        addr = ipaddress.ip_address(ip)
        assert addr in lan and addr not in (lan.network_address, lan.broadcast_address)
    assert list(repl.hosts()) == [
        ipaddress.ip_address(lay.repl_primary_ip),
        ipaddress.ip_address(lay.repl_secondary_ip),
    ]
    assert not lan.overlaps(repl)
    assert lan.is_private and repl.is_private
    assert lay.lan_ip_for("client") == lay.lan_client_ip
    assert lay.repl_ip_for("secondary") == lay.repl_secondary_ip
    assert lay.tap_for("primary") == lay.tap_primary


def test_address_plan_is_documented_form() -> None:
    lay = layout("0")
    assert subnet_index("0") == 1
    assert lay.lan_subnet == "10.0.1.0/24"
    assert (lay.lan_client_ip, lay.lan_primary_ip, lay.lan_secondary_ip, lay.guest_ip) == (
        "10.0.1.1",
        "10.0.1.2",
        "10.0.1.3",
        "10.0.1.10",
    )
    assert lay.repl_subnet == "172.16.0.4/30"
    assert (lay.repl_primary_ip, lay.repl_secondary_ip) == ("172.16.0.5", "172.16.0.6")


def test_short_lowercase_ids_never_share_subnets() -> None:
    ids = [
        "".join(chars)
        for n in (1, 2, 3)
        for chars in itertools.product(string.digits + string.ascii_lowercase, repeat=n)
    ]
    indices = {subnet_index(i) for i in ids}
    assert len(indices) == len(ids)
    assert min(indices) >= 1


def test_hashed_ids_stay_out_of_the_direct_range() -> None:
    direct_max = max(subnet_index(i) for i in ("zzz", "zz", "z"))
    for lab_id in ("abcd", "ZZZZ", "Web1", "9999", "A", "aB"):
        assert direct_max < subnet_index(lab_id) < 65536


@pytest.mark.parametrize("pair", [("0", "1"), ("t0a", "t0b"), ("t0a", "t1a"), ("abcd", "abce")])
def test_different_ids_get_disjoint_subnets(pair: tuple[str, str]) -> None:
    a, b = (layout(x) for x in pair)
    for net_a, net_b in ((a.lan_subnet, b.lan_subnet), (a.repl_subnet, b.repl_subnet)):
        assert not ipaddress.ip_network(net_a).overlaps(ipaddress.ip_network(net_b))
    # A lab's LAN must not overlap another lab's replication link either.
    assert not ipaddress.ip_network(a.lan_subnet).overlaps(ipaddress.ip_network(b.repl_subnet))


def test_all_subnets_fit_their_ranges() -> None:
    lan_range = ipaddress.IPv4Network("10.0.0.0/8")
    repl_range = ipaddress.IPv4Network("172.16.0.0/14")
    for lay in (layout("0"), layout("zzz"), layout("ZZZZ")):
        assert ipaddress.IPv4Network(lay.lan_subnet).subnet_of(lan_range)
        assert ipaddress.IPv4Network(lay.repl_subnet).subnet_of(repl_range)


def test_worker_lab_ids_are_valid_and_never_share_subnets() -> None:
    ids = [worker_lab_id(f"gw{w}", s) for w in range(36) for s in range(36)]
    ids.append(worker_lab_id(None, 1))
    assert worker_lab_id(None, 0) == worker_lab_id("gw0", 0) == "t00"
    assert worker_lab_id("gw11", 10) == "tba"
    for lab_id in ids:
        validate_lab_id(lab_id)
    unique = set(ids)
    assert len({subnet_index(i) for i in unique}) == len(unique)
    assert worker_lab_id("gw36", 0) == "w100"
    with pytest.raises(LabError):
        worker_lab_id("gw1", 36)


@pytest.mark.parametrize("bad", ["", "abcde", "a-b", "a b", "é", "ab_c", "kemari"])
def test_invalid_lab_ids_are_refused(bad: str) -> None:
    with pytest.raises(LabError, match="1-4 letters or digits"):
        layout(bad)


def test_unknown_profile_error_names_the_known_ones() -> None:
    with pytest.raises(LabError) as info:
        get_profile("x")
    assert info.value.reason == "unknown link profile 'x' (known: 1g, 10g, unlimited)"
    with pytest.raises(LabError) as info:
        layout("t0a", "100g")
    assert info.value.lab_id == "t0a"
    assert "unknown link profile '100g' (known: 1g, 10g, unlimited)" in str(info.value)


def test_profiles() -> None:
    assert set(PROFILES) == {"1g", "10g", "unlimited"}
    one, ten, unl = get_profile("1g"), get_profile("10g"), get_profile("unlimited")
    assert (one.rate_bit, one.mtu) == (1_000_000_000, 1500)
    assert (ten.rate_bit, ten.mtu) == (10_000_000_000, 9000)
    assert unl.rate_bit is None and not unl.shaped and unl.tbf_args() == []
    for prof in (one, ten):
        assert prof.shaped
        # The bucket must hold at least one full-size frame, or tbf drops everything.
        assert prof.burst_bytes >= prof.mtu + 14
        assert prof.latency_ms > 0
    assert one.tbf_args() == [
        "tbf",
        "rate",
        "1000000000bit",
        "burst",
        "65536",
        "latency",
        "5ms",
    ]
    assert layout("t0a", "10g").profile is ten
    assert profile_for_rate(10_000_000_000) is ten
    assert profile_for_rate(None) is unl
    assert profile_for_rate(123) is None


def test_netns_exec_argv() -> None:
    assert netns_exec_argv("kemari-0-pri", ["ping", "-c", "1", "10.0.1.1"]) == [
        "ip",
        "netns",
        "exec",
        "kemari-0-pri",
        "ping",
        "-c",
        "1",
        "10.0.1.1",
    ]
    assert netns_exec_argv("ns", ()) == ["ip", "netns", "exec", "ns"]


def test_layout_is_pure_and_hashable() -> None:
    assert layout("t0a") == layout("t0a")
    assert hash(layout("t0a")) == hash(layout("t0a"))
    assert layout("t0a", "10g") != layout("t0a", "1g")
