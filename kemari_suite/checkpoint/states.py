"""The primary's lifecycle and the transitions it allows.

::

    STARTING -> SYNCING (initial pre-copy, first checkpoint) -> PROTECTED
    PROTECTED --secondary lost, tiebreaker won--> UNPROTECTED --secondary back--> SYNCING
    PROTECTED --secondary lost, no tiebreaker--> HELD (output held; operator decides)
    HELD --`kemari release --solo` (the operator declares the peer dead)--> UNPROTECTED
    PROTECTED --planned switchover--> SWITCHED (this host becomes the standby)
    any --tiebreaker lost--> FENCED (QEMU stopped)      any --> STOPPED
"""

from __future__ import annotations

import enum

from kemari_suite.service.lifecycle import table


class PrimaryState(enum.Enum):
    STARTING = "starting"
    SYNCING = "syncing"
    PROTECTED = "protected"
    UNPROTECTED = "unprotected"
    HELD = "held"
    FENCED = "fenced"
    #: A planned switchover handed the VM to the peer; this host becomes its standby.
    SWITCHED = "switched-over"
    STOPPED = "stopped"


P = PrimaryState
#: Every edge the primary may take. FENCED, SWITCHED and STOPPED are final.
PRIMARY_TRANSITIONS = table(
    {
        P.STARTING: (P.SYNCING, P.UNPROTECTED, P.HELD, P.FENCED, P.STOPPED),
        P.SYNCING: (P.PROTECTED, P.UNPROTECTED, P.HELD, P.FENCED, P.STOPPED),
        P.PROTECTED: (P.UNPROTECTED, P.HELD, P.FENCED, P.SWITCHED, P.STOPPED),
        P.UNPROTECTED: (P.SYNCING, P.FENCED, P.STOPPED),
        P.HELD: (P.SYNCING, P.UNPROTECTED, P.FENCED, P.STOPPED),
        P.FENCED: (),
        P.SWITCHED: (),
        P.STOPPED: (),
    }
)

__all__ = ["PRIMARY_TRANSITIONS", "PrimaryState"]
