"""The secondary's lifecycle and the transitions it allows.

::

    WAITING -> RECEIVING (a FULL epoch: initial synchronization; or, on a kept switchover
        checkpoint, its first DELTA) -> STANDBY (committed)
    STANDBY --a new FULL epoch (new primary connection, resync)--> RECEIVING
    RECEIVING --primary lost before any commit--> WAITING
    STANDBY --primary lost, tiebreaker won (or `kemari failover`, a switchover)-->
        FAILING_OVER -> ACTIVE (the VM runs here) | STOPPED (could not resume)
    STANDBY --primary lost, tiebreaker lost--> STANDBY (says why; the primary lives on)
    WAITING, RECEIVING, STANDBY --the guest shut down on the primary, or agent stopped--> STOPPED
    STOPPED --a new primary connection after the guest shut down--> RECEIVING

ACTIVE is final: after a failover the agent keeps the VM running (or hands it to the
primary role) and reports ACTIVE until it ends. An operator's ``kemari failover``
during a resynchronization (RECEIVING with an older committed epoch) resumes that
epoch, hence RECEIVING -> FAILING_OVER.
"""

from __future__ import annotations

import enum

from kemari_suite.service.lifecycle import table


class SecondaryState(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"
    STANDBY = "standby"
    FAILING_OVER = "failing-over"
    ACTIVE = "active"
    STOPPED = "stopped"


S = SecondaryState
#: Every edge the secondary may take.
SECONDARY_TRANSITIONS = table(
    {
        S.WAITING: (S.RECEIVING, S.STOPPED),
        S.RECEIVING: (S.STANDBY, S.WAITING, S.FAILING_OVER, S.STOPPED),
        S.STANDBY: (S.RECEIVING, S.FAILING_OVER, S.STOPPED),
        S.FAILING_OVER: (S.ACTIVE, S.STOPPED),
        # The guest powered off or panicked on this host after the failover.
        S.ACTIVE: (S.STOPPED,),
        S.STOPPED: (S.RECEIVING,),
    }
)

__all__ = ["SECONDARY_TRANSITIONS", "SecondaryState"]
