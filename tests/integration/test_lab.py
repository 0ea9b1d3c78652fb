"""The local host-pair lab on this machine: namespaces, veths, tbf, bridges, TAPs.

Every lab id comes from the pytest-xdist worker id plus a per-test slot, so parallel
workers never build the same lab or share its subnets; the fixture removes the lab
before and after each test. Traffic only goes to addresses inside these namespaces.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kemari_suite.config import PathsConfig
from kemari_suite.config import load as config_load
from kemari_suite.errors import LabError, LabInUseError
from kemari_suite.lab import (
    PROFILES,
    LabLayout,
    LinkProfile,
    down,
    fresh,
    heal,
    layout,
    list_labs,
    netns_exec_argv,
    partition,
    set_link_up,
    state_file,
    status,
    subnet_index,
    up,
    wait_tap_forwarding,
    worker_lab_id,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_slots = itertools.count()


@pytest.fixture
def paths(tmp_path: Path) -> PathsConfig:
    """Private run and shm directories, so file checks see only this test's files."""
    run_dir, shm_dir = tmp_path / "run", tmp_path / "shm"
    run_dir.mkdir()
    shm_dir.mkdir()
    return PathsConfig(cache_dir=tmp_path / "cache", run_dir=run_dir, shm_dir=shm_dir)


@pytest.fixture
def new_lab_id(paths: PathsConfig) -> Iterator[Callable[[], str]]:
    """Hand out fresh lab ids for this worker; every one is taken down afterwards."""
    handed: list[str] = []

    def make() -> str:
        lab_id = worker_lab_id(WORKER, next(_slots) % 36)
        down(lab_id, paths=paths)  # a crashed earlier run may have left it
        handed.append(lab_id)
        return lab_id

    yield make
    for lab_id in handed:
        down(lab_id, paths=paths)


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)


def _ping(ns: str, ip: str, *, size: int | None = None, dont_fragment: bool = False) -> bool:
    argv = ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2"]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    return _run(netns_exec_argv(ns, [*argv, ip])).returncode == 0


def _ping_fails(ns: str, ip: str) -> bool:
    argv = ["ping", "-n", "-q", "-c", "1", "-W", "1", ip]
    return _run(netns_exec_argv(ns, argv)).returncode != 0


def _netns_list() -> str:
    return _run(["ip", "netns", "list"]).stdout


def _tbf(ns: str, dev: str) -> dict[str, object] | None:
    out = _run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev]).stdout
    roots = [q for q in json.loads(out) if q.get("root")]
    return roots[0] if roots and roots[0]["kind"] == "tbf" else None


def _link(ns: str, dev: str) -> dict[str, object]:
    out = _run(["ip", "-n", ns, "-j", "-d", "link", "show", "dev", dev])
    assert out.returncode == 0, out.stderr
    entry: dict[str, object] = json.loads(out.stdout)[0]
    return entry


def _assert_lab_reachable(lay: LabLayout) -> None:
    assert _ping(lay.ns_primary, lay.repl_secondary_ip), "primary -> secondary (replication)"
    assert _ping(lay.ns_secondary, lay.repl_primary_ip), "secondary -> primary (replication)"
    assert _ping(lay.ns_client, lay.lan_primary_ip), "client -> primary (LAN)"
    assert _ping(lay.ns_client, lay.lan_secondary_ip), "client -> secondary (LAN)"
    assert _ping(lay.ns_primary, lay.lan_client_ip), "primary -> client/witness (LAN)"
    assert _ping(lay.ns_secondary, lay.lan_client_ip), "secondary -> client/witness (LAN)"


