"""The secondary's watch over the primary: heartbeat timeout -> tiebreaker -> failover,
with a fake tiebreaker and short timeouts (no sockets, no QEMU)."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from kemari_suite.config import ReplicationConfig
from kemari_suite.errors import ConnectError, FailoverError
from kemari_suite.replica.monitor import FailoverRequest, PrimaryWatch


@dataclass
class Decision:
    granted: bool
    reason: str = ""
    generation: int = 0


class FakeTiebreaker:
    def __init__(self, *answers: Decision | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []
        self.last_granted_sent: float | None = None

    async def ask(self, op: str) -> Decision:
        self.asked.append(op)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def lease_valid(self, lease_s: float, margin_s: float) -> bool:
        return True


RCFG = dataclasses.replace(
    ReplicationConfig(), heartbeat_interval_ms=20, heartbeat_timeout_ms=100, tiebreaker="witness"
)


class Standby:
    """The agent's side: standby until a failover ran."""

    def __init__(self, *, fail: bool = False) -> None:
        self.standby = True
        self.requests: list[FailoverRequest] = []
        self.refusals: list[str] = []
        self.fail = fail

    async def fail_over(self, req: FailoverRequest) -> None:
        self.requests.append(req)
        if self.fail:
            raise FailoverError("QEMU would not start")
        self.standby = False

    def watch(self, rcfg: ReplicationConfig, witness: FakeTiebreaker | None) -> PrimaryWatch:
        return PrimaryWatch(
            rcfg,
            witness,  # type: ignore[arg-type]
            standby=lambda: self.standby,
            fail_over=self.fail_over,
            refused=self.refusals.append,
        )


def test_a_silent_primary_fails_over_when_the_tiebreaker_grants() -> None:
    async def main() -> None:
        host = Standby()
        witness = FakeTiebreaker(Decision(True))
        await asyncio.wait_for(host.watch(RCFG, witness).run(), 5)
        assert witness.asked == ["takeover"]
        (req,) = host.requests
        assert "no frame from the primary" in req.reason and not req.operator
        assert req.tiebreak_ms >= 20  # one heartbeat interval of margin

    asyncio.run(main())


def test_refusals_are_said_once_per_cause_and_the_standby_waits() -> None:
    async def main() -> None:
        host = Standby()
        witness = FakeTiebreaker(
            Decision(False, "the primary holds the lease"),
            Decision(False, "the primary holds the lease"),
            ConnectError("witness", "refused"),
            Decision(True),
        )
        await asyncio.wait_for(host.watch(RCFG, witness).run(), 5)
        assert len(host.refusals) == 2
        assert "tiebreaker refused: the primary holds the lease" in host.refusals[0]
        assert "witness unreachable" in host.refusals[1]
        assert len(host.requests) == 1

    asyncio.run(main())


def test_without_a_tiebreaker_only_an_operator_fails_over() -> None:
    async def main() -> None:
        host = Standby()
        watch = host.watch(dataclasses.replace(RCFG, tiebreaker="none"), None)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.3)
        assert host.requests == [] and len(host.refusals) == 1
        assert "waiting for `kemari failover`" in host.refusals[0]
        watch.request("operator command")
        await asyncio.wait_for(task, 5)
        assert host.requests[0].operator and host.requests[0].reason == "operator command"

    asyncio.run(main())


def test_a_primary_that_is_heard_is_not_lost() -> None:
    async def main() -> None:
        host = Standby()
        witness = FakeTiebreaker(Decision(True))
        watch = host.watch(RCFG, witness)
        task = asyncio.create_task(watch.run())
        for _ in range(15):
            watch.heard()
            await asyncio.sleep(0.02)
        assert witness.asked == [] and host.requests == []
        task.cancel()

    asyncio.run(main())


def test_a_failed_failover_ends_the_watch() -> None:
    async def main() -> None:
        host = Standby(fail=True)
        watch = host.watch(RCFG, FakeTiebreaker(Decision(True)))
        watch.request("operator command")
        await asyncio.wait_for(watch.run(), 5)
        assert len(host.requests) == 1

    asyncio.run(main())
