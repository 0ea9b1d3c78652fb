"""The control verbs of the replication link, as the secondary speaks them.

They travel today as :class:`~kemari_suite.protocol.wire.Command` (a verb's name and JSON
text). This is the only module of the secondary that reads or writes a ``Command``:
:func:`dispatch` decodes one into a typed call on a :class:`VerbHandler`, and the
``send_*`` functions encode the answers. When the typed control messages replace
``Command``, this module is what changes (and the agent's dispatch table takes their
classes).

Verbs, in the order a connection uses them (P = primary, S = secondary)::

    S -> P  disk-state   {"lineage", "epoch"} or {}      send_disk_state
    P -> S  vm-profile   the primary's VM profile         VerbHandler.on_vm_profile
    S -> P  compat       {"ok", "stage", ...}             send_compat
    P -> S  disk-copy    {"mode", "lineage"}              VerbHandler.on_disk_copy
    P -> S  durable      epoch (a bare integer)           VerbHandler.on_durable
    P -> S  switchover   {"epoch", "lineage"}             VerbHandler.on_switchover
    S -> P  switched     {"ok", "reason" | "epoch", ...}  send_switched
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link


@dataclass(frozen=True)
class SwitchRequest:
    """``switchover``: the primary stopped its VM at committed ``epoch``."""

    epoch: int
    #: The disk copy's identity, which the old primary keeps as the next standby.
    lineage: str


class VerbHandler(Protocol):
    """What the secondary does with each verb from the primary."""

    async def on_vm_profile(self, link: Link, profile: dict[str, Any]) -> None: ...

    async def on_disk_copy(self, lineage: str, *, incremental: bool) -> None: ...

    def on_durable(self, epoch: int) -> None: ...

    async def on_switchover(self, link: Link, req: SwitchRequest) -> None: ...


async def dispatch(link: Link, msg: wire.Command, to: VerbHandler) -> None:
    """Decode ``msg`` and call its handler.

    Raises:
        ProtocolError: an unknown verb, or malformed arguments.
    """
    decode = _DECODERS.get(msg.name)
    if decode is None:
        raise ProtocolError(f"unexpected command {msg.name!r}")
    await decode(link, msg.args, to)


async def _vm_profile(link: Link, args: str, to: VerbHandler) -> None:
    await to.on_vm_profile(link, _json_object(args, "vm-profile"))


async def _disk_copy(link: Link, args: str, to: VerbHandler) -> None:
    req = _json_object(args, "disk-copy")
    try:
        mode, lineage = str(req["mode"]), str(req["lineage"])
    except KeyError as err:
        raise ProtocolError(f"bad disk-copy command: missing {err}") from err
    await to.on_disk_copy(lineage, incremental=mode == "incremental")


async def _durable(link: Link, args: str, to: VerbHandler) -> None:
    try:
        epoch = int(args)
    except ValueError:
        return  # as before: a malformed durable mark is ignored
    to.on_durable(epoch)


async def _switchover(link: Link, args: str, to: VerbHandler) -> None:
    req = _json_object(args, "switchover")
    try:
        epoch = int(req["epoch"])
    except (KeyError, ValueError, TypeError) as err:
        raise ProtocolError(f"bad switchover command: {err}") from err
    await to.on_switchover(link, SwitchRequest(epoch, str(req.get("lineage", ""))))


_DECODERS: dict[str, Callable[[Link, str, VerbHandler], Awaitable[None]]] = {
    "vm-profile": _vm_profile,
    "disk-copy": _disk_copy,
    "durable": _durable,
    "switchover": _switchover,
}


async def _send(link: Link, name: str, payload: dict[str, Any]) -> None:
    await link.send(wire.Command(name=name, args=json.dumps(payload)))


async def send_disk_state(link: Link, state: dict[str, Any]) -> None:
    """Which disk copy this host holds, first thing on a new link."""
    await _send(link, "disk-state", state)


async def send_compat(link: Link, verdict: dict[str, Any]) -> None:
    """A compatibility verdict (profile or trial restore stage)."""
    await _send(link, "compat", verdict)


async def send_switched(link: Link, ok: bool, **info: Any) -> None:
    """The outcome of a planned switchover request."""
    await _send(link, "switched", {"ok": ok, **info})


def _json_object(args: str, verb: str) -> dict[str, Any]:
    """A verb's JSON object argument.

    Raises:
        ProtocolError: not a JSON object.
    """
    try:
        obj = json.loads(args)
    except ValueError as err:
        raise ProtocolError(f"bad {verb} command: {err}") from err
    if not isinstance(obj, dict):
        raise ProtocolError(f"bad {verb} command: not an object")
    return obj


__all__ = [
    "SwitchRequest",
    "VerbHandler",
    "dispatch",
    "send_compat",
    "send_disk_state",
    "send_switched",
]