def test_up_builds_a_reachable_lab(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    assert lay == layout(lab_id, "1g")
    listed = _netns_list()
    for ns in lay.namespaces:
        assert ns in listed
    assert lab_id in list_labs()

    st = status(lab_id, paths=paths)
    assert st.exists and st.complete, st.problems
    assert st.profile == "1g"
    assert st.layout == lay
    assert st.state_file == state_file(lab_id, paths=paths)
    assert json.loads(st.state_file.read_text())["profile"] == "1g"
    _assert_lab_reachable(lay)
    # The hosts' LAN addresses sit on br0, the client's on its `lan` bridge.
    assert f"{lay.lan_primary_ip}/24" in st.link(lay.ns_primary, "br0").addresses  # type: ignore[union-attr]
    assert f"{lay.lan_client_ip}/24" in st.link(lay.ns_client, "lan").addresses  # type: ignore[union-attr]


def test_1g_profile_shapes_both_ends(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, "1g", paths=paths)
    for ns, dev in (
        (lay.ns_primary, lay.repl_primary_if),
        (lay.ns_secondary, lay.repl_secondary_if),
    ):
        qdisc = _tbf(ns, dev)
        assert qdisc is not None, f"no tbf on {dev} in {ns}"
        options = qdisc["options"]
        assert isinstance(options, dict)
        assert options["rate"] == 1_000_000_000 // 8  # tc reports bytes per second
        assert _link(ns, dev)["mtu"] == 1500
    st = status(lab_id, paths=paths)
    repl = st.link(lay.ns_secondary, lay.repl_secondary_if)
    assert repl is not None and repl.qdisc == "tbf" and repl.rate_bit == 1_000_000_000
    # The LAN is not shaped.
    assert _tbf(lay.ns_primary, lay.lan_primary_if) is None


def test_10g_profile_uses_jumbo_frames(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, "10g", paths=paths)
    for ns, dev in (
        (lay.ns_primary, lay.repl_primary_if),
        (lay.ns_secondary, lay.repl_secondary_if),
    ):
        assert _link(ns, dev)["mtu"] == 9000
        qdisc = _tbf(ns, dev)
        assert qdisc is not None and qdisc["options"]["rate"] == 10_000_000_000 // 8  # type: ignore[index]
    # 8972 bytes of ICMP payload + 28 of headers = one unfragmented 9000-byte packet.
    assert _ping(lay.ns_primary, lay.repl_secondary_ip, size=8972, dont_fragment=True)
    assert status(lab_id, paths=paths).profile == "10g"


def test_unlimited_profile_has_no_qdisc(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, "unlimited", paths=paths)
    assert _tbf(lay.ns_primary, lay.repl_primary_if) is None
    assert _tbf(lay.ns_secondary, lay.repl_secondary_if) is None
    st = status(lab_id, paths=paths)
    assert st.complete, st.problems
    assert st.profile == "unlimited"


def test_status_recognises_the_profile_without_state_file(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    up(lab_id, "10g", paths=paths)
    state_file(lab_id, paths=paths).unlink()
    st = status(lab_id, paths=paths)
    assert st.profile == "10g" and st.state_file is None and st.complete, st.problems


def test_taps_are_in_the_host_bridges(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    for ns, tap, lan_if in (
        (lay.ns_primary, lay.tap_primary, lay.lan_primary_if),
        (lay.ns_secondary, lay.tap_secondary, lay.lan_secondary_if),
    ):
        info = _link(ns, tap)
        linkinfo = info["linkinfo"]
        assert isinstance(linkinfo, dict)
        assert linkinfo["info_kind"] == "tun"
        assert linkinfo["info_data"]["type"] == "tap"
        assert info["master"] == "br0"
        assert _link(ns, lan_if)["master"] == "br0"
    # Nothing has opened the TAPs yet, so they do not forward.
    with pytest.raises(LabError, match="not forwarding"):
        wait_tap_forwarding(lab_id, "secondary", timeout_s=0.2)


_TAP_READER = textwrap.dedent(
    """
    import fcntl, os, select, socket, struct, sys, time
    name, target = sys.argv[1], socket.inet_aton(sys.argv[2])
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))
    print("open", flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            frame = os.read(fd, 65536)
            if frame[12:14] == b"\\x08\\x06" and frame[38:42] == target:
                print("arp-for-guest", flush=True)
                break
    """
)


def test_client_frames_for_the_guest_reach_the_primary_tap(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    argv = netns_exec_argv(
        lay.ns_primary, [sys.executable, "-c", _TAP_READER, lay.tap_primary, lay.guest_ip]
    )
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as reader:
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline().strip() == "open"
            wait_tap_forwarding(lab_id, "primary")
            # The guest is not there, so this ping fails, but its ARP requests for the
            # guest's address must cross the LAN into the primary's TAP.
            _run(netns_exec_argv(lay.ns_client, ["ping", "-c", "3", "-W", "1", lay.guest_ip]))
            out, _ = reader.communicate(timeout=30)
            assert "arp-for-guest" in out
        finally:
            if reader.poll() is None:
                reader.kill()


def test_two_labs_coexist(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    first_id, second_id = new_lab_id(), new_lab_id()
    first, second = up(first_id, paths=paths), up(second_id, "10g", paths=paths)
    assert set(first.namespaces).isdisjoint(second.namespaces)
    assert first.lan_subnet != second.lan_subnet and first.repl_subnet != second.repl_subnet
    _assert_lab_reachable(first)
    _assert_lab_reachable(second)
    # A namespace of one lab cannot reach the other lab's addresses.
    assert _ping_fails(first.ns_client, second.lan_primary_ip)
    assert {first_id, second_id} <= set(list_labs())
    down(first_id, paths=paths)
    st = status(second_id, paths=paths)
    assert st.complete, st.problems
    _assert_lab_reachable(second)


def test_up_of_an_existing_lab_is_refused(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    with pytest.raises(LabInUseError) as info:
        up(lab_id, "10g", paths=paths)
    assert info.value.lab_id == lab_id
    # The refused call must not have touched the running lab.
    st = status(lab_id, paths=paths)
    assert st.complete and st.profile == "1g", st.problems
    _assert_lab_reachable(lay)


def test_fresh_replaces_a_stale_lab(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    up(lab_id, paths=paths)
    said: list[str] = []
    lay = fresh(lab_id, "10g", say=said.append, paths=paths)
    assert any("stale lab" in m for m in said), said
    st = status(lab_id, paths=paths)
    assert st.complete and st.profile == "10g", st.problems
    _assert_lab_reachable(lay)


def test_concurrent_up_of_one_id_builds_it_once(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    outcomes: list[object] = []

    def attempt() -> None:
        try:
            outcomes.append(up(lab_id, paths=paths))
        except LabError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=attempt) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == 3
    assert sum(isinstance(o, LabLayout) for o in outcomes) == 1
    assert sum(isinstance(o, LabInUseError) for o in outcomes) == 2
    st = status(lab_id, paths=paths)
    assert st.complete, st.problems


def test_a_leftover_namespace_blocks_up(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = layout(lab_id)
    assert _run(["ip", "netns", "add", lay.ns_client]).returncode == 0
    with pytest.raises(LabInUseError):
        up(lab_id, paths=paths)
    st = status(lab_id, paths=paths)
    assert st.exists and not st.complete
    assert st.missing_namespaces == (lay.ns_primary, lay.ns_secondary)
    down(lab_id, paths=paths)
    assert lay.ns_client not in _netns_list()


def _colliding_ids() -> tuple[str, str]:
    """Two hashed (four-character) ids with the same subnets, unique to this worker."""
    worker = "".join(c for c in (WORKER or "") if c.isdigit()) or "0"
    marker = "0123456789abcdefghijklmnopqrstuvwxyz"[int(worker) % 36]
    seen: dict[int, str] = {}
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for a, b in itertools.product(alphabet, repeat=2):
        lab_id = f"C{marker}{a}{b}"
        index = subnet_index(lab_id)
        if index in seen:
            return seen[index], lab_id
        seen[index] = lab_id
    raise AssertionError("no colliding pair found")  # pragma: no cover


def test_subnet_collision_is_refused(paths: PathsConfig) -> None:
    first_id, second_id = _colliding_ids()
    assert layout(first_id).lan_subnet == layout(second_id).lan_subnet
    for lab_id in (first_id, second_id):
        down(lab_id, paths=paths)
    try:
        up(first_id, paths=paths)
        with pytest.raises(LabError) as info:
            up(second_id, paths=paths)
        assert not isinstance(info.value, LabInUseError)
        assert first_id in str(info.value) and second_id in str(info.value)
        assert not status(second_id, paths=paths).exists
        assert status(first_id, paths=paths).complete
    finally:
        for lab_id in (first_id, second_id):
            down(lab_id, paths=paths)


def test_failed_up_tears_down_and_names_the_command(
    new_lab_id: Callable[[], str], paths: PathsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # veth refuses an MTU above 65535, so this profile fails halfway through `up`.
    huge = LinkProfile(name="huge", rate_bit=None, mtu=70000, burst_bytes=0, latency_ms=0)
    monkeypatch.setitem(PROFILES, "huge", huge)
    lab_id = new_lab_id()
    with pytest.raises(LabError) as info:
        up(lab_id, "huge", paths=paths)
    message = str(info.value)
    assert "mtu 70000" in message and "`ip -n" in message
    assert "exited" in message
    listed = _netns_list()
    for ns in layout(lab_id).namespaces:
        assert ns not in listed
    assert not state_file(lab_id, paths=paths).exists()
    assert not status(lab_id, paths=paths).exists


def test_down_removes_everything_and_is_idempotent(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    ram = paths.shm_dir / f"kemari-{lab_id}-pri.ram"
    ram.write_bytes(b"\0" * 4096)
    run_sub = paths.run_dir / f"kemari-{lab_id}-agent"
    run_sub.mkdir()
    (run_sub / "qmp.sock").write_text("")
    # Files of another lab whose id merely starts with this one stay.
    other = paths.shm_dir / f"kemari-{lab_id}x-pri.ram"
    other.write_bytes(b"x")
    unrelated = paths.run_dir / "kemari0.pid"
    unrelated.write_text("1")
    # A process left inside the lab is stopped (the namespace would outlive its name).
    sleeper = subprocess.Popen(netns_exec_argv(lay.ns_primary, ["sleep", "300"]))
    try:
        deadline = time.monotonic() + 10
        while str(sleeper.pid) not in _run(["ip", "netns", "pids", lay.ns_primary]).stdout.split():
            assert time.monotonic() < deadline, "sleep never entered the namespace"
            time.sleep(0.02)
        down(lab_id, paths=paths)
        assert sleeper.wait(timeout=10) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()

    listed = _netns_list()
    for ns in lay.namespaces:
        assert ns not in listed
    assert lab_id not in list_labs()
    assert not ram.exists() and not run_sub.exists()
    assert not state_file(lab_id, paths=paths).exists()
    assert other.exists() and unrelated.exists()
    st = status(lab_id, paths=paths)
    assert not st.exists and st.profile is None
    down(lab_id, paths=paths)  # idempotent
    down(lab_id, paths=paths)


def test_partition_and_heal(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    partition(lab_id)
    assert _ping_fails(lay.ns_primary, lay.repl_secondary_ip)
    assert _ping_fails(lay.ns_secondary, lay.repl_primary_ip)
    # The LAN stays up: the witness can still be reached by both hosts.
    assert _ping(lay.ns_primary, lay.lan_client_ip)
    assert _ping(lay.ns_secondary, lay.lan_client_ip)
    st = status(lab_id, paths=paths)
    assert not st.complete
    assert any("is down" in p for p in st.problems)

    heal(lab_id)
    assert _ping(lay.ns_primary, lay.repl_secondary_ip)
    assert _tbf(lay.ns_primary, lay.repl_primary_if) is not None  # shaping survives
    assert status(lab_id, paths=paths).complete

    # One end alone cuts the link too; the LAN veth can be cut per host.
    set_link_up(lab_id, "secondary", False)
    assert _ping_fails(lay.ns_primary, lay.repl_secondary_ip)
    set_link_up(lab_id, "secondary", True)
    assert _ping(lay.ns_primary, lay.repl_secondary_ip)
    set_link_up(lab_id, "primary", False, link="lan")
    assert _ping_fails(lay.ns_client, lay.lan_primary_ip)
    assert _ping(lay.ns_client, lay.lan_secondary_ip)
    set_link_up(lab_id, "primary", True, link="lan")
    assert _ping(lay.ns_client, lay.lan_primary_ip)
    with pytest.raises(LabError):
        set_link_up(lab_id, "client", False)


def test_partition_of_an_absent_lab_is_an_error(new_lab_id: Callable[[], str]) -> None:
    with pytest.raises(LabError, match="does not exist"):
        partition(new_lab_id())


_SINK = textwrap.dedent(
    """
    import socket, sys
    srv = socket.create_server((sys.argv[1], 5201))
    print("listening", flush=True)
    conn, _ = srv.accept()
    total = 0
    while chunk := conn.recv(1 << 20):
        total += len(chunk)
    print(total, flush=True)
    """
)
_SOURCE = textwrap.dedent(
    """
    import socket, sys, time
    total, chunk = int(sys.argv[2]), b"k" * (1 << 20)
    start = time.monotonic()
    with socket.create_connection((sys.argv[1], 5201), timeout=30) as conn:
        for _ in range(total // len(chunk)):
            conn.sendall(chunk)
    print(time.monotonic() - start, flush=True)
    """
)


def test_replication_link_carries_bulk_data(
    new_lab_id: Callable[[], str],
    paths: PathsConfig,
    record_property: Callable[[str, object], None],
) -> None:
    """A sanity check that bulk TCP crosses the shaped link intact; speed is only recorded."""
    lab_id = new_lab_id()
    lay = up(lab_id, "1g", paths=paths)
    total = 32 << 20
    sink_argv = netns_exec_argv(
        lay.ns_secondary, [sys.executable, "-c", _SINK, lay.repl_secondary_ip]
    )
    with subprocess.Popen(sink_argv, stdout=subprocess.PIPE, text=True) as sink:
        try:
            assert sink.stdout is not None
            assert sink.stdout.readline().strip() == "listening"
            sent = _run(
                netns_exec_argv(
                    lay.ns_primary,
                    [sys.executable, "-c", _SOURCE, lay.repl_secondary_ip, str(total)],
                ),
                timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            out, _ = sink.communicate(timeout=60)
        finally:
            if sink.poll() is None:
                sink.kill()
    assert int(out.strip()) == total
    seconds = float(sent.stdout.strip())
    record_property("lab_1g_gbit_per_s", round(total * 8 / max(seconds, 1e-9) / 1e9, 3))
    # The bytes went through the tbf qdisc on the primary's end.
    stats = _run(
        ["tc", "-n", lay.ns_primary, "-s", "-j", "qdisc", "show", "dev", lay.repl_primary_if]
    )
    assert json.loads(stats.stdout)[0]["bytes"] >= total


def test_status_of_an_absent_lab(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    lab_id = new_lab_id()
    st = status(lab_id, paths=paths)
    assert not st.exists and not st.complete
    assert st.namespaces == () and st.links == ()
    assert st.missing_namespaces == layout(lab_id).namespaces


def test_up_waits_until_the_lan_forwards(new_lab_id: Callable[[], str], paths: PathsConfig) -> None:
    """The very first packet after `up` gets through (no linkwatch delay left to the caller)."""
    lab_id = new_lab_id()
    lay = up(lab_id, paths=paths)
    once = ["ping", "-n", "-q", "-c", "1", "-W", "1"]
    assert _run(netns_exec_argv(lay.ns_client, [*once, lay.lan_primary_ip])).returncode == 0
    assert _run(netns_exec_argv(lay.ns_client, [*once, lay.lan_secondary_ip])).returncode == 0
    assert _run(netns_exec_argv(lay.ns_primary, [*once, lay.repl_secondary_ip])).returncode == 0


def test_status_and_down_find_a_lab_wherever_its_files_are(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    """A lab made with other run and shm folders (another KEMARI_RUN) is found, and fully
    removed, by callers that name no folders (the environment's defaults)."""
    from kemari_suite.lab import registry

    lab_id = new_lab_id()
    up(lab_id, "10g", paths=paths)
    entry = registry.lookup(lab_id)
    assert entry is not None
    assert (entry.run_dir, entry.shm_dir, entry.profile) == (paths.run_dir, paths.shm_dir, "10g")
    ram = paths.shm_dir / f"kemari-{lab_id}-pri.ram"
    ram.write_bytes(b"\0" * 4096)
    (paths.run_dir / f"kemari-{lab_id}-pri").mkdir()

    st = status(lab_id)
    assert st.complete, st.problems
    assert st.state_file == state_file(lab_id, paths=paths)
    assert st.registry_file == registry.registry_file(lab_id)
    assert (st.run_dir, st.shm_dir) == (paths.run_dir, paths.shm_dir)

    report = down(lab_id)
    assert set(report.namespaces) == set(layout(lab_id).namespaces)
    assert ram in report.removed and state_file(lab_id, paths=paths) in report.removed
    assert paths.run_dir in report.searched and paths.shm_dir in report.searched
    assert report.registry_file == registry.registry_file(lab_id)
    assert not ram.exists() and not (paths.run_dir / f"kemari-{lab_id}-pri").exists()
    assert registry.lookup(lab_id) is None

    gone = status(lab_id)
    assert not gone.exists and gone.registry_file is None
    assert registry.registry_file(lab_id) in gone.looked_in
    assert not down(lab_id).found


def _kemari(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kemari_suite.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_cli_lab_up_prints_configs_ports_and_commands(
    new_lab_id: Callable[[], str], paths: PathsConfig, tmp_path: Path
) -> None:
    lab_id = new_lab_id()
    env = {**os.environ, "KEMARI_RUN": str(paths.run_dir), "KEMARI_SHM": str(paths.shm_dir)}
    res = _kemari(["lab", "up", "--id", lab_id, "--profile", "unlimited", "--json"], env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.strip().splitlines()[-1])
    lay = layout(lab_id, "unlimited")
    directory = paths.run_dir / f"kemari-{lab_id}-configs"
    assert data["directory"] == str(directory)
    assert data["namespaces"] == {
        "primary": lay.ns_primary,
        "secondary": lay.ns_secondary,
        "client": lay.ns_client,
    }
    assert {(p["address"], p["port"]) for p in data["ports"]} == {
        (lay.repl_primary_ip, 7410),
        (lay.repl_secondary_ip, 7410),
        (lay.lan_client_ip, 7411),
        (lay.guest_ip, 7000),
        # Each agent's /metrics (Prometheus), on its host's LAN address.
        (lay.lan_primary_ip, 9400),
        (lay.lan_secondary_ip, 9400),
    }
    for role, verb in (("witness", "witness"), ("secondary", "standby"), ("primary", "protect")):
        assert (directory / f"{role}.toml").is_file()
        assert f" {verb} -c {directory / f'{role}.toml'}" in data["commands"][role]

    # Without the environment it was made with: found through the registry.
    bare = {k: v for k, v in os.environ.items() if k not in ("KEMARI_RUN", "KEMARI_SHM")}
    shown = _kemari(["lab", "status", "--id", lab_id], bare)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "complete" in shown.stdout and str(state_file(lab_id, paths=paths)) in shown.stdout
    listed = _kemari(["lab", "list", "--json"], bare)
    assert any(row["lab_id"] == lab_id and row["up"] for row in json.loads(listed.stdout))

    removed = _kemari(["lab", "down", "--id", lab_id], bare)
    assert removed.returncode == 0, removed.stderr
    assert not directory.exists(), "the default configs folder goes with the lab"
    absent = _kemari(["lab", "status", "--id", lab_id], bare)
    assert absent.returncode == 1
    assert f"no lab {lab_id}" in absent.stdout and f"/run/netns/{lay.ns_primary}" in absent.stdout


def test_cli_lab_up_writes_configs_for_several_vms(
    new_lab_id: Callable[[], str], paths: PathsConfig
) -> None:
    lab_id = new_lab_id()
    env = {**os.environ, "KEMARI_RUN": str(paths.run_dir), "KEMARI_SHM": str(paths.shm_dir)}
    res = _kemari(["lab", "up", "--id", lab_id, "--vms", "3", "--json"], env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.strip().splitlines()[-1])
    lay = layout(lab_id, "1g")
    vms = data["vms"]
    assert [v["name"] for v in vms] == ["vm1", "vm2", "vm3"]
    # Nothing two VMs could fight over is shared.
    for key in ("guest_ip", "mac", "replication_port", "metrics_port", "directory"):
        assert len({v[key] for v in vms}) == 3, key
    assert [v["primary_host"] for v in vms] == ["A", "A", "B"]  # both directions
    keys_dirs = set()
    for v in vms:
        primary = config_load(Path(v["configs"]["primary"]))
        secondary = config_load(Path(v["configs"]["secondary"]))
        assert primary.vm.name == secondary.vm.name == v["name"]
        assert primary.replication.listen.endswith(f":{v['replication_port']}")
        # Each VM's TAPs exist in both host namespaces.
        for role, ns in (("primary", lay.ns_primary), ("secondary", lay.ns_secondary)):
            assert v["taps"][role] in json.dumps(_link(ns, v["taps"][role]))
        keys_dirs.add(Path(v["directory"]) / "witness.toml")
        ns_primary = lay.ns_primary if v["primary_host"] == "A" else lay.ns_secondary
        assert v["commands"]["primary"].startswith(f"ip netns exec {ns_primary} ")
    # One witness serves them all: every VM's pair key is in the one keys folder.
    witness = config_load(Path(vms[0]["directory"]) / "witness.toml").witness
    assert sorted(p.name for p in Path(witness.keys_dir).iterdir()) == [
        "vm1.key",
        "vm2.key",
        "vm3.key",
    ]
    assert "witness -c " in data["witness"]
    assert _kemari(["lab", "down", "--id", lab_id], env).returncode == 0
    assert not any(d.exists() for d in keys_dirs)


def test_cli_lab_up_several_vms_refuses_a_single_name(new_lab_id: Callable[[], str]) -> None:
    res = _kemari(["lab", "up", "--id", new_lab_id(), "--vms", "2", "--name", "db"])
    assert res.returncode == 2
    assert "--vms names them vm1..vmN" in res.stderr
