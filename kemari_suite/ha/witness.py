"""The witness: a tiebreaker reached over the LAN side.

One replication link cannot tell a dead peer from a cut cable, so neither a failover nor
a primary going on unprotected is decided by the link alone. The witness holds one lease
per VM (the *pair*). The active host renews it every heartbeat interval; the standby may
take it over only after it expired on the witness's clock. A host that cannot renew must
stop its guest before its own, conservative, view of the lease runs out (it counts from
the moment it *sent* the last granted renewal), so the loser of a partition is always
down before the winner's wait ends.

Every grant of a new era (a claim, a takeover, the holder going solo) raises the pair's
*generation*, the fencing token the disk layer checks. A holder that goes on without a
secondary ("solo") makes every other copy stale: no other host's takeover is granted
until the holder is paired again, even after it released the lease or died.

The table (holder, generation, solo) is written to ``[witness] state_file`` before the
reply that reports a change (:mod:`kemari_suite.ha.witness_state`); a restarted witness
gives every recorded holder one lease period and grants no takeover of a free lease
during that period either.

Requests and replies are JSON-lines frames (:mod:`kemari_suite.protocol.framing`, at
most :data:`MAX_MESSAGE` bytes) authenticated with HMAC-SHA256 over the pair's key. On
connect the witness sends a fresh challenge; a request must carry it under its MAC, so
a request captured on the wire and sent again is refused. The reply echoes the request's
nonce (an old reply cannot be replayed to the client) and carries the next challenge::

    <- {"challenge":"<32 hex>"}
    -> {"op":"renew","vm":"web","node":"pri","nonce":"<24 hex>","challenge":"<32 hex>",
        "mac":"<64 hex>"}
    <- {"granted":true,"owner":"pri","generation":3,"solo":false,"stale":false,
        "expires_in":3.0,"reason":"renewed","nonce":"<the request's>",
        "challenge":"<next>","mac":"<64 hex>"}

The MAC is over the object without ``mac``, as JSON with sorted keys. A request the
witness cannot read or authenticate gets ``{"granted":false,"error":...,"nonce":null}``.

The listener takes the replication link's protections (:func:`server_from_config`, the
same :class:`~kemari_suite.protocol.listen.Door`): ``[witness] listen`` is an explicit
address (an explicit ``0.0.0.0`` is taken with a warning); a connection must bring an authenticated
request within ``handshake_timeout`` of its opening, and at most ``max_pending``
connections may be without one at a time. Beyond that a newcomer pushes out the oldest
(a real client sends its request one round trip after connecting). Once a request has
authenticated, each further request must come within ``handshake_timeout`` of the last
reply; clients send one and hang up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from kemari_suite.errors import ConnectError, ProtocolError
from kemari_suite.ha.witness_state import PairKeys, load_state, save_state
from kemari_suite.protocol import framing
from kemari_suite.protocol.listen import (
    HANDSHAKE_TIMEOUT_S,
    MAX_PENDING,
    Door,
    PendingGate,
    parse_listen,
)

if TYPE_CHECKING:
    from kemari_suite.config import KemariConfig

log = logging.getLogger(__name__)

Op = Literal["renew", "takeover", "release", "query", "solo", "paired"]
OPS: frozenset[str] = frozenset(get_args(Op))
#: Largest request or reply frame, in bytes (a real one is about 300).
MAX_MESSAGE = 4096
#: Decisions kept in :attr:`WitnessServer.log`.
LOG_DECISIONS = 1000


@dataclass
class Lease:
    owner: str | None = None
    generation: int = 0
    expires: float = 0.0
    #: ``solo_owner`` runs (or ran) without a secondary: every other copy is stale, and
    #: no other host's takeover is granted until it is paired (protected) again.
    solo: bool = False
    solo_owner: str | None = None

    def persisted(self) -> dict[str, Any]:
        """What survives a restart (expiry does not: it is monotonic)."""
        return {
            "owner": self.owner,
            "generation": self.generation,
            "solo": self.solo,
            "solo_owner": self.solo_owner,
        }


@dataclass(frozen=True)
class Decision:
    granted: bool
    owner: str | None
    generation: int
    expires_in: float
    reason: str
    #: The holder (or last holder) runs without a secondary.
    solo: bool = False
    #: The asker's copy is stale: another host ran alone after its last checkpoint.
    stale: bool = False


def _stale_reason(lease: Lease) -> str:
    return (
        f"{lease.solo_owner} ran without a secondary after this copy's last checkpoint "
        f"(generation {lease.generation}): the copy is stale, resuming it would lose "
        "acknowledged work"
    )


@dataclass
class LeaseTable:
    """The witness's decisions, pure: the clock is passed in."""

    lease_s: float
    started: float
    leases: dict[str, Lease] = field(default_factory=dict)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The persisted part of every pair (for the state file)."""
        return {vm: lease.persisted() for vm, lease in self.leases.items()}

    def restore(self, pairs: dict[str, dict[str, Any]]) -> None:
        """Load a snapshot: every holder gets one lease period from ``started``."""
        for vm, p in pairs.items():
            lease = Lease(p["owner"], p["generation"], 0.0, p["solo"], p["solo_owner"])
            if lease.owner is not None:
                lease.expires = self.started + self.lease_s
            self.leases[vm] = lease

    def decide(self, op: Op, vm: str, node: str, now: float) -> Decision:
        lease = self.leases.setdefault(vm, Lease())
        in_grace = now < self.started + self.lease_s
        expired = now >= lease.expires

        def result(granted: bool, reason: str) -> Decision:
            stale = lease.solo and lease.solo_owner != node
            left = max(0.0, lease.expires - now)
            return Decision(granted, lease.owner, lease.generation, left, reason, lease.solo, stale)

        def grant_to_node() -> None:
            lease.owner, lease.expires = node, now + self.lease_s
            lease.generation += 1

        if op in ("solo", "paired"):
            if lease.owner not in (None, node):
                return result(False, f"lease held by {lease.owner}")
            going_solo = op == "solo" and not (lease.solo and lease.solo_owner == node)
            if lease.owner is None or going_solo:
                grant_to_node()  # a new era: its writes are newer than any other copy
            lease.expires = now + self.lease_s
            lease.solo = op == "solo"
            lease.solo_owner = node if lease.solo else None
            return result(True, "running without a secondary" if lease.solo else "paired")
        if op == "query":
            return result(lease.owner == node and not expired, "query")
        if op == "release":
            if lease.owner == node:
                # A solo holder's copy stays the newest: the flag outlives the release.
                lease.owner, lease.expires = None, 0.0
                return result(True, "released")
            return result(False, f"not the owner (owner is {lease.owner})")
        if lease.owner == node:
            # An expired lease nobody took over is still ours: renewing it is safe.
            lease.expires = now + self.lease_s
            return result(True, "renewed")
        if op == "takeover" and lease.solo and lease.solo_owner != node:
            return result(False, _stale_reason(lease))
        if lease.owner is None:
            if op == "takeover" and in_grace:
                return result(False, "witness restarted: no takeover during its grace period")
            grant_to_node()
            return result(True, "claimed")
        # Someone else owns it.
        if op == "renew":
            return result(False, f"lease held by {lease.owner}")
        if not expired:
            return result(
                False, f"lease held by {lease.owner} for {lease.expires - now:.2f} s more"
            )
        grant_to_node()
        lease.solo, lease.solo_owner = False, None
        return result(True, "taken over after expiry")


def _mac(key: bytes, obj: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in obj.items() if k != "mac"}, sort_keys=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _verify(key: bytes, obj: dict[str, Any]) -> None:
    mac = obj.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, obj)):
        raise ProtocolError("witness message failed authentication (wrong key?)")


def _challenge() -> str:
    return os.urandom(16).hex()


class _Refused(Exception):
    """A request refused before any decision (the reply is signed with ``key``)."""

    def __init__(self, reason: str, key: bytes | None) -> None:
        super().__init__(reason)
        self.reason, self.key = reason, key


class WitnessServer:
    """Serves a :class:`LeaseTable` over TCP.

    ``key`` is the one key of every pair without a key file under ``keys_dir`` (None:
    such pairs are refused; :func:`server_from_config` always passes None).
    ``state_file`` None keeps the table in memory only (tests). ``handshake_timeout``
    and ``max_pending`` bound unauthenticated connections (see the module docstring);
    ``on_reject(peer, error)`` hears every connection closed for them.

    Raises:
        ConfigError: the state file exists but cannot be used (see ``load_state``).
        ValueError: ``max_pending`` below 1.
    """

    def __init__(
        self,
        key: bytes | None,
        lease_s: float,
        host: str,
        port: int,
        *,
        keys_dir: Path | None = None,
        state_file: Path | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        max_pending: int = MAX_PENDING,
        on_reject: Callable[[str, Exception], None] | None = None,
    ) -> None:
        self.keys = PairKeys(keys_dir, key)
        self.table = LeaseTable(lease_s=lease_s, started=time.monotonic())
        self.state_file = state_file
        if state_file is not None:
            self.table.restore(load_state(state_file))
        self.host = host
        self.port = port
        self.on_reject = on_reject
        self.door = Door(
            handshake_timeout=handshake_timeout, max_pending=max_pending, on_reject=self._reject
        )
        #: The latest decisions (a witness runs for months: bounded).
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_DECISIONS)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    @property
    def timeout(self) -> float:
        """Seconds a connection has to authenticate (then between requests)."""
        return self.door.timeout

    @property
    def gate(self) -> PendingGate:
        """The unauthenticated connections held now."""
        return self.door.gate

    def _reject(self, peer: str, err: Exception) -> None:
        log.debug("witness: %s", err)
        if self.on_reject is not None:
            self.on_reject(peer, err)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admitted = self.door.admit(writer)
        if admitted is None:
            return
        peer, pending = admitted
        loop = asyncio.get_running_loop()
        # Until a request authenticates, the whole talk has one deadline: a peer without
        # the key cannot keep its slot by sending bad requests slowly.
        deadline = loop.time() + self.timeout
        authenticated = False
        challenge = _challenge()
        try:
            await framing.write_frame(writer, {"challenge": challenge})
            while True:
                wait = self.timeout if authenticated else max(0.0, deadline - loop.time())
                try:
                    line = await framing.read_line(reader, MAX_MESSAGE, wait)
                except TimeoutError:
                    if not authenticated:
                        self._reject(
                            peer,
                            ConnectError(peer, f"no authenticated request in {self.timeout:.1f} s"),
                        )
                    break
                except ProtocolError as err:
                    # Not between frames any more: answer, then hang up.
                    refusal = _Refused(err.reason, self.keys.any_key())
                    await framing.write_frame(writer, self._refusal(refusal))
                    break
                if line is None:
                    break
                # Whatever the outcome, the challenge is used up.
                used, challenge = challenge, _challenge()
                rep, authentic = self._reply(line, used, challenge)
                if authentic and not authenticated:
                    authenticated = True
                    pending.done()
                await framing.write_frame(writer, rep)
        except ConnectionError:
            pass
        finally:
            pending.done()
            writer.close()
            if pending.evicted and not authenticated:
                self._reject(peer, pending.why_closed(peer))

    def answer(self, line: bytes, challenge: str, *, next_challenge: str = "") -> dict[str, Any]:
        """The signed reply to one request frame (given without its newline) sent on a
        connection whose current challenge is ``challenge``."""
        return self._reply(line, challenge, next_challenge)[0]

    def _reply(
        self, line: bytes, challenge: str, next_challenge: str
    ) -> tuple[dict[str, Any], bool]:
        """:meth:`answer`, and whether the request authenticated."""
        try:
            req, key = self._authentic(line, challenge)
        except _Refused as err:
            return self._refusal(err, next_challenge), False
        op, vm, node = req["op"], str(req["vm"]), str(req["node"])
        before = dataclasses.replace(self.table.leases.get(vm) or Lease())
        d = self.table.decide(op, vm, node, time.monotonic())
        after = self.table.leases[vm]
        if self.state_file is not None and after.persisted() != before.persisted():
            try:
                save_state(self.state_file, self.table.snapshot())
            except OSError as err:
                # Not durable, not granted: forget the change and say why.
                self.table.leases[vm] = before
                log.error("witness: cannot persist %s: %s", self.state_file, err)
                d = Decision(
                    False,
                    before.owner,
                    before.generation,
                    0.0,
                    f"witness cannot persist its state ({err.strerror or err}): refused",
                    before.solo,
                )
        rep: dict[str, Any] = {
            "granted": d.granted,
            "owner": d.owner,
            "generation": d.generation,
            "solo": d.solo,
            "stale": d.stale,
            "expires_in": d.expires_in,
            "reason": d.reason,
            "nonce": req.get("nonce"),
            "challenge": next_challenge,
        }
        self.log.append({"t": time.time(), "op": op, "vm": vm, "node": node, **rep})
        return {**rep, "mac": _mac(key, rep)}, True

    def _authentic(self, line: bytes, challenge: str) -> tuple[dict[str, Any], bytes]:
        """The request and its pair's key. Raises _Refused naming what was wrong."""
        key = self.keys.any_key()
        try:
            req = framing.parse(line)
            vm = str(req["vm"])
            key = self.keys.key_for(vm)
            _verify(key, req)
            if req.get("challenge") != challenge:
                raise ProtocolError(
                    "stale or replayed witness request (not this connection's challenge)"
                )
            if req["op"] not in OPS:
                raise ProtocolError(f"unknown witness op {req['op']!r}")
            str(req["node"])
        except ProtocolError as err:
            raise _Refused(err.reason, key) from err
        except (KeyError, ValueError, TypeError) as err:
            raise _Refused(str(err), key) from err
        return req, key

    @staticmethod
    def _refusal(err: _Refused, next_challenge: str = "") -> dict[str, Any]:
        rep: dict[str, Any] = {"granted": False, "error": err.reason, "nonce": None}
        if next_challenge:
            rep["challenge"] = next_challenge
        # Unknown pair and no shared key: sign with a throwaway key (unverifiable).
        return {**rep, "mac": _mac(err.key or os.urandom(32), rep)}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def server_from_config(cfg: KemariConfig, listen: str) -> WitnessServer:
    """The witness of ``cfg`` on ``listen`` (host:port, see
    :func:`~kemari_suite.protocol.listen.parse_listen`): ``[witness] keys_dir`` and
    ``state_file``; the lease period is ``replication.heartbeat_timeout_ms``. Each pair
    is served with its own key file only: never ``replication.key``.

    Raises:
        ConfigError: ``listen`` is not an explicit host:port, or the state file cannot
            be used.
    """
    host, port = parse_listen(listen, key="witness.listen", example="10.0.0.3:7411")
    keys_dir = cfg.witness.keys_dir
    if not any(keys_dir.glob("*.key")):
        log.warning(
            "witness: no pair key in %s (<pair>.key): every request is refused until one is added",
            keys_dir,
        )
    return WitnessServer(
        None,
        cfg.replication.heartbeat_timeout_ms / 1000,
        host,
        port,
        keys_dir=keys_dir,
        state_file=cfg.witness.state_file,
    )


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

    async def _exchange(self, req: dict[str, Any], peer: str) -> dict[str, Any] | None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            greeting = await framing.read_frame(reader, MAX_MESSAGE)
            if greeting is None or not isinstance(greeting.get("challenge"), str):
                raise ConnectError(peer, "no challenge from the witness")
            req["challenge"] = greeting["challenge"]
            req["mac"] = _mac(self.key, req)
            await framing.write_frame(writer, req, limit=MAX_MESSAGE)
            return await framing.read_frame(reader, MAX_MESSAGE)
        finally:
            writer.close()

    async def ask(self, op: Op) -> Decision:
        """One request: connecting, the challenge and the reply all within ``timeout``.

        Raises:
            ConnectError: the witness cannot be reached in time, or answers garbage.
        """
        nonce = os.urandom(12).hex()
        req: dict[str, Any] = {"op": op, "vm": self.vm, "node": self.node, "nonce": nonce}
        peer = f"witness {self.host}:{self.port}"
        sent = time.monotonic()
        try:
            rep = await asyncio.wait_for(self._exchange(req, peer), self.timeout)
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
                bool(rep.get("solo", False)),
                bool(rep.get("stale", False)),
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
