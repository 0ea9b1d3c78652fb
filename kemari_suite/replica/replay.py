"""The standby's copies of guest-bound frames, replayed into the guest it resumes.

The primary sends a copy of every frame its tap delivers to the guest
(:class:`~kemari_suite.protocol.wire.GuestFrames`, tagged with the primary's open epoch
at delivery; ``checkpoint/forward.py``). :class:`ReplayBuffer` keeps the ones the last
committed checkpoint may not contain. At a failover (and at the new primary's resume in
a planned switchover) they go into the resumed guest's NIC right after ``cont``: the
requests a client sent during the epoch that never committed reach the guest again at
once, instead of after the client's next retransmission timeout.

Which frames a checkpoint contains. A frame tagged ``e`` reached QEMU while epoch ``e``
was open: before the stop that closes ``e``, or inside that stopped window before the
epoch switched (QEMU queues it and the guest gets it after the ``cont``). So checkpoint
``e`` may lack it, and checkpoint ``e + 1`` has it (once QEMU drains its queue after
``cont``, which it does at once). Committing epoch ``e`` therefore discards the frames
tagged *below* ``e``, and a resume of checkpoint ``c`` replays those tagged ``c`` and
later: some the guest already had (a duplicate, which TCP and UDP tolerate), none it
lacks, unless the bound dropped it, it never reached the standby, or QEMU still held it
a whole epoch later (the guest's receive ring full): each costs the retransmission it
costs without replay. docs/sync-policy.md has the argument.

Pure: no I/O, no clock. Tags never go back on one link: a copy tagged below the last
one is a :class:`~kemari_suite.errors.ProtocolError` (the primary is out of step). A new
link starts empty (:meth:`ReplayBuffer.clear`): its first checkpoint will contain
everything the old one delivered.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol import wire

#: The bound: the standby keeps at most this many bytes of frames... (config knob to be:
#: ``tap.replay_limit_mib``)
REPLAY_LIMIT_BYTES = 8 << 20
#: ...and this many frames; beyond either, the oldest are dropped (and counted).
REPLAY_LIMIT_FRAMES = 8192


@dataclass
class ReplayStats:
    """Counters; ``kept_*`` are current values, the rest only grow."""

    received_frames: int = 0
    received_bytes: int = 0
    kept_frames: int = 0
    kept_bytes: int = 0
    #: Discarded because a committed checkpoint contains them.
    committed_frames: int = 0
    #: Arrived already contained in the committed checkpoint (tag below the floor).
    stale_frames: int = 0
    #: Dropped, oldest first, to stay within the bound.
    overflow_frames: int = 0
    overflow_bytes: int = 0
    #: Discarded by a new link.
    cleared_frames: int = 0
    #: Handed out for replay (:meth:`ReplayBuffer.take` and, after it, :attr:`sink`).
    taken_frames: int = 0


class ReplayBuffer:
    """Frames delivered to the primary's guest that the last committed checkpoint may not
    contain, oldest first, bounded; see the module docstring."""

    def __init__(
        self, *, limit_bytes: int = REPLAY_LIMIT_BYTES, limit_frames: int = REPLAY_LIMIT_FRAMES
    ) -> None:
        if limit_bytes < 1 or limit_frames < 1:
            raise ValueError("the replay bound must allow at least one frame and one byte")
        self.limit_bytes = limit_bytes
        self.limit_frames = limit_frames
        self.stats = ReplayStats()
        #: Frames tagged below it are in the committed checkpoint.
        self.floor = -1
        #: The last tag received on this link (tags never go back).
        self.last_epoch = -1
        #: Once the guest runs here (:meth:`take`), frames still arriving go straight to it.
        self.sink: Callable[[list[bytes]], int] | None = None
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()

    def add(self, epoch: int, frames: Iterable[bytes]) -> None:
        """Keep ``frames``, delivered to the primary's guest while ``epoch`` was open.

        Raises:
            ProtocolError: ``epoch`` is below the last tag received on this link.
        """
        if epoch < self.last_epoch:
            raise ProtocolError(
                f"GuestFrames for epoch {epoch} after epoch {self.last_epoch}: "
                "the primary's epochs never go back"
            )
        self.last_epoch = epoch
        batch = list(frames)
        st = self.stats
        st.received_frames += len(batch)
        st.received_bytes += sum(len(f) for f in batch)
        if self.sink is not None:
            st.taken_frames += len(batch)
            self.sink(batch)
            return
        if epoch < self.floor:
            st.stale_frames += len(batch)
            return
        for frame in batch:
            self._frames.append((epoch, frame))
            st.kept_frames += 1
            st.kept_bytes += len(frame)
        while st.kept_frames > self.limit_frames or st.kept_bytes > self.limit_bytes:
            _, old = self._frames.popleft()
            st.kept_frames -= 1
            st.kept_bytes -= len(old)
            st.overflow_frames += 1
            st.overflow_bytes += len(old)

    async def on_message(self, link: object, msg: wire.GuestFrames) -> None:
        """The secondary's dispatch-table entry for :class:`~wire.GuestFrames`.

        Raises:
            ProtocolError: as :meth:`add`.
        """
        self.add(msg.epoch, msg.frames)

    def committed(self, epoch: int) -> int:
        """Checkpoint ``epoch`` committed: discard the frames it contains (tagged below
        ``epoch``). Returns how many."""
        self.floor = max(self.floor, epoch)
        n = 0
        while self._frames and self._frames[0][0] < self.floor:
            self._drop_oldest()
            n += 1
        self.stats.committed_frames += n
        return n

    def take(self, epoch: int) -> list[bytes]:
        """The frames to replay into a guest resumed at checkpoint ``epoch`` (tagged
        ``epoch`` or later), oldest first; the buffer is empty afterwards."""
        self.committed(epoch)
        out = [frame for _, frame in self._frames]
        self._frames.clear()
        self.stats.kept_frames = self.stats.kept_bytes = 0
        self.stats.taken_frames += len(out)
        return out

    def clear(self) -> int:
        """A new link: forget every frame (its first checkpoint contains them). Returns
        how many were dropped."""
        n = len(self._frames)
        self._frames.clear()
        self.stats.kept_frames = self.stats.kept_bytes = 0
        self.stats.cleared_frames += n
        self.floor = self.last_epoch = -1
        return n

    def epochs(self) -> list[int]:
        """The tags kept, oldest first, each once."""
        out: list[int] = []
        for epoch, _ in self._frames:
            if not out or out[-1] != epoch:
                out.append(epoch)
        return out

    def _drop_oldest(self) -> None:
        _, frame = self._frames.popleft()
        self.stats.kept_frames -= 1
        self.stats.kept_bytes -= len(frame)

    def status(self) -> dict[str, Any]:
        return {"floor": self.floor, "epochs": self.epochs(), **asdict(self.stats)}


__all__ = ["REPLAY_LIMIT_BYTES", "REPLAY_LIMIT_FRAMES", "ReplayBuffer", "ReplayStats"]
