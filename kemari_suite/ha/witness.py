"""The witness: a tiebreaker reached over the LAN side.

One replication link cannot tell a dead peer from a cut cable, so neither a failover nor
a primary going on unprotected is decided by the link alone. The witness holds one lease
per VM. The active host renews it every heartbeat interval; the standby may take it over
only after it expired on the witness's clock. A host that cannot renew must stop its
guest before its own, conservative, view of the lease runs out (it counts from the
moment it *sent* the last granted renewal), so the loser of a partition is always down
before the winner's wait ends.

A restarted witness grants no takeover for one lease period (it does not know who held
the lease). Requests and replies are JSON-lines frames
(:mod:`kemari_suite.protocol.framing`, at most :data:`MAX_MESSAGE` bytes) authenticated
with HMAC-SHA256 over the pre-shared key, and replies echo the request's nonce so that
an old reply cannot be replayed::

    -> {"op":"renew","vm":"web","node":"pri","nonce":"<24 hex>","mac":"<64 hex>"}
    <- {"granted":true,"owner":"pri","generation":3,"expires_in":3.0,"reason":"renewed",
        "nonce":"<the request's>","mac":"<64 hex>"}

The MAC is over the object without ``mac``, as JSON with sorted keys. A request the
witness cannot read or authenticate gets ``{"granted":false,"error":...,"nonce":null}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from kemari_suite.errors import ConnectError, ProtocolError
from kemari_suite.protocol import framing

Op = Literal["renew", "takeover", "release", "query", "solo", "paired"]
OPS: frozenset[str] = frozenset(get_args(Op))
#: Largest request or reply frame, in bytes (a real one is about 250).
MAX_MESSAGE = 4096


@dataclass
class Lease:
    owner: str | None = None
    generation: int = 0
    expires: float = 0.0
    #: The owner runs without a secondary: any standby's copy is stale from now on, and
    #: no takeover is granted until the owner is paired (protected) again.
    solo: bool = False


@dataclass(frozen=True)
class Decision:
    granted: bool
    owner: str | None
    generation: int
    expires_in: float
    reason: str


@dataclass
class LeaseTable:
    """The witness's decisions, pure: the clock is passed in."""

    lease_s: float
    started: float
    leases: dict[str, Lease] = field(default_factory=dict)

    def decide(self, op: Op, vm: str, node: str, now: float) -> Decision:
        lease = self.leases.setdefault(vm, Lease())
        in_grace = now < self.started + self.lease_s
        expired = now >= lease.expires

        def result(granted: bool, reason: str) -> Decision:
            return Decision(
                granted, lease.owner, lease.generation, max(0.0, lease.expires - now), reason
            )

        if op in ("solo", "paired"):
            if lease.owner not in (None, node):
                return result(False, f"lease held by {lease.owner}")
            if lease.owner is None:
                lease.generation += 1
            lease.owner, lease.expires = node, now + self.lease_s
            lease.solo = op == "solo"
            return result(True, "running without a secondary" if lease.solo else "paired")
        if op == "query":
            return result(lease.owner == node and not expired, "query")
        if op == "release":
            if lease.owner == node:
                lease.owner, lease.expires = None, 0.0
                return result(True, "released")
            return result(False, f"not the owner (owner is {lease.owner})")
        if lease.owner == node:
            # An expired lease nobody took over is still ours: renewing it is safe.
            lease.expires = now + self.lease_s
            return result(True, "renewed")
        if lease.owner is None:
            if op == "takeover" and in_grace:
                return result(False, "witness restarted: no takeover during its grace period")
            lease.owner, lease.expires = node, now + self.lease_s
            lease.generation += 1
            return result(True, "claimed")
        # Someone else owns it.
        if op == "renew":
            return result(False, f"lease held by {lease.owner}")
        if lease.solo:
            return result(
                False,
                f"{lease.owner} ran without a secondary after this copy's last checkpoint: "
                "the copy is stale, resuming it would lose acknowledged work",
            )
        if not expired:
            return result(
                False, f"lease held by {lease.owner} for {lease.expires - now:.2f} s more"
            )
        lease.owner, lease.expires = node, now + self.lease_s
        lease.generation += 1
        return result(True, "taken over after expiry")


