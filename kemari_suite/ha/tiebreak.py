"""The failover tiebreaker of a config: a witness over the LAN, a lease on shared
storage, or the Pacemaker cluster (:mod:`kemari_suite.ha.pacemaker`). All answer
``ask("renew" | "takeover" | "release" | "query")`` with a
:class:`~kemari_suite.ha.witness.Decision`."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Protocol

from kemari_suite.config import KemariConfig
from kemari_suite.errors import ConfigError, LeaseError
from kemari_suite.ha.witness import Decision, Op, WitnessClient
from kemari_suite.ha.witness_state import read_key_file

log = logging.getLogger(__name__)


class Tiebreaker(Protocol):
    last_granted_sent: float | None

    async def ask(self, op: Op) -> Decision: ...

    def lease_valid(self, lease_s: float, margin_s: float) -> bool: ...


#: Listener hosts that name no one host: every host of a pair may listen on them.
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


def node_identity(cfg: KemariConfig) -> str:
    """This host's name at the tiebreaker: ``replication.node_id``; else the host of
    ``replication.listen`` (a host's own address, whatever role it runs); else the host
    name.

    It names the host, never the role: after a failover the survivor runs the primary
    role and the repaired host comes back with ``kemari standby``. Had each taken its
    role's name, both would have been "secondary" once, and the witness, which keeps a
    lease for its holder, would have let the standby "renew" the lease of the primary it
    could no longer hear and resume a second guest. Two hosts that still end up with one
    name are refused at the replication handshake (``protocol/link.py``)."""
    r = cfg.replication
    if r.node_id:
        return r.node_id
    host = r.listen.rpartition(":")[0].strip("[]")
    return host if host not in _WILDCARDS else socket.gethostname()


def witness_key(cfg: KemariConfig) -> bytes:
    """This pair's key at the witness: ``replication.witness_key_file``, never the
    replication key (the witness must not be able to forge replication frames).

    Raises:
        ConfigError: the key file is unreadable, readable by group or others, or too
            short; or there is none.
    """
    r = cfg.replication
    if r.witness_key_file:
        return read_key_file(r.witness_key_file, what="replication.witness_key_file")
    raise ConfigError(
        'tiebreaker = "witness" needs this pair\'s witness key file',
        key="replication.witness_key_file",
    )


def make_tiebreaker(cfg: KemariConfig, node_id: str, *, format_lease: bool) -> Tiebreaker | None:
    """The configured tiebreaker, or None for ``tiebreaker = "none"``.

    With ``"pacemaker"`` the cluster must have fencing (stonith-enabled and a stonith
    resource): the agents refuse to run protected without it.

    ``format_lease`` (the primary) writes a free lease block on a device that has never
    held one; an existing lease is never overwritten.

    Raises:
        ConfigError: the lease device is not configured, the witness key is missing
            or unsafe, or (``"pacemaker"``) the cluster has no fencing or does not answer.
    """
    r = cfg.replication
    timeout_s = r.heartbeat_timeout_ms / 1000
    if r.tiebreaker == "witness":
        return WitnessClient(
            witness_key(cfg),
            r.witness,
            cfg.vm.name,
            node_id,
            # One request may wait longer than a heartbeat interval on two busy cores;
            # within half a lease a late answer still leaves time to act on it.
            timeout=min(timeout_s / 2, max(0.5, r.heartbeat_interval_ms / 1000 * 2)),
        )
    if r.tiebreaker == "pacemaker":
        from kemari_suite.ha.pacemaker import PacemakerTiebreaker, grant_path, require_fencing

        fencing = require_fencing()
        log.info("tiebreaker: pacemaker (fencing devices: %s)", ", ".join(fencing.devices))
        return PacemakerTiebreaker(grant_path(cfg), node_id)
    if r.tiebreaker == "lease":
        from kemari_suite.ha.lease import Lease, LeaseTiebreaker

        device = cfg.disk.lease_device
        if not device:
            raise ConfigError('tiebreaker = "lease" needs disk.lease_device', key="disk")
        # A busy host (two loaded cores here) can stall longer than 0.5 s between the
        # read and the write of a renewal; a quarter of the lease keeps the settle
        # pause (twice this) well inside the lease while not fencing a busy holder.
        lease = Lease(
            device,
            resource=cfg.vm.name,
            lease_s=timeout_s,
            offset=cfg.disk.lease_offset,
            io_timeout_s=max(0.5, timeout_s / 4),
        )
        if format_lease:
            with contextlib.suppress(LeaseError):
                lease.format()
        return LeaseTiebreaker(lease, node_id)
    return None
