"""Copies of guest-bound frames, from the primary to the standby.

The network tap hands over every batch of frames it delivered to the guest while
PROTECTED (:data:`~kemari_suite.tap.events.InboundSink`); :class:`FrameForwarder`
puts them on the replication link as :class:`~kemari_suite.protocol.wire.GuestFrames`
tagged with the open epoch. They are queued at once (``Link.send_nowait``), in the
order of every other frame on the link, so the standby receives each copy before the
``EpochEnd`` of any epoch that closed after the frame reached the guest. The standby
keeps them (``replica/replay.py``) and replays the ones its last committed checkpoint
may not contain into the guest it resumes.

Best effort by design: a copy that is not sent (the link is gone, or already holds
:data:`BACKLOG_LIMIT` bytes) is counted and costs, at a failover, only the TCP
retransmission it costs without replay. The copy never waits: the tap delivers the
frame to the guest first and is never slowed by the link.
"""

from __future__ import annotations

import logging
from typing import Any

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.link import Link

log = logging.getLogger(__name__)

#: Copies are skipped while the link holds this many unsent bytes (a large epoch).
BACKLOG_LIMIT = 64 << 20
#: Room for a GuestFrames' epoch and count inside its payload limit.
_OVERHEAD = 16


class FrameForwarder:
    """The primary's :data:`~kemari_suite.tap.events.InboundSink` for one link."""

    def __init__(self, link: Link, *, backlog_limit: int = BACKLOG_LIMIT) -> None:
        self.link = link
        self.backlog_limit = backlog_limit
        self.sent_frames = 0
        self.sent_bytes = 0
        self.messages = 0
        #: Copies not sent: the link was gone or too far behind.
        self.skipped_frames = 0

    def __call__(self, epoch: int, frames: list[bytes]) -> None:
        """Send ``frames`` (delivered to the guest while ``epoch`` was open) now."""
        for batch in batches(frames, wire.GuestFrames.MAX - _OVERHEAD):
            if self.link.closed or self.link.backlog > self.backlog_limit:
                self.skipped_frames += len(batch)
                continue
            try:
                self.link.send_nowait(wire.GuestFrames(epoch=epoch, frames=tuple(batch)))
            except (ConnectionError, ProtocolError) as err:
                self.skipped_frames += len(batch)
                log.debug("inbound copies not sent: %s", err)
                continue
            self.messages += 1
            self.sent_frames += len(batch)
            self.sent_bytes += sum(len(f) for f in batch)

    def status(self) -> dict[str, Any]:
        return {
            "sent_frames": self.sent_frames,
            "sent_bytes": self.sent_bytes,
            "messages": self.messages,
            "skipped_frames": self.skipped_frames,
        }


def batches(frames: list[bytes], limit: int) -> list[list[bytes]]:
    """``frames`` in order, cut into runs whose encoding (4 bytes of length each) fits
    ``limit`` bytes; a frame never straddles two runs."""
    out: list[list[bytes]] = []
    run: list[bytes] = []
    size = 0
    for frame in frames:
        need = 4 + len(frame)
        if run and size + need > limit:
            out.append(run)
            run, size = [], 0
        run.append(frame)
        size += need
    if run:
        out.append(run)
    return out


__all__ = ["BACKLOG_LIMIT", "FrameForwarder", "batches"]
