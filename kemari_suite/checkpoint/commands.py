"""The primary's control-socket commands (``kemari status``, ``checkpoint``, ``stop``,
``switchover``, ``release``; ``fault`` only with KEMARI_FAULTS=1), as a table for the
control server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kemari_suite.alerts import AlertKind
from kemari_suite.checkpoint import held
from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import ReplicationError
from kemari_suite.tap.outputs import unprotected_outputs
from kemari_suite.testing import faults

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def status(agent: PrimaryAgent) -> dict[str, Any]:
    """The primary's status (``kemari status``)."""
    return {
        "role": "primary",
        "vm": agent.spec.name,
        # This host's name at the tiebreaker (the same whatever role it runs).
        "node_id": agent.node_id,
        "state": agent.state.value,
        "protected": agent.state is PrimaryState.PROTECTED,
        "since": agent.life.since,
        "reason": agent.life.reason,
        "epoch": agent.epoch,
        "last_committed_epoch": agent.last_committed_epoch,
        "checkpoints": agent.checkpoints,
        "peer": agent.rcfg.peer,
        "qemu_pid": agent.vm.pid,
        "accel": agent.spec.accel,
        "mode": agent.rcfg.mode,
        "tracker": agent.tracker.name if agent.tracker else None,
        "tracker_reason": agent.tracker.reason if agent.tracker else None,
        "tracker_verify": agent.tracker.verification() if agent.tracker else None,
        "precopy": agent.syncs.precopy,
        # 0: once, half-way through the interval.
        "precopy_period_ms": agent.rcfg.precopy_period_ms if agent.syncs.precopy else None,
        # "migrate" every time, or xen-save-devices-state after the first (vm/devstate).
        "devstate_capture": (
            {"method": agent.capturer.method, "why": agent.capturer.why}
            if agent.capturer is not None
            else None
        ),
        "disk_resync": agent.resync,
        "initial_sync": agent.initial_sync,
        "io": agent.io.status() if agent.io is not None else None,
        **agent.held.status(),
        "compat": agent.peer.compat,
        "alerts": agent.artifacts.alert_history(),
        "failover": agent.failover_report,
        "states": agent.life.sequence(),
        "guest_events": agent.guest.log.status(),
        "image_id": agent.spec.image_id,
        "image_source": agent.spec.image_source,
        "image_reason": agent.spec.image_reason,
        "unprotected_outputs": unprotected_outputs(agent.cfg, agent.spec),
    }


def announce_unprotected(agent: PrimaryAgent) -> None:
    """One alert (kind ``unprotected-output``) per guest output the operator accepted
    outside output commit: raised when the VM starts or is adopted."""
    for line in unprotected_outputs(agent.cfg, agent.spec):
        agent.artifacts.event("unprotected-output", output=line)
        if agent.artifacts.alerter is not None:
            agent.artifacts.alerter.emit(
                AlertKind.UNPROTECTED_OUTPUT,
                f"output not protected (accepted with unprotected_output): {line}",
            )


def handlers(agent: PrimaryAgent) -> dict[str, Handler]:
    """The command table of ``agent``'s control socket."""

    async def status(req: dict[str, Any]) -> Any:
        return agent.status_dict()

    async def checkpoint(req: dict[str, Any]) -> Any:
        return {"epoch": await agent.request_sync("command", wait=True)}

    async def stop(req: dict[str, Any]) -> Any:
        agent.request_stop()
        return {"stopping": True}

    async def switchover(req: dict[str, Any]) -> Any:
        """Hand the VM to the secondary at a checkpoint; this host becomes the standby."""
        if agent.state is not PrimaryState.PROTECTED:
            raise ReplicationError(
                f"not protected ({agent.state.value}): a switchover needs a standby "
                "holding a current checkpoint"
            )
        if agent.switch_req is not None:
            raise ReplicationError("a switchover is already in progress")
        agent.switch_req = asyncio.get_running_loop().create_future()
        agent.triggers.request("switchover")
        try:
            return await agent.switch_req
        finally:
            agent.switch_req = None

    async def release(req: dict[str, Any]) -> Any:
        """Output held with no secondary: report it, or (``solo``) go on unprotected."""
        solo = req.get("solo", False)
        if not isinstance(solo, bool):
            raise ValueError(f"bad release request: solo must be true or false, not {solo!r}")
        return await held.release(agent, solo=solo)

    table: dict[str, Handler] = {
        "status": status,
        "checkpoint": checkpoint,
        "stop": stop,
        "switchover": switchover,
        "release": release,
    }
    if faults.enabled():
        table["fault"] = faults.control_handler
    return table


__all__ = ["announce_unprotected", "handlers", "status"]
