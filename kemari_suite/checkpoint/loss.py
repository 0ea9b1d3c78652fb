"""Losing the secondary, and fencing: the primary's side of a failure.

::

    secondary lost ─► LeaseKeeper.on_secondary_lost ─► UNPROTECTED (output released,
                      writes go through)  │  FENCED (QEMU killed)  │  HELD (operator)
    QEMU hung or cannot be resumed ─► host_failure: QEMU killed by its PID ─► FENCED
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from kemari_suite.checkpoint.states import PrimaryState
from kemari_suite.errors import FailoverError

if TYPE_CHECKING:
    from kemari_suite.checkpoint.primary import PrimaryAgent

log = logging.getLogger(__name__)


async def secondary_lost(agent: PrimaryAgent, reason: str) -> None:
    """Decide, through the tiebreaker, whether to go on unprotected or to fence."""
    agent.acks.fail(f"secondary lost: {reason}")
    if agent.io is not None and agent.state is PrimaryState.PROTECTED:
        agent.io.acked_at_loss = agent.last_committed_epoch
    if agent.session is not None:
        agent.session.link.close()
        agent.session = None
    if agent.state in (PrimaryState.UNPROTECTED, PrimaryState.HELD):
        return
    agent.artifacts.event("secondary-lost", reason=reason)
    verdict = await agent.lease.on_secondary_lost(reason)
    if verdict.outcome == "unprotected":
        if agent.io is not None:
            await agent.io.unprotect()
        agent.set_state(PrimaryState.UNPROTECTED, verdict.reason)
    elif verdict.outcome == "fence":
        await fence(agent, verdict.reason)
    else:
        agent.set_state(PrimaryState.HELD, verdict.reason)


async def fence(agent: PrimaryAgent, reason: str) -> None:
    """Stop the guest for good: another host may run it now.

    Raises:
        FailoverError: always (the agent's run ends with it).
    """
    log.error("primary fenced: %s", reason)
    agent.set_state(PrimaryState.FENCED, reason)
    agent.artifacts.event("fenced", reason=reason)
    with contextlib.suppress(Exception):
        await agent.vm.kill()
    agent.request_stop()
    raise FailoverError(f"this host stopped its VM: {reason}")


async def host_failure(agent: PrimaryAgent, reason: str) -> None:
    """QEMU is hung (no answer to ``stop``, ``cont`` or the capture in time) or cannot be
    resumed: kill it by its PID now and count this host as failed. The standby, if any,
    takes over from its last committed checkpoint; output never acknowledged stays
    unreleased (it dies with the taps).

    Raises:
        FailoverError: always (the agent's run ends with it).
    """
    pid = agent.vm.pid
    log.error("host failure: %s; killing QEMU pid %s", reason, pid)
    agent.artifacts.event("host-failure", reason=reason, qemu_pid=pid)
    if agent.vm.proc is not None and agent.vm.proc.poll() is None:
        # SIGKILL works on a stopped (SIGSTOP) or wedged process alike.
        agent.vm.proc.kill()
    await fence(agent, f"host failure: {reason}")


def stop_fenced(agent: PrimaryAgent, reason: str) -> None:
    """The lease is lost (refused, or about to run out unseen): kill QEMU at once."""
    log.error("primary fenced: %s", reason)
    agent.set_state(PrimaryState.FENCED, reason)
    agent.artifacts.event("fenced", reason=reason)
    if agent.vm.proc is not None and agent.vm.proc.poll() is None:
        agent.vm.proc.kill()
    agent.request_stop()


__all__ = ["fence", "host_failure", "secondary_lost", "stop_fenced"]
