"""DRBD 8.4 in the lab without a kernel: the 8.4 resource file (checked by drbd-utils'
own drbdadm-84 dry run) and the /proc/drbd parser."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kemari_suite.disk.drbdconf import DrbdConfig, DrbdNode, QuorumOptions, render_resource
from kemari_suite.errors import ConfigError, DrbdError
from kemari_suite.klab.agent import RunResult
from kemari_suite.klab.drbd import (
    GuestDrbdTools,
    L1DrbdResource,
    parse_proc_drbd,
    peer_lost_by,
    refused_state_changes,
    render_for_kernel,
    render_resource_84,
)

DRBDADM_84 = Path("/usr/lib/drbd/drbdadm-84")


def config(**kw: object) -> DrbdConfig:
    base: dict[str, object] = {
        "resource": "r0",
        "nodes": (DrbdNode("l1a", "10.99.0.1", 0), DrbdNode("l1b", "10.99.0.2", 1)),
        "disk": "/dev/vda",
        "fence_peer_handler": "/usr/local/sbin/klab-fence-peer {resource}",
    }
    base.update(kw)
    return DrbdConfig(**base)  # type: ignore[arg-type]


def test_84_file_keeps_the_safe_defaults() -> None:
    text = render_resource_84(config())
    assert "protocol C;" in text
    assert "fencing resource-and-stonith;" in text.split("net {")[0]  # disk section in 8.4
    assert 'fence-peer "/usr/local/sbin/klab-fence-peer r0";' in text
    for policy in ("after-sb-0pri", "after-sb-1pri", "after-sb-2pri"):
        assert f"{policy} disconnect;" in text
    for word in ("node-id", "connection-mesh", "quorum", "auto-promote"):
        assert word not in text


@pytest.mark.parametrize(
    "kw",
    [
        {
            "nodes": (
                DrbdNode("a", "10.0.0.1", 0),
                DrbdNode("b", "10.0.0.2", 1),
                DrbdNode("c", "10.0.0.3", 2),
            )
        },
        {
            "nodes": (DrbdNode("a", "10.0.0.1", 0), DrbdNode("b", "10.0.0.2", 1, disk="none")),
            "quorum": QuorumOptions("majority"),
        },
        {"quorum": QuorumOptions("majority")},
    ],
    ids=["three-nodes", "diskless", "quorum"],
)
def test_84_refuses_what_it_cannot_express(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        render_resource_84(config(**kw))


def test_the_dialect_follows_the_loaded_module() -> None:
    cfg = config()
    assert render_for_kernel(cfg, "8.4.11") == render_resource_84(cfg)
    assert render_for_kernel(cfg, "9.2.12") == render_resource(cfg)


@pytest.mark.skipif(not DRBDADM_84.exists(), reason="drbd-utils' drbdadm-84 not installed")
@pytest.mark.parametrize("node", ["l1a", "l1b"])
def test_drbdadm_84_accepts_the_file(tmp_path: Path, node: str) -> None:
    res = tmp_path / "r0.res"
    res.write_text(render_resource_84(config()))
    done = subprocess.run(
        [str(DRBDADM_84), "-c", str(res), "-d", "up", "r0"],
        capture_output=True,
        text=True,
        env={**os.environ, "__DRBD_NODE__": node, "LC_ALL": "C"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--fencing=resource-and-stonith" in done.stdout
    assert "--protocol=C" in done.stdout


@pytest.mark.skipif(not DRBDADM_84.exists(), reason="drbd-utils' drbdadm-84 not installed")
def test_drbdadm_84_rejects_the_drbd9_file(tmp_path: Path) -> None:
    """Why the lab needs the 8.4 dialect at all."""
    res = tmp_path / "r0.res"
    res.write_text(render_resource(config()))
    done = subprocess.run(
        [str(DRBDADM_84), "-c", str(res), "-d", "up", "r0"],
        capture_output=True,
        env={**os.environ, "__DRBD_NODE__": "l1a"},
        check=False,
    )
    assert done.returncode != 0


CONNECTED = """version: 8.4.11 (api:1/proto:86-101)
srcversion: F73C670A7EC572DB9CF3E5B

 0: cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate C r-----
    ns:65536 nr:0 dw:0 dr:66440 al:8 bm:0 lo:0 pe:0 ua:0 ap:0 ep:1 wo:f oos:0
"""
SYNCING = """version: 8.4.11 (api:1/proto:86-101)
srcversion: F73C670A7EC572DB9CF3E5B

 0: cs:SyncSource ro:Primary/Secondary ds:UpToDate/Inconsistent C r-----
    ns:1024 nr:0 dw:0 dr:2048 al:8 bm:0 lo:0 pe:1 ua:0 ap:0 ep:1 wo:f oos:64472
\t[>....................] sync'ed:  2.0% (64472/65496)K
\tfinish: 0:00:31 speed: 2,048 (2,048) K/sec
 1: cs:WFConnection ro:Secondary/Unknown ds:UpToDate/DUnknown C r-----
    ns:0 nr:0 dw:0 dr:0 al:0 bm:0 lo:0 pe:0 ua:0 ap:0 ep:1 wo:f oos:12
