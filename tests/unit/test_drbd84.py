"""DRBD 8.4 through drbd-utils 9.22: the dialect of the loaded module, the 8.4 argv of
:class:`DrbdAdm`, and its status read from 8.4's ``events2 --now --statistics``.

The samples are written by hand (no DRBD module here), after ``print_notifications``,
``event_key`` and the ``print_*_statistics`` functions of ``user/v84/drbdsetup.c``
(drbd-utils v9.22.0) and what the 8.4 kernel reports (``peer_device_to_info``: the
replication state is at least WFReportParams, printed ``Off``). Every line of a ``--now``
dump carries the same timestamp (the kernel flags all but the last "continues");
``--statistics`` also turns on 8.4's verbose statistics (``size``, ``pending``...);
drbdsetup-84 prints ``peer-node-id:0`` and ``conn-name:peer`` for any peer. 64 MiB
backing disk with internal meta-data: 65496 KiB, as in the kernel lab.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from kemari_suite.disk.drbd84 import Pair84, dialect_of, parse_module_version, status_from_events
from kemari_suite.disk.drbdadm import DrbdAdm, DrbdResource, DrbdTools, detect_dialect
from kemari_suite.disk.drbdconf import DrbdConfig, DrbdNode, render_resource
from kemari_suite.disk.drbdevents import ConnectionLost, DrbdMonitor, parse_events2
from kemari_suite.disk.drbdstatus import (
    ConnectionState,
    DiskState,
    ReplicationState,
    ResourceStatus,
    Role,
)
from kemari_suite.errors import ConfigError, DiskError, DrbdError

CFG = DrbdConfig(
    "r0",
    (DrbdNode("alpha", "10.99.0.1", 0), DrbdNode("beta", "10.99.0.2", 1)),
    disk="/dev/vda",
)

# ---- samples: the loaded module's version -------------------------------------------------

PROC_84 = """version: 8.4.11 (api:1/proto:86-101)
srcversion: F73C670A7EC572DB9CF3E5B

 0: cs:WFConnection ro:Secondary/Unknown ds:Inconsistent/DUnknown C r----s
    ns:0 nr:0 dw:0 dr:0 al:8 bm:0 lo:0 pe:0 ua:0 ap:0 ep:1 wo:f oos:65496
"""
PROC_9 = """version: 9.2.12 (api:2/proto:86-122)
GIT-hash: 0123456789abcdef0123456789abcdef01234567 build by builder@host, 2024-11-05
Transports (api:21): tcp (9.2.12)
"""
BUILDTAG = "DRBDADM_BUILDTAG=GIT-hash:\\ 0123456789abcdef\\ build\\ by\\ builder@host\n"
#: drbdadm --version of drbd-utils 9.22 with a DRBD 9 module.
ADM_9 = (
    BUILDTAG
    + """DRBDADM_API_VERSION=2
DRBD_KERNEL_VERSION_CODE=0x09020c
DRBD_KERNEL_VERSION=9.2.12
DRBDADM_VERSION_CODE=0x091600
DRBDADM_VERSION=9.22.0
"""
)
#: The same with 8.4 loaded: drbdadm hands over to drbdadm-84, which prints no
#: DRBD_KERNEL_VERSION line, only the code.
ADM_84 = (
    BUILDTAG
    + """DRBDADM_API_VERSION=1
DRBD_KERNEL_VERSION_CODE=0x08040b
DRBDADM_VERSION_CODE=0x091600
DRBDADM_VERSION=9.22.0
"""
)
#: drbd-utils 9.22 without a module: the kernel version is 0.
ADM_NONE = (
    BUILDTAG
    + """DRBDADM_API_VERSION=2
