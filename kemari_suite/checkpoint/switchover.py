"""A planned switchover, the primary's side: hand the VM to the standby at a checkpoint.

::

    final sync point (guest stays stopped) ─► released output, flushed disk
      ─► stop renewing the lease ─► demote the disk ─► release the lease
      ─► SwitchoverRequest(epoch, lineage)
      ─► Switched(done)     : SWITCHED, this host becomes the standby, keeping its
                              stopped guest's RAM as the replica (:mod:`.baseline`)
      ─► Switched(refused)  : take the lease back, promote the disk, ``cont``; the VM
                              runs on here
      ─► no answer, no tiebreaker: HELD, the VM stays stopped and the disk demoted (the
                              peer may run it)

The guest is never resumed here once the secondary has it: the secondary resumes
exactly the checkpoint this host stopped at, so nothing the guest did is lost, and it
pauses for about one sync point plus the secondary's resume.

The disk lets go of its writer role before the peer is asked (``demote``, off the event
loop: DRBD flushes, closes ``/dev/drbdN`` and runs ``drbdadm secondary``; shared storage
flushes and gives back its lease and SCSI reservation; the built-in disk flushes and
records the role), so the peer's ``promote`` meets a Secondary, not a connected Primary
it would wait for and refuse. The lease keeper stops renewing first, so that no renewal
races a backend that gives a lease back. Whenever this host takes the VM back (the demote
failed, or the peer refused or did not answer and the tiebreaker gives the lease back
to us), the disk is promoted again *before* ``cont``: a guest never runs here on a disk
it may not write. If that promotion fails too, the VM is not resumed: this host fences
itself (QEMU killed; the standby holds the final checkpoint, nothing acknowledged is
lost, and takes over through the tiebreaker or the operator's ``kemari failover``).

Where the pause goes is in the ``switchover`` event's ``spans_ms`` (and the peer's in its
``failover`` event): the final sync point, its output released and its writes flushed,
the disk demoted, the lease handed back, then the peer's resume and answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import DiskError, ReplicationError
from kemari_suite.protocol import wire

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent
    from kemari_suite.disk import DiskBackend

#: How long the secondary may take to resume the VM before the outcome is unknown.
ANSWER_TIMEOUT_S = 60.0


async def run_switchover(agent: PrimaryAgent, result: asyncio.Future[dict[str, Any]]) -> bool:
    """Run the switchover asked for; True if the VM now runs on the peer.

    ``result`` gets the outcome (a dict) or the ReplicationError the operator sees.

    Raises:
        ReplicationError: the final sync point failed, or the disk did not demote (the
            VM runs on here, its disk promoted again).
        FailoverError: the disk could not be promoted again when this host took the VM
            back (fenced: QEMU killed, the VM is not resumed here).
    """
    assert agent.session is not None
    t0 = time.monotonic()
    epoch = agent.epoch
    spans: dict[str, float] = {}
    disk = agent.io.disk if agent.io is not None else None
    try:
        await agent.sync_point("switchover", resume=False)
        t = _span(spans, "final_sync", t0)
        # The final epoch's writes are on our disk and its output is out.
        if agent.io is not None:
            await asyncio.wait_for(agent.io.released(epoch), 30)
            t = _span(spans, "released", t)
            if disk is not None:
                await asyncio.to_thread(disk.flush)
                t = _span(spans, "disk_flush", t)
    except (ReplicationError, TimeoutError) as err:
        await agent.vm.execute("cont")
        aborted = ReplicationError(f"switchover aborted: {err}")
        if not result.done():
            result.set_exception(aborted)
        raise aborted from err
    # Stop renewing before the disk lets go: a backend that gives a lease back (shared
    # storage) must not meet a renewal of it.
    await agent.lease.pause()
    if disk is not None:
        try:
            await asyncio.to_thread(disk.demote)
        except (DiskError, OSError) as err:
            await _demote_failed(agent, disk, result, err)
        t = _span(spans, "disk_demote", t)
    t_stopped = time.monotonic()
    # Let the peer take the lease at once.
    await agent.lease.release()
    t = _span(spans, "lease", t)
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
        # Unknown outcome and nobody to ask: the peer may be running the guest (and
        # writing the disk: ours stays demoted).
        agent.set_state(
            PrimaryState.HELD, f"switchover outcome unknown ({why}): the VM stays stopped"
        )
        failure = ReplicationError(f"switchover outcome unknown: {why}; the VM stays stopped")
    else:
        if agent.lease.witness is not None:
            granted, lease_why = await agent.lease.ask("renew")
            if not granted:
                await _fence(
                    agent, result, f"switchover ({why}): the peer holds the lease ({lease_why})"
                )
            agent.lease.start()
        await _promote_back(agent, disk, result, f"switchover refused ({why})")
        await agent.vm.execute("cont")
        failure = ReplicationError(f"switchover refused: {why}; the VM runs on here")
    agent.artifacts.event("switchover-failed", reason=why)
    if not result.done():
        result.set_exception(failure)
    return False


async def _demote_failed(
    agent: PrimaryAgent,
    disk: DiskBackend,
    result: asyncio.Future[dict[str, Any]],
    err: Exception,
) -> None:
    """The disk did not let go of its writer role (DRBD refused ``secondary``): the peer
    is never asked; the lease (never released) is renewed again, the disk promoted again
    (a failed demote may have closed the device or given a lease back) and the VM resumed.

    Raises:
        ReplicationError: always, naming the disk's error (the VM runs on here).
        FailoverError: the promotion failed too (fenced, the VM not resumed).
    """
    why = f"the disk did not demote: {err}"
    agent.artifacts.event("switchover-failed", reason=why)
    agent.lease.start()
    await _promote_back(agent, disk, result, "switchover aborted")
    await agent.vm.execute("cont")
    aborted = ReplicationError(f"switchover aborted: {why}; the VM runs on here")
    if not result.done():
        result.set_exception(aborted)
    raise aborted from err


async def _promote_back(
    agent: PrimaryAgent,
    disk: DiskBackend | None,
    result: asyncio.Future[dict[str, Any]],
    context: str,
) -> None:
    """Make this host the disk's writer again before the VM resumes here.

    Raises:
        FailoverError: the backend refused (fenced: the VM is not resumed).
    """
    if disk is None:
        return
    try:
        await asyncio.to_thread(disk.promote)
    except (DiskError, OSError) as err:
        await _fence(
            agent,
            result,
            f"{context}, and the disk could not be promoted back ({err}): the VM is not "
            f"resumed here; the standby holds its last checkpoint",
        )


async def _fence(agent: PrimaryAgent, result: asyncio.Future[dict[str, Any]], reason: str) -> None:
    """Tell the operator (the event, the switchover's answer), then fence.

    Raises:
        FailoverError: always (:meth:`PrimaryAgent.fence`).
    """
    agent.artifacts.event("switchover-failed", reason=reason)
    if not result.done():
        result.set_exception(ReplicationError(f"switchover failed: {reason}"))
    await agent.fence(f"switchover: {reason}")


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
