"""Event taps: the block tap (NBD export with an epoch log) and the network frame proxy,
both holding the guest's output until the checkpoint that produced it is on the
secondary, and the sync policies their events drive.

::

    guest write --> nbd.BlockTap --> epochs.EpochLog --(IOLog)--> secondary
                                          | commit_epoch(e) -> apply to the disk backend
    guest frame --> net.FrameProxy (held per epoch) --release(e)--> TAP --> LAN
    tap events  --> policy.SyncScheduler --> the primary's sync points

Wiring into the primary (one event loop; :class:`~kemari_suite.tap.guestio.GuestIO`
does all of this for one VM)::

    sched = SyncScheduler(make_policy(cfg.tap.policy, max_interval_ms=..., ...))
    check_tapped(spec, net_socket=NET, nbd_socket=NBD)            # before QEMU starts
    block = BlockTap(disk, epoch=e0, mode=TapMode.UNPROTECTED, on_event=sched.notify)
    nbd = NBDServer(block, NBD, export_name="disk0"); await nbd.start()
    net = FrameProxy(NET, open_tap(tap_name), epoch=e0, mode=TapMode.UNPROTECTED,
                     on_event=sched.notify); await net.start()  # before QEMU: it connects once
    agent.io_log_provider = block.io_log                          # called while stopped
    protection starts (before the first epoch closes): block.set_protected(); net.set_protected()
    trigger: reason = await sched.wait_due()
    inside the stopped window, where the epoch switches to e + 1:
              block.switch_epoch(e + 1); net.switch_epoch(e + 1); sched.started(e)
    ack of e: block.commit_epoch(e); sched.finished(); then, in ack order (a task, so
              the next sync point need not wait for the disk):
              await block.output_ready(e); net.release(e)
    UNPROTECTED (tiebreaker won): await block.set_unprotected(); net.set_unprotected()
    HELD: nothing; output stays held (the proxy drops and counts frames past its hold
          limit; the block log grows: watch block.log.pending_bytes())

On the secondary: keep the IOLog payloads of committed epochs; at failover, before the
guest resumes, ``replay(disk, payloads not yet reported durable)`` (a disk it holds a
copy of takes each committed epoch with ``apply_log`` instead); then its own
FrameProxy (UNPROTECTED) on its TAP, and ``announce-self``.
"""

from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.blocktap import BlockTap
from kemari_suite.tap.epochs import (
    EpochLog,
    IOLogRecord,
    IOOp,
    OpKind,
    apply_log,
    parse,
    replay,
)
from kemari_suite.tap.events import EventSink, IOEvent, OpenEpoch, TapMode
from kemari_suite.tap.guard import check_tapped
from kemari_suite.tap.nbd import NBDServer
from kemari_suite.tap.net import FrameProxy
from kemari_suite.tap.policy import (
    AdaptivePolicy,
    KemariPolicy,
    OutputPolicy,
    RemusPolicy,
    SyncPolicy,
    SyncScheduler,
    make_policy,
)
from kemari_suite.tap.tun import TapDevice, open_tap

__all__ = [
    "AdaptivePolicy",
    "BlockBackend",
    "BlockTap",
    "EpochLog",
    "EventSink",
    "FrameProxy",
    "IOEvent",
    "IOLogRecord",
    "IOOp",
    "KemariPolicy",
    "NBDServer",
    "OpKind",
    "OpenEpoch",
    "OutputPolicy",
    "RemusPolicy",
    "SyncPolicy",
    "SyncScheduler",
    "TapDevice",
    "TapMode",
    "apply_log",
    "check_tapped",
    "make_policy",
    "open_tap",
    "parse",
    "replay",
]
