"""DRBD 9, protocol C, as a disk backend: the guest's committed writes go to /dev/drbdN.

Three layers, one module each:

* :mod:`kemari_suite.disk.drbdconf`: :class:`DrbdConfig` and :func:`render_resource`
  (the resource file, with safe defaults: protocol C, fencing with the suite's
  fence-peer handler, split brain always ``disconnect``, ``auto-promote no``).
* :mod:`kemari_suite.disk.drbdadm`: :class:`DrbdTools` (every drbd-utils call through
  ``sh``, failures as :class:`~kemari_suite.errors.DrbdError`, dry-run recording),
  :class:`DrbdAdm` (operations on a resource whose file exists) and
  :class:`DrbdResource` (one whose file this host renders).
* this module: :class:`DrbdBackend`, the :class:`~kemari_suite.disk.base.DiskBackend`:
  attach = (write the resource file and) ``drbdadm adjust`` (which is ``up`` for a
  resource that is down, and idempotent otherwise), promote = ``drbdadm primary``
  (:func:`promote_resource`: at a takeover, once more when DRBD lost the peer meanwhile
  or, bounded, once it has lost a peer it still counted as a connected Primary) then
  open the device, demote = flush, close, ``drbdadm
  secondary``, apply = pwrite to ``/dev/drbdN``, status = the parsed ``drbdsetup status
  --json``.

While attached, the backend follows the resource's ``drbdsetup events2``
(:mod:`kemari_suite.disk.drbdwatch`): a split brain DRBD detects is recorded (``status()``
shows it under ``detail["split_brain"]``, not up to date), alerted (``on_split_brain``,
:func:`~kemari_suite.disk.drbdwatch.alert_on_split_brain`) and makes every later
``promote()`` fail with :class:`~kemari_suite.disk.drbdwatch.SplitBrainError` until an
operator resolved it (the runbook: :data:`~kemari_suite.disk.drbdwatch.RUNBOOK`). It is
never resolved here: that would discard one side's writes.

DRBD replicates the data itself: the backend declares ``replays_log`` (the standby keeps
the committed I/O logs and replays them after ``promote`` at failover: with protocol C
every write the primary applied is on both disks, the logs cover the acknowledged epochs
it had not applied yet) and none of the built-in disk's copy capabilities.

The names of the three modules are re-exported here, so ``from kemari_suite.disk.drbd
import DrbdConfig, DrbdTools, ...`` keeps working.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kemari_suite.disk.base import (
    DiskCaps,
    DiskRole,
    DiskStatus,
    FileDisk,
    PlainCapabilities,
    device_size,
)
from kemari_suite.disk.drbdadm import (
    CommandResult,
    DrbdAdm,
    DrbdResource,
    DrbdTools,
    check_with_drbdadm,
)
from kemari_suite.disk.drbdconf import (
    DEFAULT_CONFIG_DIR,
    MAX_MINOR,
    MAX_NODE_ID,
    DrbdConfig,
    DrbdNode,
    QuorumOptions,
    drbd_config_from_dict,
    render_resource,
    validate,
)
from kemari_suite.disk.drbdevents import DrbdEvent, Notice, SplitBrain
from kemari_suite.disk.drbdstatus import ConnectionState, ResourceStatus, Role
from kemari_suite.disk.drbdwatch import (
    DEFAULT_STATE_DIR,
    EventsWatch,
    SplitBrainGuard,
    SplitBrainRecord,
)
from kemari_suite.errors import DiskError, DrbdError

#: Bounds ``drbdadm primary`` at a promotion: without its peer, the kernel runs the
#: fence-peer handler (``kemari fence-peer``, a Python process asking the tiebreaker)
#: before it answers, which takes seconds on a loaded host.
PROMOTE_TIMEOUT_S = 180.0
#: How long a promotion waits for DRBD to lose a peer it still counts as a connected
#: Primary: 8.4 notices a dead peer after ``ping-int`` (10 s) plus the ping timeout
#: (11-20 s measured in the kernel lab).
PEER_LOSS_WAIT_S = 60.0
#: How long ``attach`` waits for events2's initial state (a loaded host is slow to start
#: drbdsetup; the watch goes on anyway).
WATCH_READY_S = 10.0


class Promotion(enum.Enum):
    """How :func:`promote_resource` made the resource Primary."""

    #: The first ``drbdadm primary``.
    DIRECT = "direct"
    #: Refused, DRBD had lost the peer meanwhile; the second ``primary``.
    PEER_LOST = "peer-lost"
    #: Refused, the peer still a connected Primary; DRBD lost it while we waited; the
    #: second ``primary``.
    WAITED = "waited"


def peer_still_primary(status: ResourceStatus | None) -> bool:
    """DRBD still counts a peer as connected and Primary (its role is Unknown once the
    connection is lost): why ``drbdadm primary`` is refused at a takeover before DRBD
    noticed the dead primary (8.4: after ``ping-int`` plus the ping timeout)."""
    if status is None or status.role is Role.PRIMARY:
        return False
    return any(c.peer_role is Role.PRIMARY for c in status.connections)


def peer_lost(status: ResourceStatus | None) -> bool:
    """The resource is up and no connection to a peer is established."""
    if status is None:
        return False
    return all(c.connection_state is not ConnectionState.CONNECTED for c in status.connections)


def promote_resource(
    adm: DrbdAdm,
    *,
    timeout_s: float = PROMOTE_TIMEOUT_S,
    peer_wait_s: float = PEER_LOSS_WAIT_S,
    poll_s: float = 1.0,
) -> Promotion:
    """Make ``adm``'s resource Primary here, at a takeover the tiebreaker granted.

    ``drbdadm primary``; when DRBD refuses it, its status says what next:

    * DRBD lost the peer meanwhile (:func:`peer_lost`): ``drbdadm primary`` again. 8.4
      gives a promotion that found the peer Primary one more try, a ping timeout later;
      by then DRBD may have lost the peer and run the fence-peer handler, which outdated
      the peer, but the tries are spent and the promotion is refused (seen in the lab);
    * DRBD still counts the lost primary as its connected Primary peer
      (:func:`peer_still_primary`): wait, polling the status every ``poll_s``, up to
      ``peer_wait_s`` for DRBD to lose it, then ``drbdadm primary`` again. The
      connection is never dropped from here: a peer that stays connected is alive
      (a switchover whose old primary did not demote, an engine that died on a live
      host), and promoting over it would split the brain;
    * anything else (a connected peer that is not Primary, our data not up to date,
      the resource down): the refusal is raised as it is.

    Without a peer, fencing ``resource-and-stonith`` makes the kernel run the fence-peer
    handler (``kemari fence-peer``: the tiebreaker) before the promotion: it lets it
    through only on the host that holds the lease (elsewhere it outdates this host's
    disk and ``primary`` fails).

    Raises:
        DrbdError: DRBD refused for another reason (the first ``primary``'s error, the
            status read after it as its cause when that failed too); the peer was still
            a connected Primary after ``peer_wait_s`` (the first refusal's command, exit
            code and stderr, saying so); or the second ``primary`` failed (its error,
            chained to the first refusal). Each names the command, exit code and stderr.
    """
    try:
        adm.primary(timeout_s=timeout_s)
        return Promotion.DIRECT
    except DrbdError as refused:
        status = _status_after(adm, refused)
        if peer_lost(status):
            how = Promotion.PEER_LOST
        elif peer_still_primary(status):
            deadline = time.monotonic() + peer_wait_s
            while peer_still_primary(status) and time.monotonic() < deadline:
                time.sleep(poll_s)
                status = _status_after(adm, refused)
            if peer_still_primary(status):
                raise DrbdError(
                    adm.name,
                    refused.command,
                    refused.rc,
                    f"{refused.stderr.strip()}; the peer still counts as a connected Primary "
                    f"after {peer_wait_s:.0f} s: it is alive, not promoting over it",
                ) from refused
            how = Promotion.WAITED
        else:
            raise
        try:
            adm.primary(timeout_s=timeout_s)
        except DrbdError as err:
            raise err from refused
    return how


def _status_after(adm: DrbdAdm, refused: DrbdError) -> ResourceStatus | None:
    """The status after ``refused``; a status that cannot be read raises ``refused``
    (what failed) with the read's error as its cause."""
    try:
        return adm.status()
    except DiskError as unread:
        raise refused from unread


