"""The built-in disk's sidecar carries the tiebreaker generation of the data it holds,
the way the shared disk's lease block does:

- the standby learns the generation of the primary streaming to it (from the
  tiebreaker: the holder is that primary, paired) and records it with every commit;
  until it knows, a new primary's commits record none (unknown never refuses);
- the standby that wins a takeover records its grant's generation before resuming;
- a copy whose generation is older than the holder's refuses to take over, and an
  operator's failover of it is refused unless the data loss is accepted; both errors
  name the two generations.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kemari_suite.config import ReplicationConfig, load
from kemari_suite.disk.builtin import read_sidecar, read_sidecar_generation, sidecar_path
from kemari_suite.errors import FailoverError
from kemari_suite.ha.witness import Decision, WitnessClient, WitnessServer
from kemari_suite.replica import commands
from kemari_suite.replica.generation import GenerationWatch
from kemari_suite.replica.monitor import FailoverRequest, PrimaryWatch
from kemari_suite.replica.replicadisk import BuiltinCopy
from kemari_suite.replica.states import SecondaryState
from kemari_suite.service.metrics import Artifacts
from kemari_suite.tap.epochs import IOOp, OpKind, encode
from tests.unit.test_receiver import _builtin

KEY = b"k" * 32


def encode_log(epoch: int, writes: list[tuple[int, bytes]]) -> bytes:
    return encode(epoch, [IOOp(OpKind.WRITE, off, len(data), data) for off, data in writes])


def _commit_copy(copy: BuiltinCopy, lineage: str, epoch: int) -> None:
    copy.begin_copy(lineage, incremental=False)
    copy.write_now(encode_log(epoch, [(0, b"n" * 4096)]))
    copy.commit(epoch, [])


def test_the_standby_records_the_generation_of_the_primary_it_learned(tmp_path: Path) -> None:
    cfg, copy = _builtin(tmp_path)
    sidecar = sidecar_path(cfg.disk.path)
    try:
        copy.new_primary()
        _commit_copy(copy, "L1", 1)
        assert read_sidecar_generation(sidecar) is None  # not learned yet: none recorded
        copy.learn_generation(5)
        copy.commit(2, [encode_log(2, [(0, b"d" * 10)])])
        assert read_sidecar_generation(sidecar) == 5
        assert read_sidecar(sidecar).epoch == 2 and copy.generation() == 5
        # The same primary: later commits keep it.
        copy.commit(3, [])
        assert read_sidecar_generation(sidecar) == 5
        # A new primary connection: the first commit it brings records no generation
        # until the new one is learned (it may be another run), not the old one.
        copy.new_primary()
        assert read_sidecar_generation(sidecar) == 5  # epoch 3 is still run 5's data
        copy.commit(4, [])
        assert read_sidecar_generation(sidecar) is None
        assert read_sidecar(sidecar).epoch == 4
        copy.learn_generation(6)
        copy.commit(5, [])
        assert read_sidecar_generation(sidecar) == 6
    finally:
        copy.close()


def test_the_winner_of_a_takeover_records_its_grant_before_resuming(tmp_path: Path) -> None:
    cfg, copy = _builtin(tmp_path)
    sidecar = sidecar_path(cfg.disk.path)
    copy.learn_generation(3)
    _commit_copy(copy, "L1", 1)
    assert read_sidecar_generation(sidecar) == 3
    copy.prepare_failover(1, generation=4)
    # Nobody's replica any more (no lineage), but the data is run 4's from here on.
    assert not read_sidecar(sidecar).lineage
    assert read_sidecar_generation(sidecar) == 4


def test_a_failover_without_a_grant_records_no_generation(tmp_path: Path) -> None:
    cfg, copy = _builtin(tmp_path)
    copy.learn_generation(3)
    _commit_copy(copy, "L1", 1)
    copy.prepare_failover(1)
    assert not sidecar_path(cfg.disk.path).exists()


def _decision(owner: str | None, generation: int, *, solo: bool = False) -> Decision:
    return Decision(False, owner, generation, 0.0, "query", solo=solo)


def test_only_the_paired_primary_at_the_other_end_tells_the_generation() -> None:
    watch = GenerationWatch(retry_s=1.0)
    assert not watch.due(0.0)  # no primary yet
    watch.new_link("pri")
    assert watch.due(0.0)
    assert watch.accept(_decision("pri", 7)) == 7
    assert watch.accept(_decision("pri", 8, solo=True)) is None  # leaving us behind
    assert watch.accept(_decision(None, 7)) is None  # not claimed yet: a bump may follow
    assert watch.accept(_decision("other", 7)) is None


def test_the_watch_learns_from_a_real_witness_and_retries_no_faster_than_asked() -> None:
    async def main() -> None:
        server = WitnessServer(KEY, 3.0, "127.0.0.1", 0)
        await server.start()
        assert isinstance(server._server, asyncio.Server)
        addr = f"127.0.0.1:{server._server.sockets[0].getsockname()[1]}"
        try:
            pri = WitnessClient(KEY, addr, "vm", "pri", timeout=5)
            sec = WitnessClient(KEY, addr, "vm", "sec", timeout=5)
            now = [100.0]
            watch = GenerationWatch(retry_s=1.0, clock=lambda: now[0])
            watch.new_link("pri")
            assert await watch.learn(sec) is None  # the primary holds nothing yet
            assert not watch.due(now[0] + 0.5)
            now[0] += 1.0
            assert (await pri.ask("solo")).granted
            assert await watch.learn(sec) is None  # solo: no
            now[0] += 1.0
            granted = await pri.ask("paired")
            assert await watch.learn(sec) == granted.generation
            assert watch.known == granted.generation and not watch.due(now[0] + 99)
            # An answer that arrives for a link that is gone is dropped.
            watch.new_link("pri")
            token = watch.token
            watch.new_link("pri")
            assert watch.settle(token, _decision("pri", 9)) is None and watch.known is None
        finally:
            await server.close()

    asyncio.run(main())


class FakeTiebreaker:
    def __init__(self, **answers: Decision) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.last_granted_sent: float | None = None

    async def ask(self, op: str) -> Decision:
        self.asked.append(op)
        return self.answers[op]

    def lease_valid(self, lease_s: float, margin_s: float) -> bool:
        return True


RCFG = dataclasses.replace(
    ReplicationConfig(), heartbeat_interval_ms=20, heartbeat_timeout_ms=100, tiebreaker="witness"
)


def _watch(witness: FakeTiebreaker, generation: int | None) -> tuple[PrimaryWatch, list[Any]]:
    got: list[Any] = []
    standby = [True]

    async def fail_over(req: FailoverRequest) -> None:
        got.append(req)
        standby[0] = False

    watch = PrimaryWatch(
        RCFG,
        witness,  # type: ignore[arg-type]
        standby=lambda: standby[0],
        fail_over=fail_over,
        refused=got.append,
        copy_generation=lambda: generation,
    )
    return watch, got


def test_a_copy_older_than_the_holder_does_not_take_over() -> None:
    async def main() -> None:
        witness = FakeTiebreaker(
            query=_decision("pri", 6),
            takeover=Decision(True, "sec", 7, 3.0, "taken over after expiry"),
        )
        watch, got = _watch(witness, 4)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.4)
        task.cancel()
        assert "takeover" not in witness.asked  # never took the lease it cannot use
        (why,) = got
        assert isinstance(why, str)
        assert "generation 6" in why and "generation 4" in why, why

    asyncio.run(main())


def test_a_current_copy_takes_over_and_carries_its_grant() -> None:
    async def main() -> None:
        witness = FakeTiebreaker(
            query=_decision("pri", 6),
            takeover=Decision(True, "sec", 7, 3.0, "taken over after expiry"),
        )
        watch, got = _watch(witness, 6)
        await asyncio.wait_for(watch.run(), 5)
        assert witness.asked == ["query", "takeover"]
        (req,) = got
        assert isinstance(req, FailoverRequest) and req.generation == 7

    asyncio.run(main())


def test_an_operator_failover_checks_the_sidecar_generation(tmp_path: Path) -> None:
    witness = FakeTiebreaker(query=_decision("pri", 6))
    requested: list[str] = []
    agent = SimpleNamespace(
        state=SecondaryState.STANDBY,
        reason="",
        committed_epoch=3,
        report=None,
        artifacts=Artifacts(tmp_path / "art"),
        store=SimpleNamespace(copy_generation=lambda: 4, resumable=True),
        cfg=load(None),
    )

    def request(reason: str) -> None:
        requested.append(reason)
        agent.state = SecondaryState.ACTIVE

    agent.watch = SimpleNamespace(witness=witness, request=request)
    failover = commands.handlers(agent)["failover"]  # type: ignore[arg-type]
    with pytest.raises(FailoverError) as err:
        asyncio.run(failover({}))
    assert "generation 6" in str(err.value) and "generation 4" in str(err.value)
    assert "--accept-data-loss" in str(err.value) and requested == []
    asyncio.run(failover({"accept_data_loss": True}))
    assert requested == ["operator command"]
    agent.artifacts.close()


def test_the_receiver_path_still_works_without_any_generation(tmp_path: Path) -> None:
    """No tiebreaker (nothing ever learned): the copy keeps working, recording none."""
    cfg, copy = _builtin(tmp_path)
    try:
        _commit_copy(copy, "L1", 1)
        copy.commit(2, [])
        assert read_sidecar(sidecar_path(cfg.disk.path)).epoch == 2
        assert copy.generation() is None
        assert np.frombuffer(Path(cfg.disk.path).read_bytes()[:4], np.uint8).tolist() == [110] * 4
    finally:
        copy.close()
