"""DRBD with the real kernel module: create-md, up, primary, writes, status, events, down.

These tests need the DRBD 9 kernel module (``modprobe drbd``; /proc/drbd present) and
root. The machines the suite is developed on have neither, so they are skipped there;
see kemari_suite/disk/README.md for how to run them on a real host. They use a single
host: the resource's peer is a node that never answers, so the connection stays
Connecting and nothing is replicated (the replication itself needs two hosts, see the
README's manual procedure).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kemari_suite.disk.base import DiskRole
from kemari_suite.disk.drbd import DrbdBackend, DrbdConfig, DrbdNode, DrbdResource
from kemari_suite.disk.drbdstate import (
    ConnectionState,
    DiskState,
    DrbdMonitor,
    Role,
    RoleChanged,
)
from kemari_suite.errors import DrbdError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.drbd_kernel,
    pytest.mark.skipif(
        not Path("/proc/drbd").exists(),
        reason="needs the DRBD 9 kernel module (/proc/drbd absent)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="DRBD needs root"),
]

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
SLOT = int(WORKER[2:]) if WORKER[2:].isdigit() else 0


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 64 MiB loop device on a sparse file, detached afterwards."""
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
        backing.unlink(missing_ok=True)


@pytest.fixture
def resource(tmp_path: Path, loop_device: str) -> Iterator[DrbdResource]:
    me = socket.gethostname()
    cfg = DrbdConfig(
        f"kemtest{SLOT}",
        (
            DrbdNode(me, "127.0.0.1", 0, port=17789 + SLOT),
            # A peer that never answers: the connection stays Connecting.
            DrbdNode("kemari-absent-peer", "127.0.0.2", 1, port=17789 + SLOT),
        ),
        disk=loop_device,
        minor=200 + SLOT,
        # The kernel runs handlers through plain drbdadm, which reads /etc/drbd.conf and
        # would not find this temporary resource; no fencing on a single host.
        fencing="dont-care",
        fence_peer_handler="",
    )
    res = DrbdResource(cfg, me, config_path=tmp_path / f"{cfg.resource}.res")
    res.write_config()
    try:
        yield res
    finally:
        try:
            res.down()
        except DrbdError:
            pass


def test_create_md_up_primary_write_status_down(resource: DrbdResource) -> None:
    resource.create_md(force=True)
    backend = DrbdBackend(resource.config, resource.node, config_path=resource.config_path)
    backend.attach()
    backend.attach()  # adjust: idempotent
    st = resource.status()
    assert st is not None and st.role is Role.SECONDARY
    assert st.connections[0].connection_state in (
        ConnectionState.CONNECTING,
        ConnectionState.UNCONNECTED,
    )
    # Without an UpToDate peer DRBD refuses a plain promote...
    with pytest.raises(DrbdError) as info:
        backend.promote()
    assert info.value.rc != 0 and info.value.stderr
    # ...and the first promotion of a brand-new resource is forced.
    resource.primary(force=True)
    backend.promote()
    backend.apply([(0, b"kemari drbd test"), (1 << 20, b"second")])
    backend.flush()
    ds = backend.status()
    assert ds.role is DiskRole.PRIMARY and ds.up_to_date and not ds.connected
    st = resource.status()
    assert st is not None and st.devices[0].disk_state is DiskState.UP_TO_DATE
    with open(resource.config.device, "rb") as f:
        assert f.read(16) == b"kemari drbd test"
    events = resource.events_now()
    assert events[-1].initial_state_done
    mon = DrbdMonitor(resource.name)
    mon.feed_all(events)
    assert mon.role is Role.PRIMARY
    backend.demote()
    backend.close()
    st = resource.status()
    assert st is not None and st.role is Role.SECONDARY
    resource.down()
    assert resource.status() is None


def test_watch_reports_role_changes(resource: DrbdResource) -> None:
    resource.create_md(force=True)
    resource.up()
    mon = DrbdMonitor(resource.name)
    seen: list[object] = []
    done = threading.Event()

    def follow() -> None:
        try:
            for ev in resource.watch():
                seen.extend(mon.feed(ev))
                if any(isinstance(n, RoleChanged) and n.new is Role.SECONDARY for n in seen):
                    break
        except DrbdError:
            pass
        finally:
            done.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    resource.primary(force=True)
    resource.secondary()
    assert done.wait(10)
    changes = [n for n in seen if isinstance(n, RoleChanged) and n.peer is None]
    assert [c.new for c in changes][:2] == [Role.PRIMARY, Role.SECONDARY]
