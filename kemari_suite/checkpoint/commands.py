"""The primary's control-socket commands (``kemari status``, ``checkpoint``, ``stop``,
``switchover``; ``fault`` only with KEMARI_FAULTS=1), as a table for the control server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import ReplicationError
from kemari_suite.testing import faults

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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

    table: dict[str, Handler] = {
        "status": status,
        "checkpoint": checkpoint,
        "stop": stop,
        "switchover": switchover,
    }
    if faults.enabled():
        table["fault"] = faults.control_handler
    return table


__all__ = ["handlers"]
