"""Event taps: the block tap (NBD export with an epoch log) and the network frame proxy,
both holding the guest's output until the checkpoint that produced it is on the
secondary, and the sync policies their events drive.

::

    guest write --> nbd.BlockTap --> epochs.EpochLog --(IOLog)--> secondary
                                          | commit_epoch(e) -> apply to the disk backend
    guest frame --> net.FrameProxy (held per epoch) --release(e)--> TAP --> LAN
    tap events  --> policy.SyncScheduler --> the primary's sync points
"""

from kemari_suite.tap.backend import BlockBackend
from kemari_suite.tap.epochs import EpochLog, IOLogRecord, IOOp, OpKind, parse, replay
from kemari_suite.tap.events import EpochSource, EventSink, IOEvent, TapMode
from kemari_suite.tap.nbd import BlockTap, NBDServer
from kemari_suite.tap.net import FrameProxy
from kemari_suite.tap.policy import (
    AdaptivePolicy,
    KemariPolicy,
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
    "EpochSource",
    "EventSink",
    "FrameProxy",
    "IOEvent",
    "IOLogRecord",
    "IOOp",
    "KemariPolicy",
    "NBDServer",
    "OpKind",
    "RemusPolicy",
    "SyncPolicy",
    "SyncScheduler",
    "TapDevice",
    "TapMode",
    "make_policy",
    "open_tap",
    "parse",
    "replay",
]
