"""DRBD's fence-peer handler on the suite's tiebreaker (``kemari fence-peer``).

DRBD runs the handler on a Primary that lost its peer, with I/O frozen. The exit code
tells DRBD what became of the peer: 7 "peer STONITHed", 6 "outdate yourself". We ask
the tiebreaker to keep (renew) our lease: granted means the peer lost the tiebreaker
and stops its guest before its own lease view runs out (exit 7); refused means the
peer holds the lease (exit 6); an unreachable tiebreaker leaves I/O frozen (exit 1)
for an operator to decide.
"""

from __future__ import annotations

import asyncio

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError, ConnectError

EXIT_PEER_FENCED = 7
EXIT_OUTDATE_SELF = 6
EXIT_UNDECIDED = 1


def fence_peer(cfg: KemariConfig, node_id: str) -> tuple[int, str]:
    """Ask the configured tiebreaker; return (DRBD exit code, reason).

    Raises:
        ConfigError: no tiebreaker is configured (DRBD fencing needs one).
    """
    from kemari_suite.ha.tiebreak import make_tiebreaker

    tb = make_tiebreaker(cfg, node_id, format_lease=False)
    if tb is None:
        raise ConfigError(
            'fence-peer needs a tiebreaker ("witness" or "lease")', key="replication.tiebreaker"
        )
    try:
        d = asyncio.run(tb.ask("renew"))
    except ConnectError as err:
        return EXIT_UNDECIDED, f"tiebreaker unreachable, I/O stays frozen: {err}"
    if d.granted:
        return EXIT_PEER_FENCED, f"we hold the lease (generation {d.generation})"
    return EXIT_OUTDATE_SELF, f"the peer holds the lease: {d.reason}"