"""


def test_proc_drbd_parses_states_and_out_of_sync() -> None:
    done = parse_proc_drbd(CONNECTED)
    assert done.version == "8.4.11"
    m = done.minors[0]
    assert (m.cs, m.role, m.peer_role, m.disk, m.peer_disk, m.oos_kib) == (
        "Connected", "Primary", "Secondary", "UpToDate", "UpToDate", 0,
    )  # fmt: skip
    assert m.in_sync
    assert m.summary() == "cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate"
    syncing = parse_proc_drbd(SYNCING)
    assert syncing.minors[0].oos_kib == 64472 and not syncing.minors[0].in_sync
    lost = syncing.minors[1]
    assert (lost.cs, lost.peer_role, lost.peer_disk, lost.oos_kib) == (
        "WFConnection", "Unknown", "DUnknown", 12,
    )  # fmt: skip
    assert parse_proc_drbd("version: 8.4.11 (api:1/proto:86-101)\n").minors == {}


def test_how_the_peer_was_lost_is_read_from_the_kernel_log() -> None:
    """8.4's state-change lines (``print_st``) on the standby after the primary's kill."""
    up = (
        "[   12.1] drbd r0: conn( StandAlone -> Unconnected )\n"
        "[   13.0] drbd r0: conn( WFReportParams -> Connected ) pdsk( DUnknown -> UpToDate )\n"
    )
    forced = up + (
        "[  330.2] drbd r0: conn( Connected -> Disconnecting ) peer( Primary -> Unknown )\n"
        "[  330.2] drbd r0: conn( Disconnecting -> StandAlone )\n"
    )
    noticed = up + (
        "[  312.4] drbd r0: PingAck did not arrive in time.\n"
        "[  312.4] drbd r0: peer( Primary -> Unknown ) conn( Connected -> NetworkFailure ) "
        "pdsk( UpToDate -> DUnknown )\n"
    )
    assert peer_lost_by(forced) == "disconnect"
    assert peer_lost_by(noticed) == "network"
    assert peer_lost_by(up) == ""
    refused = noticed + (
        "[  312.5] block drbd0: State change failed: Refusing to be Primary while peer is "
        "not outdated\n"
        "[  312.5] block drbd0:   state = { cs:WFConnection ro:Secondary/Unknown }\n"
    )
    assert refused_state_changes(refused) == ["Refusing to be Primary while peer is not outdated"]
    assert refused_state_changes(up) == []


def test_proc_drbd_without_a_module_is_an_error() -> None:
    with pytest.raises(DrbdError):
        parse_proc_drbd("")


class FakeL1:
    """Records commands; answers /proc/drbd like an 8.4 module."""

    def __init__(self, fail: str = "") -> None:
        self.commands: list[tuple[str, bytes]] = []
        self.fail = fail

    def run(
        self, command: str, *, timeout: float = 120.0, stdin: bytes = b"", check: bool = True
    ) -> RunResult:
        self.commands.append((command, stdin))
        out = CONNECTED if command == "cat /proc/drbd" else ""
        code = 10 if self.fail and self.fail in command else 0
        return RunResult("l1a", command, code, out, "bad" if code else "", 0.1, False, False)


def test_drbdadm_runs_inside_the_l1_with_the_projects_wrapper() -> None:
    l1 = FakeL1()
    res = L1DrbdResource(config(), "l1a", l1)
    res.write_config()
    res.create_md(force=True)
    res.up()
    res.primary()
    written = [stdin for cmd, stdin in l1.commands if "cat > /etc/drbd.d/r0.res" in cmd]
    assert written == [render_resource_84(config()).encode()]
    ran = [cmd for cmd, _ in l1.commands if "drbdadm" in cmd]
    assert ran == [
        "LC_ALL=C drbdadm -c /etc/drbd.d/r0.res create-md --force r0",
        "LC_ALL=C drbdadm -c /etc/drbd.d/r0.res up r0",
        "LC_ALL=C drbdadm -c /etc/drbd.d/r0.res primary r0",
    ]


def test_a_failed_drbdadm_in_the_l1_is_a_drbd_error() -> None:
    tools = GuestDrbdTools(FakeL1(fail="primary"))
    with pytest.raises(DrbdError) as info:
        tools.run("r0", ["drbdadm", "primary", "r0"], node="l1a")
    assert info.value.rc == 10 and info.value.resource == "r0"


def test_records_are_checked_like_records_c_writes_them(tmp_path: Path) -> None:
    from kemari_suite.klab.kvmrecords import RECORD_MAGIC, record_valid, valid_records

    def record(n: int) -> bytes:
        # Record 1 as records.c computes it: FNV-1a over [0, 24) and [32, 4096).
        head = RECORD_MAGIC + n.to_bytes(8, "little")
        body = bytes([n & 0xFF]) * (4096 - 32)
        h = 0xCBF29CE484222325
        for b in head + body:
            h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
        return head + h.to_bytes(8, "little") + body

    disk = tmp_path / "disk"
    disk.write_bytes(record(0) + record(1) + record(2) + b"\0" * 4096 + record(4))
    assert valid_records(disk, 100) == 3
    assert valid_records(disk, 2) == 2
    bad = bytearray(record(5))
    bad[100] ^= 1
    assert record_valid(record(5), 5) and not record_valid(bytes(bad), 5)
    assert not record_valid(record(5), 6)
