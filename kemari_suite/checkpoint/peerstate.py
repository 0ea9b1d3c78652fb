"""What the secondary told this primary over one connection: its verdicts on running
the VM (profile, then trial restore), the disk copy it holds, the switchover checkpoint
it keeps in RAM, and its answer to a switchover. The primary's dispatch table sends those
typed messages here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kemari_suite.checkpoint.peer import PeerSession
from kemari_suite.errors import ReplicationError
from kemari_suite.protocol import wire
from kemari_suite.service.metrics import Artifacts


class PeerState:
    """The secondary's answers, reset for every connection."""

    def __init__(self, artifacts: Artifacts) -> None:
        self.artifacts = artifacts
        #: The latest verdict on running this VM (profile check, then trial restore).
        self.compat: dict[str, Any] = {}
        #: Why the secondary cannot run this VM ("" while it has not refused).
        self.refused = ""
        self.profile_ok = asyncio.Event()
        self.restore_ok = asyncio.Event()
        #: The disk copy it holds (``{"lineage", "epoch"}``), once it said.
        self.disk: dict[str, Any] = {}
        self.disk_known = asyncio.Event()
        #: The switchover checkpoint it keeps in RAM (epoch NO_EPOCH: none), once it said.
        self.ram: wire.RamState | None = None
        self.ram_known = asyncio.Event()
        #: A switchover request's answer, while one is awaited.
        self.switch_reply: asyncio.Future[dict[str, Any]] | None = None
        self.session: PeerSession | None = None

    def reset(self, session: PeerSession) -> None:
        self.session = session
        self.compat = {}
        self.refused = ""
        self.profile_ok.clear()
        self.restore_ok.clear()
        self.disk = {}
        self.disk_known.clear()
        self.ram = None
        self.ram_known.clear()

    def handlers(self) -> dict[type[wire.Message], Callable[[Any], None]]:
        return {
            wire.CompatVerdict: self._on_compat,
            wire.Switched: self._on_switched,
            wire.DiskState: self._on_disk_state,
            wire.RamState: self._on_ram_state,
        }

    def _on_compat(self, msg: wire.CompatVerdict) -> None:
        self.compat = msg.as_dict()
        self.artifacts.event("compat", **self.compat)
        if msg.ok:
            (self.profile_ok if msg.stage is wire.CompatStage.PROFILE else self.restore_ok).set()
            return
        self.refused = msg.reason or "no reason given"
        if self.session is not None:
            self.session.lose(
                f"the secondary cannot run this VM ({msg.stage.name.lower()}): {self.refused}"
            )

    def _on_switched(self, msg: wire.Switched) -> None:
        if self.switch_reply is not None and not self.switch_reply.done():
            self.switch_reply.set_result(msg.as_reply())

    def _on_disk_state(self, msg: wire.DiskState) -> None:
        self.disk = msg.as_dict()
        self.disk_known.set()

    def _on_ram_state(self, msg: wire.RamState) -> None:
        self.ram = msg
        self.ram_known.set()

    async def wait(self, event: asyncio.Event, what: str, timeout: float) -> None:
        """Wait for the secondary's answer to ``what`` (or the loss of the session).

        Raises:
            ReplicationError: the session was lost, or no answer in ``timeout`` s.
        """
        assert self.session is not None
        lost = asyncio.ensure_future(self.session.lost.wait())
        ok = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({lost, ok}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            ok.cancel()
        if self.session.lost.is_set():
            raise ReplicationError(self.session.lost_reason)
        if not event.is_set():
            raise ReplicationError(f"the secondary did not answer {what} in {timeout} s")


__all__ = ["PeerState"]
