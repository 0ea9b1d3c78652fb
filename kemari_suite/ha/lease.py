"""A disk lease on shared storage: fencing for the shared backend and a failover tiebreaker.

Two hosts that see the same block device (FC LUN, iSCSI, a file both can open) agree on
which one may run the VM through one 4 KiB block on that device, the *lease block*.

Layout of the lease block (little-endian, at ``offset``, 4096 bytes, zero-padded)::

    off  size  field
      0     8  magic          b"KEMLEASE"
      8     4  version        2 (version 1, without solo_owner, is still read)
     12     4  flags          bit 0: SOLO, solo_owner runs or ran without a secondary
     16    64  resource       the VM the lease protects (UTF-8, NUL-padded): the pair
     80    64  owner          node name of the holder; empty = free (UTF-8, NUL-padded)
    144     8  generation     the fencing token: bumped on every acquisition (claim or
                              takeover) and when the holder goes solo
    152     8  counter        bumped on every write (renewal, acquisition, release)
    160     8  expires_wall   holder's wall clock + lease_s (float; informational only)
    168     8  lease_s        the holder's lease period (float)
    176     8  written_wall   holder's wall clock at the write (float; informational)
    184    64  solo_owner     who set SOLO (UTF-8, NUL-padded; kept across a release)
    248    32  checksum       SHA-256 of bytes 0..247 (version 1: of 0..183, at 184)

The resource names the pair and the generation the run of its data: together they are
the lineage of what is on the shared disk. While SOLO is set, every host but
``solo_owner`` holds a stale copy: its takeover is refused (even of an expired or
released lease), so it can neither resume nor replay its logs onto newer data. A
host whose generation is older than the block's may not write (:meth:`Lease.check`).

Expiry is judged the classic disk-lease way (as in sanlock's delta leases), never from
another host's wall clock: a host that wants the lease reads the block repeatedly and
takes it over only after the holder's ``(owner, generation, counter)`` stood still for
``max(lease_s, holder's lease_s)`` on its *own* monotonic clock, counted from the end of
the read that first saw that value. The holder renews every ``lease_s / 3`` or so and
considers its lease valid until ``start of its last successful renewal + lease_s -
margin``: since that start precedes the write the other host watches, the holder's view
always runs out first, even when the two wall clocks disagree.

There is no compare-and-swap on a plain block device, so an acquisition is a write, a
pause of ``settle_s`` and a re-read: of two hosts racing for a free or expired lease the
last writer wins and the other sees it on its re-read. This is safe as long as a host's
read-then-write takes less than ``io_timeout_s`` (checked on both sides of the write)
and ``settle_s`` is larger than that (default twice ``io_timeout_s``).

Reads and writes use ``O_DIRECT|O_SYNC`` with a page-aligned buffer, so that neither host
reads its own stale page cache; where the file system refuses ``O_DIRECT`` (tmpfs, the
lab's files) the lease falls back to ``pwrite`` + ``fdatasync`` and drops the cached page
before each read. On a block device ``O_DIRECT`` is required.

A lease block that is all zeroes is *unformatted*, anything with a wrong magic, version,
resource or checksum is *corrupted*: both raise :class:`~kemari_suite.errors.LeaseError`
and are never overwritten silently (:meth:`Lease.format` with ``force=True`` does it).

:class:`LeaseTiebreaker` offers the witness's interface (``await ask(op)`` returning a
:class:`~kemari_suite.ha.witness.Decision`, ``lease_valid``) so the memsync agents
can use either.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kemari_suite.errors import ConnectError, LeaseError
from kemari_suite.ha.leaseblock import (
    FLAG_SOLO,
    LEASE_BLOCK,
    LEASE_MAGIC,
    LEASE_VERSION,
    LeaseRecord,
    _BlockIO,
)
from kemari_suite.ha.witness import Decision, Op

__all__ = [
    "FLAG_SOLO",
    "LEASE_BLOCK",
    "LEASE_MAGIC",
    "LEASE_VERSION",
    "Lease",
    "LeaseAttempt",
    "LeaseRecord",
    "LeaseTiebreaker",
]


@dataclass(frozen=True)
class LeaseAttempt:
    """The outcome of one acquisition attempt."""

    granted: bool
    record: LeaseRecord
    reason: str
    #: For a refusal while watching a holder: how much longer it must stand still.
    wait_left_s: float = 0.0


class Lease:
    """The lease block of ``resource`` at ``offset`` of ``device``, seen from one host.

    ``clock`` (monotonic), ``wall`` and ``sleep`` are injectable for tests. ``direct``:
    None = O_DIRECT when the file system allows it (required on block devices), True =
    required, False = never. Methods are thread-safe (one lock per object).
    """

    def __init__(
        self,
        device: str | os.PathLike[str],
        *,
        resource: str,
        lease_s: float = 3.0,
        io_timeout_s: float = 0.5,
        settle_s: float | None = None,
        offset: int = 0,
        direct: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if offset % LEASE_BLOCK:
            raise LeaseError(str(device), f"lease offset {offset} is not 4096-aligned")
        if lease_s <= 0 or io_timeout_s <= 0:
            raise LeaseError(str(device), "lease_s and io_timeout_s must be positive")
        self.device = Path(device)
        self.resource = resource
        self.lease_s = lease_s
        self.io_timeout_s = io_timeout_s
        self.settle_s = settle_s if settle_s is not None else 2 * io_timeout_s
        if self.settle_s <= io_timeout_s:
            raise LeaseError(str(device), "settle_s must be larger than io_timeout_s")
        self.clock, self.wall, self.sleep = clock, wall, sleep
        self._io = _BlockIO(self.device, offset, direct)
        self._lock = threading.Lock()
        #: The node and generation we hold, or None.
        self.node: str | None = None
        self.generation: int | None = None
        #: Monotonic start of our last successful acquisition or renewal.
        self.last_renewed: float | None = None
        # What we last saw of another holder, and when (end of the read) we first saw it.
        self._seen: tuple[tuple[str | None, int, int], float] | None = None

    @property
    def direct(self) -> bool:
        return self._io.direct

    # ---- low level ------------------------------------------------------------------

    def _read(self) -> LeaseRecord:
        rec = LeaseRecord.decode(self._io.read(), str(self.device))
        if rec.resource != self.resource:
            raise LeaseError(
                str(self.device),
                f"lease belongs to resource {rec.resource!r}, not {self.resource!r}",
            )
        return rec

    def _write(self, rec: LeaseRecord, read_started: float) -> None:
        """Write, refusing when the read-to-write window exceeded io_timeout_s."""
        if self.clock() - read_started > self.io_timeout_s:
            raise LeaseError(
                str(self.device),
                f"lease I/O slower than io_timeout_s ({self.io_timeout_s} s): not writing",
            )
        self._io.write(rec.encode())
        if self.clock() - read_started > self.io_timeout_s:
            raise LeaseError(
                str(self.device),
                f"lease write finished after io_timeout_s ({self.io_timeout_s} s): not trusting it",
            )

    def _next(self, rec: LeaseRecord, owner: str | None, generation: int) -> LeaseRecord:
        now = self.wall()
        return replace(
            rec,
            owner=owner,
            generation=generation,
            counter=rec.counter + 1,
            expires_wall=now + self.lease_s if owner else 0.0,
            lease_s=self.lease_s,
            written_wall=now,
        )

    # ---- public ---------------------------------------------------------------------

    def format(self, *, force: bool = False) -> LeaseRecord:
        """Write a free lease (generation 0).

        Raises:
            LeaseError: the block already holds a valid lease or foreign data (unless
                ``force``), or the write failed.
        """
        with self._lock:
            if not force:
                try:
                    existing = LeaseRecord.decode(self._io.read(), str(self.device))
                except LeaseError as err:
                    if "not formatted" not in err.reason:
                        raise LeaseError(
                            str(self.device), f"refusing to format over it: {err.reason}"
                        ) from err
                else:
                    raise LeaseError(
                        str(self.device),
                        f"already holds a lease of {existing.resource!r} "
                        f"(owner {existing.owner}); use force",
                    )
            now = self.wall()
            rec = LeaseRecord(self.resource, None, 0, 0, 0.0, self.lease_s, now)
            self._io.write(rec.encode())
            self.node = self.generation = self.last_renewed = None
            return rec

    def holder(self) -> LeaseRecord:
        """Read the lease block.

        Raises:
            LeaseError: unreadable, unformatted, corrupted or another resource's.
        """
        with self._lock:
            return self._read()

    def try_acquire(self, node: str, *, allow_takeover: bool = True) -> LeaseAttempt:
        """One non-blocking attempt: claim a free lease, adopt our own, or take over one
        whose holder stood still for the lease period. Call it repeatedly to keep watching.

        Raises:
            LeaseError: I/O failed, or the block is unformatted or corrupted.
        """
        if not node:
            raise LeaseError(str(self.device), "empty node name")
        with self._lock:
            t0 = self.clock()
            rec = self._read()
            t_seen = self.clock()
            if rec.owner == node:
                # Ours (also after an agent restart on this host): renewing is safe.
                new = self._next(rec, node, rec.generation)
                self._write(new, t0)
                self._held(node, new.generation, t0)
                return LeaseAttempt(True, new, "renewed (already ours)")
            if allow_takeover and rec.stale_for(node):
                return LeaseAttempt(False, rec, rec.stale_reason())
            if rec.owner is None:
                new = self._next(rec, node, rec.generation + 1)
                return self._settle(node, new, t0, "claimed a free lease")
            key = (rec.owner, rec.generation, rec.counter)
            if self._seen is None or self._seen[0] != key:
                self._seen = (key, t_seen)
            still = t_seen - self._seen[1]
            needed = max(self.lease_s, rec.lease_s)
            if not allow_takeover:
                return LeaseAttempt(False, rec, f"lease held by {rec.owner}")
            if still < needed:
                return LeaseAttempt(
                    False,
                    rec,
                    f"lease held by {rec.owner} (generation {rec.generation}); its renew "
                    f"counter stood still for {still:.2f} s of {needed:.2f} s",
                    wait_left_s=needed - still,
                )
            new = replace(self._next(rec, node, rec.generation + 1), solo=False, solo_owner=None)
            return self._settle(
                node,
                new,
                t0,
                f"taken over from {rec.owner} after its renew counter stood still "
                f"for {still:.2f} s",
            )

    def _settle(self, node: str, new: LeaseRecord, t0: float, reason: str) -> LeaseAttempt:
        """Write our claim, wait settle_s, and keep it only if it is still there."""
        self._write(new, t0)
        self.sleep(self.settle_s)
        after = self._read()
        if after.owner != node or after.generation != new.generation:
            self._seen = ((after.owner, after.generation, after.counter), self.clock())
            return LeaseAttempt(
                False, after, f"lost the race for the lease to {after.owner or 'nobody'}"
            )
        self._seen = None
        self._held(node, new.generation, t0)
        return LeaseAttempt(True, after, reason)

    def _held(self, node: str, generation: int, t0: float) -> None:
        self.node, self.generation, self.last_renewed = node, generation, t0

    def acquire(
        self, node: str, *, wait_s: float = 0.0, poll_s: float | None = None
    ) -> LeaseRecord:
        """Acquire the lease for ``node``, watching a live holder for up to ``wait_s``.

        Raises:
            LeaseError: held by another host that kept renewing (or not watched long
                enough), lost a race, or the block is unreadable/corrupted.
        """
        deadline = self.clock() + wait_s
        poll = poll_s if poll_s is not None else self.lease_s / 4
        while True:
            att = self.try_acquire(node)
            if att.granted:
                return att.record
            now = self.clock()
            if now >= deadline:
                raise LeaseError(str(self.device), att.reason)
            self.sleep(min(poll, deadline - now))

    def renew(self) -> LeaseRecord:
        """Bump the renew counter of the lease we hold.

        Raises:
            LeaseError: we do not hold it, another host took it over (different owner or
                generation: we must stop writing at once), or I/O failed.
        """
        with self._lock:
            if self.node is None or self.generation is None:
                raise LeaseError(str(self.device), "renew without holding the lease")
            t0 = self.clock()
            rec = self._read()
            if rec.owner != self.node or rec.generation != self.generation:
                mine = self.generation
                self.node = self.generation = self.last_renewed = None
                raise LeaseError(
                    str(self.device),
                    f"lease lost: now held by {rec.owner or 'nobody'} "
                    f"(generation {rec.generation}, ours was {mine})",
                )
            new = self._next(rec, self.node, rec.generation)
            self._write(new, t0)
            self.last_renewed = t0
            return new

    def release(self) -> LeaseRecord:
        """Mark the lease free (same generation; the next holder bumps it).

        Raises:
            LeaseError: we do not hold it any more, or I/O failed.
        """
        with self._lock:
            if self.node is None or self.generation is None:
                raise LeaseError(str(self.device), "release without holding the lease")
            t0 = self.clock()
            rec = self._read()
            node, gen = self.node, self.generation
            self.node = self.generation = self.last_renewed = None
            if rec.owner != node or rec.generation != gen:
                raise LeaseError(
                    str(self.device),
                    f"not releasing: held by {rec.owner or 'nobody'} (generation {rec.generation})",
                )
            new = self._next(rec, None, rec.generation)
            self._write(new, t0)
            return new

    def set_solo(self, solo: bool) -> LeaseRecord:
        """Record that we run without a secondary (``solo``) or paired again. Going solo
        starts a new generation: what we write from now on is newer than any other copy.

        Raises:
            LeaseError: we do not hold the lease (any more), or I/O failed.
        """
        with self._lock:
            if self.node is None or self.generation is None:
                raise LeaseError(str(self.device), "solo/paired without holding the lease")
            t0 = self.clock()
            rec = self._read()
            if rec.owner != self.node or rec.generation != self.generation:
                self.node = self.generation = self.last_renewed = None
                raise LeaseError(
                    str(self.device),
                    f"lease lost: now held by {rec.owner or 'nobody'} "
                    f"(generation {rec.generation})",
                )
            new_era = solo and not (rec.solo and rec.solo_owner == self.node)
            gen = rec.generation + 1 if new_era else rec.generation
            new = replace(
                self._next(rec, self.node, gen),
                solo=solo,
                solo_owner=self.node if solo else None,
            )
            self._write(new, t0)
            self.generation, self.last_renewed = gen, t0
            return new

    def check(self) -> LeaseRecord:
        """Read the block and make sure it still names our node and generation (before
        writing to the data the lease protects).

        Raises:
            LeaseError: another host holds a newer generation (we must not write), we
                hold nothing, or I/O failed.
        """
        with self._lock:
            if self.node is None or self.generation is None:
                raise LeaseError(str(self.device), "not holding the lease: refusing writes")
            rec = self._read()
            if rec.owner != self.node or rec.generation != self.generation:
                raise LeaseError(
                    str(self.device),
                    f"generation {rec.generation} on disk (held by {rec.owner or 'nobody'}) is "
                    f"newer than ours ({self.generation}): another host took over; "
                    "refusing writes",
                )
            return rec

    def valid(self, margin_s: float = 0.0) -> bool:
        """Our conservative local view: do we certainly still hold the lease?"""
        if self.last_renewed is None:
            return False
        return self.clock() < self.last_renewed + self.lease_s - margin_s

    def close(self) -> None:
        self._io.close()


def _io_failure(err: LeaseError) -> bool:
    """True when the lease could not be read or written (as opposed to bad content)."""
    return isinstance(err.__cause__, OSError)


class LeaseTiebreaker:
    """The lease as a failover tiebreaker, with the interface of ``WitnessClient``.

    ``ask("renew")`` renews our lease or claims a free one (never takes one over);
    ``ask("takeover")`` additionally takes over a lease whose holder stood still for the
    lease period (call it every heartbeat: each call continues the watch); ``"release"``
    and ``"query"`` as on the witness. A lease that is corrupted, unformatted or held by
    another host is a refusal naming why; a lease device that cannot be read or written
    raises :class:`~kemari_suite.errors.ConnectError`, like an unreachable witness.
    """

    def __init__(self, lease: Lease, node: str) -> None:
        self.lease = lease
        self.node = node
        #: monotonic time at which the last *granted* request was sent
        self.last_granted_sent: float | None = None
        self.lease_s: float | None = lease.lease_s

    def _decision(
        self, granted: bool, rec: LeaseRecord | None, reason: str, left: float
    ) -> Decision:
        return Decision(
            granted,
            rec.owner if rec is not None else None,
            rec.generation if rec is not None else 0,
            max(0.0, left),
            reason,
            solo=rec.solo if rec is not None else False,
            stale=rec.stale_for(self.node) if rec is not None else False,
        )

    def _ask_sync(self, op: Op) -> Decision:
        lease = self.lease
        sent = lease.clock()
        try:
            if op == "query":
                rec = lease.holder()
                mine = rec.owner == self.node and lease.valid()
                left = (lease.last_renewed or sent) + lease.lease_s - sent if mine else 0.0
                return self._decision(mine, rec, "query", left)
            if op == "release":
                if lease.node is None:
                    rec = lease.holder()
                    return self._decision(False, rec, f"not the owner (owner is {rec.owner})", 0)
                rec = lease.release()
                self.last_granted_sent = None
                return self._decision(True, rec, "released", 0.0)
            if op in ("solo", "paired"):
                return self._solo(op == "solo", sent)
            if op == "renew" and lease.node == self.node:
                try:
                    rec = lease.renew()
                except LeaseError as err:
                    if _io_failure(err):
                        raise
                    self.last_granted_sent = None
                    return self._decision(False, lease.holder(), err.reason, 0.0)
                self.last_granted_sent = sent
                return self._decision(True, rec, "renewed", lease.lease_s)
            att = lease.try_acquire(self.node, allow_takeover=op == "takeover")
        except LeaseError as err:
            if _io_failure(err):
                raise ConnectError(f"lease {lease.device}", err.reason) from err
            return self._decision(False, None, err.reason, 0.0)
        if att.granted:
            self.last_granted_sent = sent
            return self._decision(True, att.record, att.reason, lease.lease_s)
        return self._decision(False, att.record, att.reason, att.wait_left_s)

    def _solo(self, solo: bool, sent: float) -> Decision:
        """Hold the lease (claiming a free one) and set or clear the SOLO flag.

        Raises:
            LeaseError: I/O failed (the caller turns it into ConnectError).
        """
        lease = self.lease
        if lease.node != self.node:
            att = lease.try_acquire(self.node, allow_takeover=False)
            if not att.granted:
                return self._decision(False, att.record, att.reason, att.wait_left_s)
        try:
            rec = lease.set_solo(solo)
        except LeaseError as err:
            if _io_failure(err):
                raise
            self.last_granted_sent = None
            return self._decision(False, lease.holder(), err.reason, 0.0)
        self.last_granted_sent = sent
        why = "running without a secondary" if solo else "paired"
        return self._decision(True, rec, why, lease.lease_s)

    async def ask(self, op: Op) -> Decision:
        """Raises ConnectError when the lease device cannot be read or written."""
        # The lease does blocking I/O and sleeps settle_s: keep it off the event loop.
        return await asyncio.to_thread(self._ask_sync, op)

    def lease_valid(self, lease_s: float, margin_s: float) -> bool:
        """Our own conservative view: is our lease still certainly valid?"""
        if self.last_granted_sent is None:
            return False
        return self.lease.clock() < self.last_granted_sent + lease_s - margin_s
