"""The secondary's control-socket commands (``kemari status``, ``failover``, ``stop``;
``switchover`` only says where to run it; ``fault`` only with KEMARI_FAULTS=1), as a
table for the control server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kemari_suite.errors import FailoverError, ReplicationError
from kemari_suite.replica.failover import operator_failover_check
from kemari_suite.replica.states import SecondaryState as S
from kemari_suite.testing import faults

if TYPE_CHECKING:
    from kemari_suite.replica.secondary import SecondaryAgent

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def status(agent: SecondaryAgent) -> dict[str, Any]:
    """The secondary's status (``kemari status``)."""
    return {
        "role": "secondary",
        "vm": agent.spec.name,
        "node_id": agent.node_id,
        "state": agent.state.value,
        "protected": agent.state is S.STANDBY,
        "since": agent.life.since,
        "reason": agent.reason,
        "last_committed_epoch": agent.committed_epoch,
        "epochs_committed": agent.store.epochs_committed,
        "kept_checkpoint": agent.store.kept_status(),
        "qemu_pid": agent.vm.pid,
        "accel": agent.spec.accel,
        "failover": None if agent.report is None else agent.report.__dict__,
        "replay": agent.replay.status(),
        "guest_events": agent.guest.log.status(),
        "compat": agent.compat,
        "alerts": agent.artifacts.alert_history(),
        "states": agent.life.sequence(),
        "image_id": agent.spec.image_id,
        "image_source": agent.spec.image_source,
        "image_reason": agent.spec.image_reason,
    }


async def cluster_promoted(agent: SecondaryAgent) -> None:
    """Under ``tiebreaker = "pacemaker"`` the cluster decides where the VM runs: a
    failover asked on the control socket (``kemari failover``, or the resource agent's
    promote) goes ahead only while Pacemaker's promotion of this node is in force.

    Raises:
        FailoverError: this node is not promoted (the tiebreaker says why).
    """
    tiebreaker = agent.watch.witness
    if agent.cfg.replication.tiebreaker != "pacemaker" or tiebreaker is None:
        return
    decision = await tiebreaker.ask("takeover")
    if not decision.granted:
        agent.artifacts.event("failover-refused", reason=decision.reason)
        raise FailoverError(
            f'{decision.reason}; with replication.tiebreaker = "pacemaker" the cluster '
            "decides: move or promote the resource with pcs or crm (e.g. `crm resource "
            "move RSC NODE`), never around it"
        )


def handlers(agent: SecondaryAgent) -> dict[str, Handler]:
    """The command table of ``agent``'s control socket."""

    async def status(req: dict[str, Any]) -> Any:
        return agent.status_dict()

    async def failover(req: dict[str, Any]) -> Any:
        """``kemari failover --yes``: resume the VM here, unless the tiebreaker knows
        this copy to be stale (the holder ran solo, or its generation is newer than the
        one the disk copy records) and the operator did not accept the data loss."""
        if agent.state is S.ACTIVE:
            return {"already": True, "report": agent.report.__dict__ if agent.report else None}
        if agent.state is S.STOPPED:
            raise FailoverError(f"this standby is stopped: {agent.reason}")
        if not agent.store.resumable:
            # (A kept switchover checkpoint is no checkpoint: it has no device state.)
            raise FailoverError("no committed checkpoint yet: nothing to fail over to")
        if agent.state is not S.FAILING_OVER:
            await cluster_promoted(agent)
            await operator_failover_check(
                agent.watch.witness,
                agent.store.copy_generation(),
                agent.artifacts,
                accept_data_loss=bool(req.get("accept_data_loss")),
            )
            agent.watch.request("operator command")
        # Wait for it to finish so the operator sees the result.
        while agent.state is not S.ACTIVE:
            if agent.state is S.STOPPED:
                raise FailoverError(agent.reason)
            await asyncio.sleep(0.05)
        return agent.report.__dict__ if agent.report else {}

    async def switchover(req: dict[str, Any]) -> Any:
        raise ReplicationError(
            f"this host is the {agent.state.value} standby: run `kemari switchover` on the "
            "host that runs the VM"
        )

    async def stop(req: dict[str, Any]) -> Any:
        agent.request_stop()
        return {"stopping": True}

    table: dict[str, Handler] = {
        "status": status,
        "failover": failover,
        "stop": stop,
        "switchover": switchover,
    }
    if faults.enabled():
        table["fault"] = faults.control_handler
    return table


__all__ = ["cluster_promoted", "handlers", "status"]
