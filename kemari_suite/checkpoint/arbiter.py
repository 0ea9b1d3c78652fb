"""The primary's side of arbitration: keep the lease, and decide when the secondary is lost.

::

    secondary lost ─► tiebreaker "solo" granted ─► UNPROTECTED (the standby is stale now)
                   ─► refused / unreachable    ─► FENCED (QEMU killed)
                   ─► no tiebreaker            ─► HELD (output held; operator decides)

While protected, the lease is renewed every heartbeat interval. The primary keeps its
own conservative view of the lease, counted from when it *sent* the last granted
renewal: if that view is about to run out while the secondary is silent too, the
secondary may be taking over, so the primary stops its guest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kemari_suite.errors import ConnectError
from kemari_suite.ha.tiebreak import Tiebreaker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossVerdict:
    """What to do after losing the secondary."""

    #: "unprotected", "fence" or "held".
    outcome: str
    reason: str


class LeaseKeeper:
    """Renews this primary's lease and asks the tiebreaker when the secondary is lost."""

    def __init__(
        self,
        witness: Tiebreaker | None,
        *,
        interval_s: float,
        lease_s: float,
        tiebreaker_name: str,
        secondary_silent: Callable[[], bool],
        on_fenced: Callable[[str], None],
        on_unreachable: Callable[[str], None],
    ) -> None:
        self.witness = witness
        self.interval = interval_s
        self.lease_s = lease_s
        self.name = tiebreaker_name
        self.secondary_silent = secondary_silent
        self.on_fenced = on_fenced
        self.on_unreachable = on_unreachable
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.witness is not None and self._task is None:
            self._task = asyncio.create_task(self._renew_loop())

    async def pause(self) -> None:
        """Stop renewing (a switchover hands the lease over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def ask(self, op: str) -> tuple[bool, str]:
        """One request to the tiebreaker: (granted, reason). Unreachable = not granted."""
        if self.witness is None:
            return False, "no tiebreaker configured"
        try:
            d = await self.witness.ask(op)  # type: ignore[arg-type]
        except ConnectError as err:
            return False, f"tiebreaker unreachable: {err}"
        return d.granted, d.reason

    async def release(self) -> None:
        if self.witness is not None:
            with contextlib.suppress(ConnectError):
                await self.witness.ask("release")

    async def paired(self) -> None:
        if self.witness is not None:
            with contextlib.suppress(ConnectError):
                await self.witness.ask("paired")

    async def on_secondary_lost(self, reason: str) -> LossVerdict:
        """Decide, through the tiebreaker, whether to go on unprotected or to fence."""
        if self.witness is None:
            return LossVerdict(
                "held",
                f"{reason}; no tiebreaker configured: output stays held until the secondary "
                "returns or an operator decides",
            )
        # "solo": from now on the standby's copy is stale; the witness will not let it
        # take over until we are protected again.
        granted, why = await self.ask("solo")
        if granted:
            return LossVerdict("unprotected", f"{reason}; the {self.name} confirmed our lease")
        return LossVerdict("fence", f"{reason}; tiebreaker lost: {why}")

    async def _renew_loop(self) -> None:
        assert self.witness is not None
        while True:
            try:
                d = await self.witness.ask("renew")
                if not d.granted:
                    self.on_fenced(f"witness refused our lease: {d.reason}")
                    return
            except ConnectError as err:
                self.on_unreachable(str(err))
            if (
                self.secondary_silent()
                and self.witness.last_granted_sent is not None
                and not self.witness.lease_valid(self.lease_s, margin_s=self.interval)
            ):
                self.on_fenced(
                    "lease about to expire with neither the secondary nor the witness reachable"
                )
                return
            await asyncio.sleep(self.interval)


__all__ = ["LeaseKeeper", "LossVerdict"]
