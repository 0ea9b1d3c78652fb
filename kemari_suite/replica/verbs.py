"""The control messages of the replication link, as the secondary speaks them.

Each is a typed wire message (:data:`kemari_suite.protocol.wire.CONTROL_MESSAGES`).
:func:`handlers` maps the ones the primary sends to a :class:`VerbHandler`'s methods
(the agent merges them into its dispatch table); the ``send_*`` functions build the
answers from the plain dicts the rest of the secondary keeps.

In the order a connection uses them (P = primary, S = secondary)::

    S -> P  DiskState           which copy this host holds       send_disk_state
    S -> P  RamState            a kept switchover checkpoint     send_ram_state
    P -> S  VmProfile           the primary's VM profile         VerbHandler.on_vm_profile
    S -> P  CompatVerdict       profile, then trial restore      send_compat
    P -> S  DiskCopy            a disk copy in the FULL epoch    VerbHandler.on_disk_copy
    P -> S  Durable             the primary's disk holds epoch   VerbHandler.on_durable
    P -> S  SwitchoverRequest   stopped at epoch, hand over      VerbHandler.on_switchover
    S -> P  Switched            the outcome                      send_switched
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link


@dataclass(frozen=True)
class SwitchRequest:
    """``SwitchoverRequest``: the primary stopped its VM at committed ``epoch``."""

    epoch: int
    #: The disk copy's identity, which the old primary keeps as the next standby.
    lineage: str


class VerbHandler(Protocol):
    """What the secondary does with each control message from the primary."""

    async def on_vm_profile(self, link: Link, profile: dict[str, Any]) -> None: ...

    async def on_disk_copy(self, lineage: str, *, incremental: bool) -> None: ...

    def on_durable(self, epoch: int) -> None: ...

    async def on_switchover(self, link: Link, req: SwitchRequest) -> None: ...


Handler = Callable[[Link, Any], Awaitable[None]]


def handlers(to: VerbHandler) -> dict[type[wire.Message], Handler]:
    """Dispatch-table entries for the control messages the primary sends."""

    async def vm_profile(link: Link, msg: wire.VmProfile) -> None:
        await to.on_vm_profile(link, dict(msg.profile))

    async def disk_copy(link: Link, msg: wire.DiskCopy) -> None:
        await to.on_disk_copy(msg.lineage, incremental=msg.mode is wire.DiskCopyMode.INCREMENTAL)

    async def durable(link: Link, msg: wire.Durable) -> None:
        to.on_durable(msg.epoch)

    async def switchover(link: Link, msg: wire.SwitchoverRequest) -> None:
        await to.on_switchover(link, SwitchRequest(msg.epoch, msg.lineage))

    return {
        wire.VmProfile: vm_profile,
        wire.DiskCopy: disk_copy,
        wire.Durable: durable,
        wire.SwitchoverRequest: switchover,
    }


async def send_disk_state(link: Link, state: dict[str, Any]) -> None:
    """Which disk copy this host holds (``{}``: none), first thing on a new link."""
    lineage = str(state.get("lineage") or "")
    epoch = int(state.get("epoch", wire.NO_EPOCH)) if lineage else wire.NO_EPOCH
    await link.send(wire.DiskState(lineage=lineage, epoch=max(epoch, wire.NO_EPOCH)))


async def send_ram_state(link: Link, epoch: int, lineage: str, digest: bytes) -> None:
    """The switchover checkpoint this host keeps in RAM (``epoch`` -1: none), right after
    :func:`send_disk_state`."""
    await link.send(wire.RamState(epoch=max(epoch, wire.NO_EPOCH), lineage=lineage, digest=digest))


_STAGES = {"profile": wire.CompatStage.PROFILE, "restore": wire.CompatStage.RESTORE}


async def send_compat(link: Link, verdict: dict[str, Any]) -> None:
    """A compatibility verdict: ``{"ok", "stage", ["ms"], ["reason"], ...details}``."""
    rest = {k: v for k, v in verdict.items() if k not in ("ok", "stage", "ms", "reason")}
    await link.send(
        wire.CompatVerdict(
            stage=_STAGES[str(verdict["stage"])],
            ok=bool(verdict["ok"]),
            ms=float(verdict.get("ms") or 0.0),
            reason=str(verdict.get("reason") or ""),
            details=rest,
        )
    )


async def send_switched(link: Link, ok: bool, **info: Any) -> None:
    """The outcome of a planned switchover request."""
    await link.send(
        wire.Switched(
            outcome=wire.SwitchOutcome.DONE if ok else wire.SwitchOutcome.REFUSED,
            epoch=int(info.get("epoch", 0)),
            resume_ms=float(info.get("resume_ms") or 0.0),
            reason=str(info.get("reason", "")),
        )
    )


__all__ = [
    "SwitchRequest",
    "VerbHandler",
    "handlers",
    "send_compat",
    "send_disk_state",
    "send_ram_state",
    "send_switched",
]