def _mac(key: bytes, obj: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in obj.items() if k != "mac"}, sort_keys=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _verify(key: bytes, obj: dict[str, Any]) -> None:
    mac = obj.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, obj)):
        raise ProtocolError("witness message failed authentication (wrong key?)")


class WitnessServer:
    """Serves a :class:`LeaseTable` over TCP."""

    def __init__(self, key: bytes, lease_s: float, host: str, port: int) -> None:
        self.key = key
        self.table = LeaseTable(lease_s=lease_s, started=time.monotonic())
        self.host = host
        self.port = port
        self.log: list[dict[str, Any]] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await framing.read_line(reader, MAX_MESSAGE)
                except ProtocolError as err:
                    # Not between frames any more: answer, then hang up.
                    await framing.write_frame(writer, self._signed(self._refusal(err)))
                    break
                if line is None:
                    break
                await framing.write_frame(writer, self._signed(self.answer(line)))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def answer(self, line: bytes) -> dict[str, Any]:
        """The (unsigned) reply to one request frame, given without its newline."""
        try:
            req = framing.parse(line)
            _verify(self.key, req)
            op, vm, node = req["op"], str(req["vm"]), str(req["node"])
            if op not in OPS:
                raise ProtocolError(f"unknown witness op {op!r}")
        except (ProtocolError, KeyError, ValueError, TypeError) as err:
            return self._refusal(err)
        d = self.table.decide(op, vm, node, time.monotonic())
        rep: dict[str, Any] = {
            "granted": d.granted,
            "owner": d.owner,
            "generation": d.generation,
            "expires_in": d.expires_in,
            "reason": d.reason,
            "nonce": req.get("nonce"),
        }
        self.log.append({"t": time.time(), "op": op, "vm": vm, "node": node, **rep})
        return rep

    @staticmethod
    def _refusal(err: Exception) -> dict[str, Any]:
        reason = err.reason if isinstance(err, ProtocolError) else str(err)
        return {"granted": False, "error": reason, "nonce": None}

    def _signed(self, rep: dict[str, Any]) -> dict[str, Any]:
        return {**rep, "mac": _mac(self.key, rep)}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


class WitnessClient:
    """Asks the witness; every call opens a short connection (the LAN may flap)."""

    def __init__(self, key: bytes, address: str, vm: str, node: str, timeout: float) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConnectError(address, "witness address must be host:port")
        self.host, self.port = host, int(port)
        self.key, self.vm, self.node, self.timeout = key, vm, node, timeout
        #: monotonic time at which the last *granted* request was sent
        self.last_granted_sent: float | None = None
        self.lease_s: float | None = None

    async def ask(self, op: Op) -> Decision:
        """Raises ConnectError when the witness cannot be reached or answers garbage."""
        nonce = os.urandom(12).hex()
        req: dict[str, Any] = {"op": op, "vm": self.vm, "node": self.node, "nonce": nonce}
        req["mac"] = _mac(self.key, req)
        peer = f"witness {self.host}:{self.port}"
        sent = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
            try:
                await framing.write_frame(writer, req, limit=MAX_MESSAGE)
                rep = await framing.read_frame(reader, MAX_MESSAGE, self.timeout)
            finally:
                writer.close()
        except (OSError, TimeoutError) as err:
            raise ConnectError(peer, str(err) or "timeout") from err
        except ProtocolError as err:
            raise ConnectError(peer, f"bad reply: {err.reason}") from err
        if rep is None:
            raise ConnectError(peer, "closed the connection without a reply")
        try:
            _verify(self.key, rep)
        except ProtocolError as err:
            raise ConnectError(peer, f"bad reply: {err.reason}") from err
        if rep.get("nonce") != nonce:
            raise ConnectError(peer, str(rep.get("error", "stale reply")))
        try:
            d = Decision(
                bool(rep["granted"]),
                rep.get("owner"),
                int(rep.get("generation", 0)),
                float(rep.get("expires_in", 0.0)),
                str(rep.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConnectError(peer, f"bad reply: {err!r}") from err
        if d.granted and op in ("renew", "takeover", "solo", "paired"):
            self.last_granted_sent = sent
        return d

    def lease_valid(self, lease_s: float, margin_s: float) -> bool:
        """Our own conservative view: is our lease still certainly valid?"""
        if self.last_granted_sent is None:
            return False
        return time.monotonic() < self.last_granted_sent + lease_s - margin_s