DRBD_KERNEL_VERSION_CODE=0x000000
DRBD_KERNEL_VERSION=0
DRBDADM_VERSION_CODE=0x091600
DRBDADM_VERSION=9.22.0
"""
)

# ---- samples: drbdsetup events2 r0 --now --statistics --timestamps on 8.4.11 ---------------

T = "2025-01-20T10:00:00.000113+00:00"
DEV = "upper-pending:0 lower-pending:0 al-suspended:no blocked:no"
PEER = "name:r0 peer-node-id:0 conn-name:peer"

#: Up on one host whose peer never answers, after create-md: every block out of sync.
CONNECTING = f"""\
{T} exists resource name:r0 role:Secondary suspended:no write-ordering:flush
{T} exists device name:r0 volume:0 minor:0 disk:Inconsistent size:65496 read:0 written:0 \
al-writes:0 bm-writes:0 {DEV}
{T} exists connection {PEER} connection:Connecting role:Unknown congested:no
{T} exists peer-device {PEER} volume:0 minor:0 replication:Off peer-disk:DUnknown \
resync-suspended:no received:0 sent:0 out-of-sync:65496 pending:0 unacked:0
{T} exists -
"""

#: The Primary after the initial sync.
CONNECTED = f"""\
{T} exists resource name:r0 role:Primary suspended:no write-ordering:flush
{T} exists device name:r0 volume:0 minor:0 disk:UpToDate size:65496 read:65540 written:8256 \
al-writes:5 bm-writes:0 {DEV}
{T} exists connection {PEER} connection:Connected role:Secondary congested:no
{T} exists peer-device {PEER} volume:0 minor:0 replication:Established peer-disk:UpToDate \
resync-suspended:no received:0 sent:73752 out-of-sync:0 pending:0 unacked:0
{T} exists -
"""

#: The Primary a quarter into the initial sync: 49122 of 65496 KiB still out of sync.
SYNC_SOURCE = f"""\
{T} exists resource name:r0 role:Primary suspended:no write-ordering:flush
{T} exists device name:r0 volume:0 minor:0 disk:UpToDate size:65496 read:16374 written:0 \
al-writes:0 bm-writes:2 {DEV}
{T} exists connection {PEER} connection:Connected role:Secondary congested:no
{T} exists peer-device {PEER} volume:0 minor:0 replication:SyncSource peer-disk:Inconsistent \
resync-suspended:no received:0 sent:16374 out-of-sync:49122 pending:1 unacked:0
{T} exists -
"""


def status(text: str, pair: Pair84 | None = None) -> ResourceStatus:
    st = status_from_events(parse_events2(text.splitlines()), "r0", pair)
    assert st is not None
    return st


# ---- the dialect of the loaded module -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version", "dialect"),
    [
        (PROC_84, "8.4.11", "8.4"),
        (PROC_9, "9.2.12", "9"),
        (ADM_9, "9.2.12", "9"),
        (ADM_84, "8.4.11", "8.4"),
    ],
    ids=["proc-84", "proc-9", "drbdadm-9", "drbdadm-84"],
)
def test_module_version_and_dialect(text: str, version: str, dialect: str) -> None:
    assert parse_module_version(text) == version
    assert dialect_of(version) == dialect


def test_no_module_loaded_is_an_error_naming_what_was_read() -> None:
    with pytest.raises(DiskError, match="no DRBD kernel module loaded") as info:
        parse_module_version(ADM_NONE)
    assert "DRBD_KERNEL_VERSION=0" in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", "version: unknown\n", "srcversion: F73C670A7EC572DB9CF3E5B\n"],
)
def test_unparseable_version_is_an_error_naming_what_was_read(text: str) -> None:
    with pytest.raises(DiskError, match="no DRBD module version") as info:
        parse_module_version(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("version", ["8.3.16", "10.0.0", "banana"])
def test_versions_neither_dialect_covers(version: str) -> None:
    with pytest.raises(DiskError, match=version):
        dialect_of(version)


def scripted(tmp_path: Path, tool: str, body: str) -> DrbdTools:
    script = tmp_path / tool
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return DrbdTools(binaries={tool: str(script)})


def test_detect_dialect_asks_drbdadm(tmp_path: Path) -> None:
    args = tmp_path / "args"
    (tmp_path / "out").write_text(ADM_84)
    tools = scripted(tmp_path, "drbdadm", f'echo "$@" > {args}\ncat {tmp_path / "out"}\n')
    assert detect_dialect(tools) == "8.4"
    assert args.read_text().split() == ["--version"]


def test_detect_dialect_in_a_dry_run_reads_nothing() -> None:
    tools = DrbdTools(dry_run=True)
    with pytest.raises(DiskError, match="no DRBD module version"):
        detect_dialect(tools)
    assert tools.recorded == [("drbdadm", "--version")]


# ---- the 8.4 argv -------------------------------------------------------------------------


def test_84_argv_has_no_color_and_status_reads_events() -> None:
    tools = DrbdTools(dry_run=True)
    adm = DrbdAdm("r0", tools=tools, dialect="8.4")
    now = ("drbdsetup", "events2", "r0", "--now", "--statistics", "--timestamps")
    assert adm.events_argv(now=True) == now
    assert adm.status_argv() == now
    assert adm.status() is None  # a dry run prints nothing: no resource
    assert adm.events_now() == []
    assert list(adm.watch()) == []
    assert tools.recorded == [
        now,
        now,
        ("drbdsetup", "events2", "r0", "--statistics", "--timestamps"),
    ]


DRBDSETUP_84 = Path("/usr/lib/drbd/drbdsetup-84")


@pytest.mark.skipif(not DRBDSETUP_84.exists(), reason="drbd-utils' drbdsetup-84 not installed")
def test_84_options_exist_in_drbdsetup_84s_usage() -> None:
    """drbdsetup-84 checks for the module before parsing options: check the spellings
    against its ``help events2`` instead (which lists no --color)."""
    usage = subprocess.run(
        [str(DRBDSETUP_84), "help", "events2"],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        check=True,
    ).stdout
    offered = set(re.findall(r"\[(--[a-z-]+)", usage))
    adm = DrbdAdm("r0", dialect="8.4")
    for argv in (adm.events_argv(now=True), adm.events_argv(now=False), adm.status_argv()):
        assert set(argv[3:]) <= offered, (argv, usage)
    assert "--color" not in offered


def test_the_9_argv_is_unchanged() -> None:
    adm = DrbdAdm("r0", tools=DrbdTools(dry_run=True))
    assert adm.dialect == "9"
    assert adm.status_argv() == ("drbdsetup", "status", "r0", "--json")
    assert adm.events_argv(now=False) == (
        "drbdsetup", "events2", "r0", "--statistics", "--timestamps", "--color=never",
    )  # fmt: skip


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(ConfigError, match="dialect"):
        DrbdAdm("r0", dialect="8.3")


def test_84_resource_writes_the_84_file_and_names_its_peer(tmp_path: Path) -> None:
    res = DrbdResource(
        CFG, "beta", config_path=tmp_path / "r0.res", tools=DrbdTools(dry_run=True), dialect="8.4"
    )
    assert res.write_config().read_text() == render_resource(CFG, dialect="8.4")
    assert res.pair == Pair84(node_id=1, peer_node_id=0, peer_name="alpha")


def test_84_status_through_a_scripted_drbdsetup(tmp_path: Path) -> None:
    args = tmp_path / "args"
    (tmp_path / "out").write_text(SYNC_SOURCE)
    tools = scripted(tmp_path, "drbdsetup", f'echo "$@" > {args}\ncat {tmp_path / "out"}\n')
    st = DrbdResource(CFG, "alpha", config_path=tmp_path / "r0.res", tools=tools, dialect="8.4")
    got = st.status()
    assert args.read_text().split() == [
        "events2", "r0", "--now", "--statistics", "--timestamps",
    ]  # fmt: skip
    assert got is not None and got.resync_percent == 25.0
    assert (got.node_id, got.connections[0].peer_node_id, got.connections[0].name) == (
        0, 1, "beta",
    )  # fmt: skip


def test_84_status_of_a_resource_that_is_down(tmp_path: Path) -> None:
    tools = scripted(tmp_path, "drbdsetup", 'echo "r0: No such resource" >&2\nexit 10\n')
    assert DrbdAdm("r0", tools=tools, dialect="8.4").status() is None
    tools = scripted(tmp_path, "drbdsetup", 'echo "exists -"\n')
    assert DrbdAdm("r0", tools=tools, dialect="8.4").status() is None


def test_84_status_failure_other_than_down_raises(tmp_path: Path) -> None:
    tools = scripted(tmp_path, "drbdsetup", 'echo "unrecognized option" >&2\nexit 20\n')
    with pytest.raises(DrbdError) as info:
        DrbdAdm("r0", tools=tools, dialect="8.4").status()
    assert info.value.rc == 20


# ---- status from 8.4's events -------------------------------------------------------------


def test_connecting_with_an_inconsistent_disk() -> None:
    st = status(CONNECTING)
    assert (st.name, st.node_id, st.role, st.suspended) == ("r0", 0, Role.SECONDARY, False)
    (dev,) = st.devices
    assert (dev.volume, dev.minor, dev.disk_state, dev.size_kib) == (
        0, 0, DiskState.INCONSISTENT, 65496,
    )  # fmt: skip
    assert dev.quorum and not dev.client  # no quorum, no diskless clients in 8.4
    (conn,) = st.connections
    assert (conn.peer_node_id, conn.name, conn.connection_state, conn.peer_role) == (
        1, "peer", ConnectionState.CONNECTING, Role.UNKNOWN,
    )  # fmt: skip
    (pd,) = conn.peer_devices
    assert (pd.replication_state, pd.peer_disk_state, pd.out_of_sync_kib) == (
        ReplicationState.OFF, DiskState.DUNKNOWN, 65496,
    )  # fmt: skip
    assert pd.percent_in_sync == 0.0 and pd.resync_done_percent is None and pd.eta_s is None
    assert not st.connected and not st.up_to_date and st.resync_percent is None


def test_connected_up_to_date_on_both_sides() -> None:
    st = status(CONNECTED)
    assert st.role is Role.PRIMARY
    assert st.connected and st.up_to_date and st.peers_up_to_date
    pd = st.connections[0].peer_devices[0]
    assert pd.replication_state is ReplicationState.ESTABLISHED
    assert pd.percent_in_sync == 100.0 and pd.out_of_sync_kib == 0
    assert st.resync_percent is None
    assert st.to_dict()["connections"][0]["peer_role"] == "Secondary"


def test_sync_source_with_out_of_sync_and_done_percent() -> None:
    st = status(SYNC_SOURCE, Pair84(node_id=0, peer_node_id=1, peer_name="beta"))
    pd = st.connections[0].peer_devices[0]
    assert (pd.replication_state, pd.peer_disk_state, pd.out_of_sync_kib) == (
        ReplicationState.SYNC_SOURCE, DiskState.INCONSISTENT, 49122,
    )  # fmt: skip
    assert pd.percent_in_sync == 25.0 and pd.resync_done_percent == 25.0
    assert st.resync_percent == 25.0
    assert st.connected and st.up_to_date and not st.peers_up_to_date
    assert st.connections[0].name == "beta"


def test_later_changes_and_other_resources() -> None:
    lines = [
        *CONNECTED.splitlines(),
        f"{T} exists resource name:r1 role:Secondary suspended:no",
        f"{T} change connection {PEER} connection:NetworkFailure role:Unknown",
        f"{T} change peer-device {PEER} volume:0 minor:0 replication:Off peer-disk:DUnknown",
        f"{T} change resource name:r0 suspended:fencing",
        f"{T} call helper {PEER} volume:0 minor:0 helper:fence-peer",
    ]
    st = status("\n".join(lines))
    assert st.suspended and st.role is Role.PRIMARY
    conn = st.connections[0]
    assert conn.connection_state is ConnectionState.NETWORK_FAILURE
    assert conn.peer_devices[0].replication_state is ReplicationState.OFF
    assert status_from_events(parse_events2(lines), "r2") is None
    gone = [*lines, f"{T} destroy device name:r0 volume:0 minor:0"]
    assert status("\n".join(gone)).devices == ()


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("disk:Inconsistent", "disk:Wobbly", "disk state"),
        ("connection:Connecting", "connection:WFConnection", "connection state"),
        ("replication:Off", "", "replication"),
        ("minor:0 disk", "minor:x disk", "minor"),
    ],
)
def test_unknown_or_missing_states_are_errors(old: str, new: str, match: str) -> None:
    assert old in CONNECTING
    with pytest.raises(DiskError, match=match):
        status(CONNECTING.replace(old, new))


def test_the_monitor_reads_84_events() -> None:
    mon = DrbdMonitor("r0")
    assert mon.feed_all(parse_events2(CONNECTED.splitlines())) == []
    lost = f"{T} change connection {PEER} connection:NetworkFailure role:Unknown"
    notices = mon.feed_all(parse_events2([lost]))
    # 8.4's events name every peer "peer", node id 0.
    assert notices[0] == ConnectionLost("r0", "peer", 0, ConnectionState.NETWORK_FAILURE)