class DrbdBackend(PlainCapabilities):
    """The DRBD :class:`~kemari_suite.disk.base.DiskBackend`.

    Built from a :class:`DrbdConfig` (``attach`` writes the resource file first), or with
    :meth:`for_resource` for a resource whose file exists already (the playbooks write
    ``/etc/drbd.d/RES.res``). ``device_path`` replaces ``/dev/drbdN`` (tests, dry runs,
    ``/dev/drbd/by-res/RES/0``).

    ``state_dir`` holds ``RES.split-brain``, the split brain seen on this host (None: kept
    in memory only); ``watch_events`` False (or dry-run tools) follows no events2.
    """

    name = "drbd"
    caps = DiskCaps(replays_log=True)

    def __init__(
        self,
        config: DrbdConfig | DrbdAdm,
        node: str = "",
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        device_path: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = DEFAULT_STATE_DIR,
        watch_events: bool = True,
    ) -> None:
        """``config``: the resource to render (``node`` is this host in it), or the
        operations on an existing one (then ``device_path`` is required).

        Raises:
            ConfigError: ``node`` is not a node of ``config``.
            DiskError: an existing resource without ``device_path``.
        """
        if isinstance(config, DrbdAdm):
            if device_path is None:
                raise DiskError(self.name, f"{config.name}: the device path is required")
            self.resource = config
            self.device_path = Path(device_path)
        else:
            self.resource = DrbdResource(config, node, config_path=config_path, tools=tools)
            self.device_path = Path(device_path if device_path is not None else config.device)
        self.tracking = False
        #: How the last promotion went (None: not promoted here).
        self.promotion: Promotion | None = None
        self._disk: FileDisk | None = None
        self._size = 0
        name = self.resource.name
        marker = Path(state_dir) / f"{name}.split-brain" if state_dir is not None else None
        #: The split brain seen on this host (events2, or the marker of an earlier one).
        self.split_brain_guard = SplitBrainGuard(name, marker)
        self.watch_events = watch_events and not self.resource.tools.dry_run
        self._watch: EventsWatch | None = None

    @classmethod
    def for_resource(
        cls,
        resource: str,
        device_path: str | os.PathLike[str],
        *,
        config_path: str | os.PathLike[str] | None = None,
        tools: DrbdTools | None = None,
        dialect: str = "9",
        state_dir: str | os.PathLike[str] | None = DEFAULT_STATE_DIR,
        watch_events: bool = True,
    ) -> DrbdBackend:
        """The backend of an existing resource file (nothing is rendered or written);
        ``dialect`` is the loaded module's, "9" or "8.4" (:func:`detect_dialect`)."""
        adm = DrbdAdm(resource, config_path=config_path, tools=tools, dialect=dialect)
        return cls(adm, device_path=device_path, state_dir=state_dir, watch_events=watch_events)

    @property
    def split_brain(self) -> SplitBrainRecord | None:
        """The split brain seen on this host and not resolved yet (None: none)."""
        return self.split_brain_guard.record

    @property
    def on_split_brain(self) -> Callable[[SplitBrainRecord], None] | None:
        """Called once with the record when a split brain is seen (from the events2
        thread; at once when set while one is held): the engine's alert."""
        return self.split_brain_guard.on_split_brain

    @on_split_brain.setter
    def on_split_brain(self, callback: Callable[[SplitBrainRecord], None] | None) -> None:
        self.split_brain_guard.on_split_brain = callback

    def _start_watch(self) -> None:
        """Follow ``drbdsetup events2 RES`` on a thread (once), and wait a little for
        its initial state so that what happens next is seen."""
        if not self.watch_events or self._watch is not None:
            return
        tools = self.resource.tools
        argv = list(self.resource.events_argv(now=False))
        # The same binary and environment as every other drbd-utils call.
        argv[0] = tools._path(argv[0])
        self._watch = EventsWatch(argv, self.resource.name, self._notice, env=tools._env(None))
        self._watch.start()
        self._watch.wait_ready(WATCH_READY_S)

    def _notice(self, notice: Notice, event: DrbdEvent) -> None:
        if isinstance(notice, SplitBrain):
            # 8.4 names every peer "peer": the resource file knows its name.
            peer = self.resource.pair.peer_name if self.resource.dialect == "8.4" else None
            if peer:
                notice = dataclasses.replace(notice, peer=peer)
            self.split_brain_guard.notice(notice, event.timestamp)

    @property
    def size(self) -> int:
        return self._disk.size if self._disk is not None else self._size

    def attach(self) -> None:
        """(Write the resource file and) ``drbdadm adjust`` (``up`` when down).

        Raises:
            DrbdError: drbdadm failed.
            DiskError: the resource file cannot be written.
        """
        if isinstance(self.resource, DrbdResource):
            self.resource.write_config()
        # Before adjust: adjust connects a StandAlone resource, and DRBD may detect a
        # split brain at once (for a resource that is still down, a drbdsetup that
        # exits is started again a second later).
        self._start_watch()
        self.resource.adjust()
        self._size = _device_size(self.device_path)

    def promote(self) -> None:
        """``drbdadm primary`` (never forced; :func:`promote_resource`: once more when
        DRBD lost the peer meanwhile or, bounded, once it has lost a peer it still
        counted as a connected Primary), then open the device for writing. The engine
        promotes only on the host the tiebreaker chose (a takeover it granted, or the
        primary it lets run).

        Refused before DRBD is asked while a split brain seen on this host is not
        resolved (the resource connected again with both disks UpToDate).

        Raises:
            SplitBrainError: a split brain not resolved (a DiskError naming the runbook).
            DrbdError: DRBD refused (a live Primary peer, still connected or reported by
                the fence-peer handler; no up-to-date data; no quorum), naming the
                command, exit code and stderr.
            DiskError: the device cannot be opened.
        """
        if self.split_brain_guard.record is not None:
            self.split_brain_guard.check(self.resource.status())
        self.promotion = promote_resource(self.resource)
        if self._disk is None:
            disk = FileDisk(self.device_path)
            disk.attach()
            disk.promote()
            self._disk = disk

    def demote(self) -> None:
        """Flush and close the device, then ``drbdadm secondary``.

        Raises:
            DrbdError: DRBD refused (the device is still open elsewhere).
        """
        if self._disk is not None:
            disk, self._disk = self._disk, None
            try:
                disk.flush()
            finally:
                disk.close()
        self.resource.secondary()

    def _writer(self) -> FileDisk:
        if self._disk is None:
            raise DiskError(self.name, f"{self.resource.name}: not primary on this host")
        return self._disk

    def read(self, offset: int, length: int) -> bytes:
        """Read from the DRBD device (open once primary here).

        Raises:
            DiskError: not primary here, or the read failed.
        """
        return self._writer().read(offset, length)

    def apply(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """pwrite to the DRBD device; with protocol C a write completes once both disks have it.

        Raises:
            DiskError: not primary here, or the write failed.
        """
        self._writer().apply(writes)

    def flush(self) -> None:
        self._writer().flush()

    def status(self) -> DiskStatus:
        """Parsed ``drbdsetup status --json``; a split brain seen and not resolved is
        ``detail["split_brain"]`` (peer, when) and the copy is not up to date.

        Raises:
            DrbdError: drbdsetup failed (not for a resource that is simply down).
        """
        st = self.resource.status()
        guard = self.split_brain_guard
        split = guard.record if guard.clear_if_resolved(st) else None
        extra = {"split_brain": split.to_dict()} if split is not None else {}
        if st is None:
            return DiskStatus(
                self.name,
                DiskRole.UNKNOWN,
                connected=False,
                up_to_date=False,
                resync_percent=None,
                detail={"resource": self.resource.name, "state": "down", **extra},
            )
        role = {
            Role.PRIMARY: DiskRole.PRIMARY,
            Role.SECONDARY: DiskRole.SECONDARY,
            Role.UNKNOWN: DiskRole.UNKNOWN,
        }[st.role]
        return DiskStatus(
            self.name,
            role,
            connected=st.connected,
            up_to_date=st.up_to_date and split is None,
            resync_percent=st.resync_percent,
            detail={**st.to_dict(), "peers_up_to_date": st.peers_up_to_date, **extra},
        )

    def close(self) -> None:
        """Stop following events2 and close the device (the resource stays up:
        ``resource.down()`` takes it down)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        if self._disk is not None:
            disk, self._disk = self._disk, None
            disk.close()


def _device_size(path: Path) -> int:
    """Size of the device (a DRBD 8.4 Secondary, which refuses to open, from sysfs), 0
    where none can be read (a dry run without the device): known at the latest once
    promoted."""
    return device_size(path) or 0


__all__ = [
    "DEFAULT_CONFIG_DIR",
    "MAX_MINOR",
    "MAX_NODE_ID",
    "PEER_LOSS_WAIT_S",
    "PROMOTE_TIMEOUT_S",
    "CommandResult",
    "DrbdAdm",
    "DrbdBackend",
    "DrbdConfig",
    "DrbdNode",
    "DrbdResource",
    "DrbdTools",
    "Promotion",
    "QuorumOptions",
    "SplitBrainRecord",
    "check_with_drbdadm",
    "drbd_config_from_dict",
    "peer_lost",
    "peer_still_primary",
    "promote_resource",
    "render_resource",
    "validate",
]
