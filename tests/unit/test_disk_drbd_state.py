"""Parsing ``drbdsetup status --json`` and ``events2``.

The fixtures in tests/fixtures/drbd are hand-written in the drbd-utils 9.22 format (this
machine has no DRBD kernel module to record real output); see their README for the
source lines they follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kemari_suite.disk.drbdstate import (
    ConnectionEstablished,
    ConnectionLost,
    ConnectionState,
    DiskState,
    DiskStateChanged,
    DrbdMonitor,
    EventAction,
    EventObject,
    Events2Decoder,
    EventsLost,
    HelperEvent,
    ReplicationState,
    ResyncFinished,
    ResyncProgress,
    Role,
    RoleChanged,
    SplitBrain,
    parse_events2,
    parse_events2_line,
    parse_status_json,
)
from kemari_suite.errors import DiskError

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "drbd"


def status(name: str):  # type: ignore[no-untyped-def]
    (res,) = parse_status_json((FIX / name).read_text())
    return res


def events(name: str) -> list:  # type: ignore[type-arg]
    return list(parse_events2((FIX / name).read_text().splitlines()))


# ---- status --json ----------------------------------------------------------------------


def test_status_primary_connected() -> None:
    r = status("status-primary-connected.json")
    assert (r.name, r.node_id, r.role, r.suspended) == ("kemari0", 0, Role.PRIMARY, False)
    (dev,) = r.devices
    assert (dev.minor, dev.disk_state, dev.quorum, dev.size_kib) == (
        10,
        DiskState.UP_TO_DATE,
        True,
        1048576,
    )
    (conn,) = r.connections
    assert (conn.name, conn.peer_node_id, conn.connection_state, conn.peer_role) == (
        "beta",
        1,
        ConnectionState.CONNECTED,
        Role.SECONDARY,
    )
    (pd,) = conn.peer_devices
    assert pd.replication_state is ReplicationState.ESTABLISHED
    assert pd.peer_disk_state is DiskState.UP_TO_DATE
    assert pd.percent_in_sync == 100.0
    assert r.connected and r.up_to_date and r.peers_up_to_date
    assert r.resync_percent is None


def test_status_syncing_secondary_reports_resync_progress() -> None:
    r = status("status-secondary-syncing.json")
    assert r.role is Role.SECONDARY
    assert r.devices[0].disk_state is DiskState.INCONSISTENT
    assert not r.up_to_date
    pd = r.connections[0].peer_devices[0]
    assert pd.replication_state is ReplicationState.SYNC_TARGET
    assert pd.replication_state.resyncing
    assert pd.resync_done_percent == 25.0
    assert pd.out_of_sync_kib == 786432
    assert pd.eta_s == 24
    assert r.resync_percent == 25.0
    assert r.connections[0].peer_role is Role.PRIMARY


def test_status_after_split_brain() -> None:
    r = status("status-standalone-split-brain.json")
    assert r.role is Role.PRIMARY and r.up_to_date
    conn = r.connections[0]
    assert conn.connection_state is ConnectionState.STANDALONE
    assert conn.peer_role is Role.UNKNOWN
    assert conn.peer_devices[0].peer_disk_state is DiskState.DUNKNOWN
    assert conn.peer_devices[0].out_of_sync_kib == 16384
    assert not r.connected and not r.peers_up_to_date


def test_status_three_nodes_diskless_tiebreaker_is_not_a_data_peer() -> None:
    r = status("status-three-nodes.json")
    assert [c.name for c in r.connections] == ["beta", "wit"]
    wit = r.connections[1].peer_devices[0]
    assert wit.peer_client and wit.peer_disk_state is DiskState.DISKLESS
    assert r.connected and r.peers_up_to_date  # the diskless peer does not count
    d = r.to_dict()
    assert d["connections"][1]["peer_devices"][0]["peer_disk_state"] == "Diskless"
    json.dumps(d)


def test_status_empty_list() -> None:
    assert parse_status_json((FIX / "status-empty.json").read_text()) == []


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d[0].update(role="Leader"), "unrecognised role 'Leader'"),
        (lambda d: d[0]["devices"][0].update({"disk-state": "Sleepy"}), "disk state"),
        (lambda d: d[0]["connections"][0].pop("connection-state"), "connection-state"),
        (lambda d: d[0].update({"node-id": "0"}), "node-id"),
        (lambda d: d[0]["connections"][0]["peer_devices"][0].update({"volume": True}), "volume"),
    ],
)
def test_status_bad_input_is_an_error(mutate: object, words: str) -> None:
    data = json.loads((FIX / "status-primary-connected.json").read_text())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(DiskError, match=words):
        parse_status_json(json.dumps(data))


def test_status_not_json() -> None:
    with pytest.raises(DiskError, match="invalid JSON"):
        parse_status_json("# No currently configured DRBD found.\n")
    with pytest.raises(DiskError, match="list"):
        parse_status_json("{}")


# ---- events2 lines ----------------------------------------------------------------------


def test_parse_lines() -> None:
    ev = parse_events2_line(
        "2024-05-14T10:02:40.100211+00:00 change path name:kemari0 peer-node-id:1 "
        "conn-name:beta local:ipv4:10.99.0.1:7789 peer:ipv4:10.99.0.2:7789 established:yes"
    )
    assert ev is not None
    assert ev.action is EventAction.CHANGE and ev.obj is EventObject.PATH
    assert ev.timestamp == "2024-05-14T10:02:40.100211+00:00"
    assert ev.props["local"] == "ipv4:10.99.0.1:7789"  # split at the first colon only
    assert (ev.resource, ev.peer_node_id, ev.conn_name) == ("kemari0", 1, "beta")
    done = parse_events2_line("exists -")
    assert done is not None and done.initial_state_done
    skipped = parse_events2_line("- skipped 3")
    assert skipped is not None and skipped.action is EventAction.SKIPPED
    assert skipped.props["skipped"] == "3"
    assert parse_events2_line("   \n") is None
    # The exact lines of drbd-utils' own test tests/v9/events2-all-create-helper.test
    call = parse_events2_line(
        "call helper name:some-resource peer-node-id:1 conn-name:some-peer volume:0 "
        "helper:before-resync-target"
    )
    assert call is not None and call.obj is EventObject.HELPER and call.volume == 0


@pytest.mark.parametrize(
    "line",
    [
        "explode resource name:r0",
        "change gizmo name:r0",
        "change resource name:r0 role",
        "change resource role:Primary",
        "change",
        "- skipped many",
        "change -",
        "2024-05-14T10:00:00.000201+00:00",
    ],
)
def test_bad_lines(line: str) -> None:
    with pytest.raises(DiskError, match="events2"):
        parse_events2_line(line)


def test_now_snapshot_fixture() -> None:
    evs = events("events2-now-connected.txt")
    assert [e.obj for e in evs] == [
        EventObject.RESOURCE,
        EventObject.CONNECTION,
        EventObject.DEVICE,
        EventObject.PEER_DEVICE,
        None,
    ]
    assert all(e.action is EventAction.EXISTS for e in evs)
    assert evs[-1].initial_state_done
    mon = DrbdMonitor("kemari0")
    assert mon.feed_all(evs) == []  # the initial state only sets the state
    assert mon.role is Role.PRIMARY
    assert mon.disks == {0: DiskState.UP_TO_DATE}
    assert mon.peers[1].state is ConnectionState.CONNECTED
    assert mon.initial_state_done


def test_split_brain_stream() -> None:
    mon = DrbdMonitor("kemari0")
    notices = mon.feed_all(events("events2-split-brain.txt"))
    assert notices == [
        ConnectionLost("kemari0", "beta", 1, ConnectionState.NETWORK_FAILURE),
        RoleChanged("kemari0", "beta", Role.SECONDARY, Role.UNKNOWN),
        HelperEvent("kemari0", "fence-peer", "beta", None, response=False, status=None),
        HelperEvent("kemari0", "fence-peer", "beta", None, response=True, status=1792),
        ConnectionEstablished("kemari0", "beta", 1),
        RoleChanged("kemari0", "beta", Role.UNKNOWN, Role.PRIMARY),
        SplitBrain("kemari0", "beta", 1, 0, unresolved=False),
        HelperEvent("kemari0", "initial-split-brain", "beta", 0, response=True, status=0),
        SplitBrain("kemari0", "beta", 1, 0, unresolved=True),
        HelperEvent("kemari0", "split-brain", "beta", 0, response=True, status=0),
        ConnectionLost("kemari0", "beta", 1, ConnectionState.DISCONNECTING),
        RoleChanged("kemari0", "beta", Role.PRIMARY, Role.UNKNOWN),
    ]
    fence = notices[3]
    assert isinstance(fence, HelperEvent) and fence.exit_code == 7  # 1792 = 7 << 8
    assert mon.peers[1].state is ConnectionState.STANDALONE
    assert mon.role is Role.PRIMARY


def test_resync_stream() -> None:
    mon = DrbdMonitor("kemari0")
    notices = mon.feed_all(events("events2-resync.txt"))
    progress = [n for n in notices if isinstance(n, ResyncProgress)]
    assert [(p.state, p.done_percent, p.out_of_sync_kib) for p in progress] == [
        (ReplicationState.WF_BITMAP_S, None, None),
        (ReplicationState.SYNC_SOURCE, 0.0, 16384),
        (ReplicationState.SYNC_SOURCE, 50.0, 8192),
        (ReplicationState.SYNC_SOURCE, 87.5, 2048),
    ]
    assert EventsLost(2) in notices
    assert notices[-1] == ResyncFinished("kemari0", "beta", 0)
    assert ConnectionEstablished("kemari0", "beta", 1) in notices
    # Nothing about the device: its disk state never changed.
    assert not any(isinstance(n, DiskStateChanged) for n in notices)


def test_monitor_local_role_disk_and_other_resources() -> None:
    mon = DrbdMonitor("kemari0")
    lines = [
        "exists resource name:kemari0 role:Secondary suspended:no force-io-failures:no "
        "may_promote:yes promotion_score:10101",
        "exists device name:kemari0 volume:0 minor:10 backing_dev:/dev/sda disk:UpToDate "
        "client:no quorum:yes",
        "exists -",
        "change resource name:other role:Primary",
        "change resource name:kemari0 role:Primary may_promote:no promotion_score:10102",
        "change device name:kemari0 volume:0 minor:10 disk:Failed quorum:no",
        "destroy resource name:kemari0",
    ]
    notices = mon.feed_all(parse_events2(lines))
    assert notices[0] == RoleChanged("kemari0", None, Role.SECONDARY, Role.PRIMARY)
    assert notices[1] == DiskStateChanged("kemari0", 0, DiskState.UP_TO_DATE, DiskState.FAILED)
    assert notices[2].quorum is False  # type: ignore[union-attr]
    assert len(notices) == 3
    assert mon.role is None


def test_monitor_unknown_state_is_an_error() -> None:
    mon = DrbdMonitor()
    (ev,) = parse_events2(["change connection name:r0 peer-node-id:1 conn-name:b connection:Dazed"])
    with pytest.raises(DiskError, match="unrecognised connection state 'Dazed'"):
        mon.feed(ev)


def test_incremental_decoder_splits_anywhere() -> None:
    data = (FIX / "events2-split-brain.txt").read_bytes()
    whole = events("events2-split-brain.txt")
    for step in (1, 7, 64, 1000):
        dec = Events2Decoder()
        got = []
        for i in range(0, len(data), step):
            got.extend(dec.feed(data[i : i + step]))
        assert got == whole
        assert dec.pending == b""
    dec = Events2Decoder()
    assert dec.feed(b"exists -\nchange resource name:r0 ro") == [parse_events2_line("exists -")]
    assert dec.pending == b"change resource name:r0 ro"
