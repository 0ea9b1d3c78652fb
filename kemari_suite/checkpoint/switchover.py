"""A planned switchover, the primary's side: hand the VM to the standby at a checkpoint.

::

    final sync point (guest stays stopped) ─► released output, flushed disk
      ─► stop renewing, release the lease ─► SwitchoverRequest(epoch, lineage)
      ─► Switched(done)     : SWITCHED, this host becomes the standby, keeping its
                              stopped guest's RAM as the replica (:mod:`.baseline`)
      ─► Switched(refused)  : take the lease back, ``cont``; the VM runs on here
      ─► no answer, no tiebreaker: HELD, the VM stays stopped (the peer may run it)

The guest is never resumed here once the secondary has it: the secondary resumes
exactly the checkpoint this host stopped at, so nothing the guest did is lost, and it
pauses for about one sync point plus the secondary's resume.

Where the pause goes is in the ``switchover`` event's ``spans_ms`` (and the peer's in its
``failover`` event): the final sync point, its output released and its writes flushed,
the lease handed back, then the peer's resume and answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import ReplicationError
from kemari_suite.protocol import wire

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

#: How long the secondary may take to resume the VM before the outcome is unknown.
ANSWER_TIMEOUT_S = 60.0


async def run_switchover(agent: PrimaryAgent, result: asyncio.Future[dict[str, Any]]) -> bool:
    """Run the switchover asked for; True if the VM now runs on the peer.

    ``result`` gets the outcome (a dict) or the ReplicationError the operator sees.

    Raises:
        ReplicationError: the final sync point failed (the VM runs on here).
    """
    assert agent.session is not None
    t0 = time.monotonic()
    epoch = agent.epoch
    spans: dict[str, float] = {}
    try:
        await agent.sync_point("switchover", resume=False)
        t = _span(spans, "final_sync", t0)
        # The final epoch's writes are on our disk and its output is out.
        if agent.io is not None:
            await asyncio.wait_for(agent.io.released(epoch), 30)
            t = _span(spans, "released", t)
            if agent.io.disk is not None:
                await asyncio.to_thread(agent.io.disk.flush)
                t = _span(spans, "disk_flush", t)
    except (ReplicationError, TimeoutError) as err:
        await agent.vm.execute("cont")
        aborted = ReplicationError(f"switchover aborted: {err}")
        if not result.done():
            result.set_exception(aborted)
        raise aborted from err
    t_stopped = time.monotonic()
    # Let the peer take the lease at once: stop renewing it, then release it.
    await agent.lease.pause()
    await agent.lease.release()
    t = _span(spans, "lease", t_stopped)
    reply = await _ask_peer(agent, epoch)
    _span(spans, "peer", t)
    if reply.get("ok"):
        info = {
            "switched": True,
            "epoch": epoch,
            "stop_ms": round((t_stopped - t0) * 1e3, 1),
            "pause_ms": round((time.monotonic() - t0) * 1e3, 1),
            "peer_resume_ms": reply.get("resume_ms"),
            "spans_ms": spans,
        }
        agent.artifacts.event("switchover", **info)
        agent.switched_epoch = epoch
        agent.switched_lineage = agent.io.lineage if agent.io is not None else ""
        agent.outcome = "standby"
        agent.set_state(PrimaryState.SWITCHED, f"the VM runs on {agent.rcfg.peer} now")
        agent.request_stop()
        if not result.done():
            result.set_result(info)
        return True
    why = str(reply.get("reason", "refused"))
    failure: ReplicationError
    if reply.get("ok") is None and agent.lease.witness is None:
        # Unknown outcome and nobody to ask: the peer may be running the guest.
        agent.set_state(
            PrimaryState.HELD, f"switchover outcome unknown ({why}): the VM stays stopped"
        )
        failure = ReplicationError(f"switchover outcome unknown: {why}; the VM stays stopped")
    else:
        if agent.lease.witness is not None:
            granted, lease_why = await agent.lease.ask("renew")
            if not granted:
                await agent.fence(f"switchover: the peer holds the lease ({lease_why})")
            agent.lease.start()
        await agent.vm.execute("cont")
        failure = ReplicationError(f"switchover refused: {why}; the VM runs on here")
    agent.artifacts.event("switchover-failed", reason=why)
    if not result.done():
        result.set_exception(failure)
    return False


def _span(spans: dict[str, float], name: str, since: float) -> float:
    """Record step ``name`` as the time since ``since`` (monotonic); returns now."""
    now = time.monotonic()
    spans[name] = round((now - since) * 1e3, 1)
    return now


async def _ask_peer(agent: PrimaryAgent, epoch: int) -> dict[str, Any]:
    """Send the request and wait for the answer: ok True (done), False (refused) or None
    (unknown: no answer)."""
    assert agent.session is not None
    agent.peer.switch_reply = asyncio.get_running_loop().create_future()
    lineage = agent.io.lineage if agent.io is not None else ""
    try:
        await agent.session.link.send(wire.SwitchoverRequest(epoch=epoch, lineage=lineage))
        return await asyncio.wait_for(agent.peer.switch_reply, ANSWER_TIMEOUT_S)
    except (TimeoutError, ConnectionError, OSError) as err:
        return {"ok": None, "reason": f"no answer from the secondary: {err or 'timeout'}"}
    finally:
        agent.peer.switch_reply = None


__all__ = ["run_switchover"]
