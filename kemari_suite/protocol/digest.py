"""The digest of one epoch's content, computed alike on both ends. No I/O.

The primary puts it in :class:`~kemari_suite.protocol.messages.EpochEnd`; the secondary
checks it before it commits the epoch, so a lost, reordered or altered part of an epoch
is found even though every frame's own MAC was right.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from kemari_suite.errors import ProtocolError
from kemari_suite.protocol.messages import DeviceState, DeviceStateDelta, EpochEnd, IOLog, Pages

_LABEL = b"kemari-v1 epoch"


class EpochDigest:
    """SHA-256 over one epoch's content, fed identically on both sides.

    The primary feeds every Pages, DeviceState and IOLog message of the epoch in the
    order it sends them and puts :meth:`digest` in the EpochEnd; the secondary feeds
    what it receives, in order, and calls :meth:`verify`. SHA-256 runs at about
    1.7 GB/s with the CPU's SHA extensions; compressed page blobs are small.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.n_parts = 0
        self._h = hashlib.sha256(_LABEL + epoch.to_bytes(8, "big"))

    def update(self, msg: Pages | DeviceState | DeviceStateDelta | IOLog) -> None:
        """Add one message's content.

        Raises:
            ProtocolError: the message belongs to another epoch.
        """
        if msg.epoch != self.epoch:
            raise ProtocolError(
                f"{type(msg).__name__} of epoch {msg.epoch} inside epoch {self.epoch}", msg.TYPE
            )
        data = memoryview(msg.encoded if isinstance(msg, Pages) else msg.data).cast("B")
        self._h.update(struct.pack("!BQ", msg.TYPE, data.nbytes))
        self._h.update(data)
        self.n_parts += 1

    def digest(self) -> bytes:
        return self._h.digest()

    def verify(self, end: EpochEnd) -> None:
        """Check an EpochEnd against what was fed.

        Raises:
            ProtocolError: another epoch, or the digest differs.
        """
        if end.epoch != self.epoch:
            raise ProtocolError(f"EpochEnd of epoch {end.epoch} inside epoch {self.epoch}")
        if not hmac.compare_digest(end.digest, self.digest()):
            raise ProtocolError(
                f"epoch {self.epoch}: digest mismatch over {self.n_parts} parts", EpochEnd.TYPE
            )
