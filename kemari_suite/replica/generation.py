"""Which tiebreaker generation the standby's disk copy belongs to.

The shared disk's lease block names the generation (fencing token) of the run that may
write it; the built-in disk's sidecar records the same for a copy
(:mod:`kemari_suite.disk.builtin`). The primary does not send its generation over the
link, so the standby learns it from the tiebreaker itself::

    primary connects              new_link(its node id): generation unknown; the copy
                                  records none with the commits this primary brings
    after a commit, while unknown ask "query" (at most one at a time, at most one per
                                  ``retry_s``); accepted only when the holder is that
                                  very primary and it is paired (not solo)
    accepted                      the copy records it with every later commit

Why that answer is the generation of the data: a primary's generation changes only when
it claims the lease (the holder was nobody: refused until it holds it), takes it over
(it was not the holder: refused), or goes solo (refused; and a solo primary sends this
standby nothing more on that connection). A new connection starts unknown again.

Then (:mod:`~kemari_suite.replica.monitor`, :mod:`~kemari_suite.replica.failover`):
a copy whose generation is older than the holder's is stale and does not take over; the
winner of a takeover records its grant's generation before it resumes.

:class:`GenerationWatch` decides (the clock is given); :meth:`GenerationWatch.learn` is
the one call that asks. :func:`copy_staleness` says why a copy is stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kemari_suite.errors import ConnectError
from kemari_suite.ha.tiebreak import Tiebreaker
from kemari_suite.ha.witness import Decision

log = logging.getLogger(__name__)


class GenerationWatch:
    """What this standby knows of the generation of the primary streaming to it; see
    the module docstring."""

    def __init__(self, retry_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self.clock = clock
        #: Node id of the primary at the other end (empty: none yet).
        self.peer = ""
        #: Its generation, once learned on this connection.
        self.known: int | None = None
        #: Changes with every connection: an answer for an older one is dropped.
        self.token = 0
        self._asking = False
        self._next_try = 0.0

    def new_link(self, peer: str) -> None:
        """A primary (node id ``peer``) connected: its generation is unknown."""
        self.peer = peer
        self.known = None
        self.token += 1
        self._asking = False
        self._next_try = 0.0

    def due(self, now: float) -> bool:
        """Should the standby ask the tiebreaker now?"""
        return bool(self.peer) and self.known is None and not self._asking and now >= self._next_try

    def accept(self, d: Decision) -> int | None:
        """The generation ``d`` (a "query" answer) gives for the connected primary's
        data, or None: the holder is not that primary, or it runs solo."""
        if not self.peer or d.owner != self.peer or d.solo:
            return None
        return d.generation

    def settle(self, token: int, d: Decision | None) -> int | None:
        """Take the answer to a question asked on connection ``token`` (None: no
        answer); returns the generation learned, if any."""
        if token != self.token:
            return None
        self._asking = False
        self._next_try = self.clock() + self.retry_s
        gen = self.accept(d) if d is not None else None
        if gen is not None:
            self.known = gen
        return gen

    async def learn(self, witness: Tiebreaker) -> int | None:
        """Ask the tiebreaker once (when :meth:`due`); returns the generation learned,
        if any. An unreachable tiebreaker is asked again after ``retry_s``."""
        if not self.due(self.clock()):
            return None
        token = self.token
        self._asking = True
        try:
            d: Decision | None = await witness.ask("query")
        except ConnectError as err:
            log.debug("secondary: cannot learn the primary's generation: %s", err)
            d = None
        except BaseException:
            if token == self.token:
                self._asking = False
            raise
        return self.settle(token, d)


async def copy_staleness(witness: Tiebreaker | None, sidecar_generation: int | None) -> str:
    """Why this standby's copy is known to be stale ("" when it is not known to be):
    the tiebreaker's holder ran without a secondary, or its generation is newer than
    the one recorded with this copy (``sidecar_generation``; None: not recorded).
    An unreachable tiebreaker or none at all knows nothing."""
    if witness is None:
        return ""
    try:
        d = await witness.ask("query")
    except ConnectError as err:
        log.warning("failover: cannot ask the tiebreaker whether this copy is stale: %s", err)
        return ""
    if d.stale:
        return (
            f"{d.owner or 'the last holder'} ran without a secondary after this copy's last "
            f"checkpoint (generation {d.generation}): this copy is stale"
        )
    if sidecar_generation is not None and d.generation > sidecar_generation and not d.granted:
        return (
            f"the tiebreaker is at generation {d.generation}, this copy holds generation "
            f"{sidecar_generation}: {d.owner or 'another host'} wrote past it, the copy is stale"
        )
    return ""


__all__ = ["GenerationWatch", "copy_staleness"]
