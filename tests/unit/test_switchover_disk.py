"""A planned switchover demotes the primary's disk before it asks the peer, and promotes it
again before the VM resumes here whenever this host takes the VM back.

The switchover runs against real disk backends (the built-in disk on a file, the shared
disk with its lease on a file) and the real lease keeper and fencing; the agent around
them is a stand-in for what needs QEMU and a peer (:class:`Host`): it records every
step with the disk's role at that moment, so the order is read from the real backend.
:class:`RefusingDrbd` is a fake: the built-in disk whose ``demote`` (and, when asked,
``promote``) fails the way ``drbdadm`` does, to reach the failure paths.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kemari_suite.checkpoint import loss
from kemari_suite.checkpoint.arbiter import LeaseKeeper
from kemari_suite.checkpoint.states import PRIMARY_TRANSITIONS, PrimaryState
from kemari_suite.checkpoint.switchover import run_switchover
from kemari_suite.disk import DiskBackend, DiskRole
from kemari_suite.disk.builtin import BuiltinDisk
from kemari_suite.disk.shared import (
    SharedDiskBackend,
    SharedDiskConfig,
    create_shared_image,
    format_shared,
)
from kemari_suite.errors import DrbdError, FailoverError, ReplicationError
from kemari_suite.ha.lease import LEASE_BLOCK, Lease, LeaseTiebreaker
from kemari_suite.protocol import wire
from kemari_suite.service.lifecycle import Lifecycle
from kemari_suite.service.metrics import Artifacts

EPOCH = 41


class RefusingDrbd(BuiltinDisk):
    """FAKE: the built-in disk whose ``demote`` fails like ``drbdadm secondary`` refused
    (after closing nothing), and whose ``promote`` fails too when ``refuse_promote``."""

    def __init__(self, path: Path, *, refuse_promote: bool = False) -> None:
        super().__init__(path, role=DiskRole.PRIMARY)
        self.refuse_promote = refuse_promote
        self.promotes = 0

    def demote(self) -> None:
        raise DrbdError("kemari0", "drbdadm secondary kemari0", 11, "State change failed")

    def promote(self) -> None:
        self.promotes += 1
        if self.refuse_promote:
            raise DrbdError("kemari0", "drbdadm primary kemari0", 11, "Refusing to be Primary")
        super().promote()


class Host:
    """The agent's parts that need QEMU or a peer, recording each step; the disk, the
    lease keeper, the lifecycle, the artifacts and fencing are the real ones."""

    def __init__(
        self,
        tmp: Path,
        disk: DiskBackend | None,
        *,
        answer: dict[str, Any] | None,
        witness: LeaseTiebreaker | None = None,
        sync_fails: bool = False,
    ) -> None:
        self.steps: list[tuple[str, str]] = []
        self.disk = disk
        self.answer = answer
        self.sync_fails = sync_fails
        self.epoch = EPOCH
        self.outcome = "stopped"
        self.switched_epoch = -1
        self.switched_lineage = ""
        self.stopped = False
        self.rcfg = _Obj(peer="10.0.0.2:7410")
        self.artifacts = Artifacts(tmp / "artifacts")
        self.life: Lifecycle[PrimaryState] = Lifecycle(
            "primary", PrimaryState.STARTING, PRIMARY_TRANSITIONS
        )
        self.life.set(PrimaryState.SYNCING)
        self.life.set(PrimaryState.PROTECTED)
        self.lease = LeaseKeeper(
            witness,
            interval_s=0.05,
            lease_s=3.0,
            tiebreaker_name="lease",
            secondary_silent=lambda: False,
            on_fenced=lambda why: self.steps.append(("lease-fenced", why)),
            on_unreachable=lambda why: None,
        )
        self.io = _Obj(disk=disk, lineage="abc", released=self._released)
        self.vm = _Obj(execute=self._execute, kill=self._kill, proc=None)
        self.peer = _Obj(switch_reply=None)
        self.session = _Obj(link=_Obj(send=self._send))

    # ---- what the switchover calls ------------------------------------------------------

    def _role(self) -> str:
        return self.disk.status().role.value if self.disk is not None else "-"

    async def sync_point(self, trigger: str, *, resume: bool = True) -> None:
        self.steps.append(("sync", self._role()))
        assert not resume
        if self.sync_fails:
            raise ReplicationError("the final epoch was not acknowledged")
        self.epoch += 1

    async def _released(self, epoch: int) -> None:
        self.steps.append(("released", self._role()))

    async def _execute(self, cmd: str) -> None:
        self.steps.append((cmd, self._role()))

    async def _kill(self) -> None:
        self.steps.append(("kill", self._role()))

    async def _send(self, msg: object) -> None:
        assert isinstance(msg, wire.SwitchoverRequest) and msg.epoch == EPOCH
        self.steps.append(("ask", self._role()))
        fut = self.peer.switch_reply
        if self.answer is None:
            raise ConnectionError("link closed")
        fut.set_result(self.answer)

    @property
    def state(self) -> PrimaryState:
        return self.life.state

    def set_state(self, state: PrimaryState, reason: str = "") -> None:
        self.life.set(state, reason)

    def request_stop(self) -> None:
        self.stopped = True

    async def fence(self, reason: str) -> None:
        await loss.fence(self, reason)  # type: ignore[arg-type]

    # ---- reading what happened ----------------------------------------------------------

    def names(self) -> list[str]:
        return [s for s, _ in self.steps]

    def role_at(self, step: str) -> str:
        return dict(self.steps)[step]

    def events(self) -> list[dict[str, Any]]:
        text = (self.artifacts.root / "events.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]


class _Obj:
    """A bag of attributes (the stand-in's parts)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def _switch(host: Host) -> tuple[bool | BaseException, asyncio.Future[dict[str, Any]]]:
    async def go() -> tuple[bool | BaseException, asyncio.Future[dict[str, Any]]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            done: bool | BaseException = await run_switchover(host, fut)  # type: ignore[arg-type]
        except (ReplicationError, FailoverError) as err:
            done = err
        finally:
            await host.lease.pause()
        return done, fut

    return asyncio.run(go())


@pytest.fixture
def builtin(tmp_path: Path) -> BuiltinDisk:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    disk = BuiltinDisk(img, role=DiskRole.PRIMARY)
    disk.attach()
    disk.promote()
    disk.apply([(4096, b"x" * 512)])
    return disk


def test_the_disk_is_demoted_before_the_peer_is_asked(tmp_path: Path, builtin: BuiltinDisk) -> None:
    host = Host(tmp_path, builtin, answer={"ok": True, "resume_ms": 120.0})
    done, fut = _switch(host)
    assert done is True
    assert host.names() == ["sync", "released", "ask"]
    # The peer was asked by a host whose disk no longer counted it as its writer.
    assert host.role_at("released") == "primary" and host.role_at("ask") == "secondary"
    info = fut.result()
    spans = info["spans_ms"]
    assert list(spans) == ["final_sync", "released", "disk_flush", "disk_demote", "lease", "peer"]
    assert all(v >= 0 for v in spans.values())
    assert host.state is PrimaryState.SWITCHED and host.outcome == "standby"
    assert [e["event"] for e in host.events()] == ["switchover"]
    assert host.events()[0]["spans_ms"]["disk_demote"] == spans["disk_demote"]
    # The copy stays readable (the next protection reads it as the standby's).
    assert builtin.read(4096, 512) == b"x" * 512


def test_a_refused_switchover_promotes_the_disk_before_the_vm_resumes(
    tmp_path: Path, builtin: BuiltinDisk
) -> None:
    host = Host(tmp_path, builtin, answer={"ok": False, "reason": "replica behind"})
    done, fut = _switch(host)
    assert done is False
    assert host.names() == ["sync", "released", "ask", "cont"]
    assert host.role_at("ask") == "secondary" and host.role_at("cont") == "primary"
    assert host.state is PrimaryState.PROTECTED
    with pytest.raises(ReplicationError, match="replica behind; the VM runs on here"):
        fut.result()
    builtin.apply([(0, b"y" * 512)])  # the writer again


def test_no_answer_and_no_tiebreaker_holds_with_the_disk_demoted(
    tmp_path: Path, builtin: BuiltinDisk
) -> None:
    host = Host(tmp_path, builtin, answer=None)
    done, fut = _switch(host)
    assert done is False
    # The peer may be running the VM: no cont, and the disk is not taken back.
    assert host.names() == ["sync", "released", "ask"]
    assert builtin.role is DiskRole.SECONDARY
    assert host.state is PrimaryState.HELD
    with pytest.raises(ReplicationError, match="outcome unknown"):
        fut.result()


def test_a_failed_final_sync_never_touches_the_disk(tmp_path: Path, builtin: BuiltinDisk) -> None:
    host = Host(tmp_path, builtin, answer={"ok": True}, sync_fails=True)
    done, _ = _switch(host)
    assert isinstance(done, ReplicationError)
    assert host.names() == ["sync", "cont"] and host.role_at("cont") == "primary"


def test_a_refused_demote_aborts_and_the_vm_runs_on_here(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    disk = RefusingDrbd(img)
    disk.attach()
    host = Host(tmp_path, disk, answer={"ok": True})
    done, fut = _switch(host)
    # The peer is never asked; the disk is promoted again, then the VM resumes.
    assert isinstance(done, ReplicationError)
    assert host.names() == ["sync", "released", "cont"]
    assert disk.promotes == 1 and host.role_at("cont") == "primary"
    assert "drbdadm secondary kemari0" in str(done) and "runs on here" in str(done)
    with pytest.raises(ReplicationError, match="did not demote"):
        fut.result()
    assert host.state is PrimaryState.PROTECTED
    assert [e["event"] for e in host.events()] == ["switchover-failed"]


def test_a_disk_that_cannot_be_promoted_back_is_fenced_not_resumed(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    disk = RefusingDrbd(img, refuse_promote=True)
    disk.attach()
    host = Host(tmp_path, disk, answer={"ok": True})
    done, fut = _switch(host)
    assert isinstance(done, FailoverError)
    assert "cont" not in host.names() and host.names()[-1] == "kill"
    assert host.state is PrimaryState.FENCED and host.stopped
    assert "could not be promoted back" in host.life.reason
    with pytest.raises(ReplicationError, match="Refusing to be Primary"):
        fut.result()


# ---- shared storage: its lease travels with the demote ---------------------------------


@pytest.fixture
def shared(tmp_path: Path) -> tuple[SharedDiskConfig, SharedDiskBackend, SharedDiskBackend]:
    lun = create_shared_image(tmp_path / "lun.img", 2 << 20)
    cfg = SharedDiskConfig(str(lun), "kemari0")
    format_shared(cfg)
    ours, peer = SharedDiskBackend(cfg, "alpha"), SharedDiskBackend(cfg, "beta")
    ours.attach()
    ours.promote()
    peer.attach()
    return cfg, ours, peer


def test_a_shared_disk_hands_its_lease_to_the_peer_at_the_switchover(
    tmp_path: Path, shared: tuple[SharedDiskConfig, SharedDiskBackend, SharedDiskBackend]
) -> None:
    _, ours, peer = shared
    host = Host(tmp_path, ours, answer={"ok": True})
    done, _ = _switch(host)
    assert done is True and host.role_at("ask") == "secondary"
    assert ours.lease is not None and ours.lease.holder().owner is None
    # The peer's promote (what its takeover runs) gets the lease at once.
    peer.promote()
    assert peer.lease is not None and peer.lease.holder().owner == "beta"


def test_a_refused_switchover_takes_the_shared_lease_back_before_cont(
    tmp_path: Path, shared: tuple[SharedDiskConfig, SharedDiskBackend, SharedDiskBackend]
) -> None:
    _, ours, _peer = shared
    (tmp_path / "witness.lease").write_bytes(b"\0" * LEASE_BLOCK)
    lease = Lease(tmp_path / "witness.lease", resource="kemari0", lease_s=3.0)
    lease.format()
    lease.acquire("alpha")
    witness = LeaseTiebreaker(lease, "alpha")
    host = Host(tmp_path, ours, answer={"ok": False, "reason": "busy"}, witness=witness)
    done, _ = _switch(host)
    assert done is False
    assert host.names() == ["sync", "released", "ask", "cont"]
    assert host.role_at("cont") == "primary"
    assert ours.lease is not None and ours.lease.holder().owner == "alpha"
    # The tiebreaker's lease was given back for the peer, then taken back.
    assert lease.holder().owner == "alpha"
