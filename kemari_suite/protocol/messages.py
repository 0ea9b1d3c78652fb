"""Every message of the replication protocol, declared as data. No I/O.

Each is a frozen dataclass with ``TYPE``, ``LAYOUT`` and ``MAX``; the codecs its
``LAYOUT`` names, and the rules for errors, are in :mod:`~kemari_suite.protocol.fields`.
Import them through :mod:`~kemari_suite.protocol.wire`, which re-exports every name.

Message types::

    0x01-0x02  handshake           Hello, HelloProof (sent by the session itself)
    0x10-0x17  epochs              EpochBegin, Pages, DeviceState, IOLog, EpochEnd,
                                   Ack, Nack, Resync
    0x20-0x22  liveness, events    Heartbeat, GuestEvent, Bye
    0x23       inbound frames      GuestFrames: copies of what the LAN sent the guest
    0x30-0x31  retired             never reused: a frame of either is a ProtocolError
    0x40-0x47  control verbs       CONTROL_MESSAGES, below

Control verbs, in the order a connection uses them (P = primary, S = secondary)::

    S -> P  DiskState          which disk copy S holds, first thing on a new link
    S -> P  RamState           the switchover checkpoint S holds in RAM, if any
    P -> S  VmProfile          P's VM; S compares it with its own
    S -> P  CompatVerdict      PROFILE stage: S can (or cannot) run this VM
    P -> S  DiskCopy           in the first FULL epoch: the disk follows as IOLog
    S -> P  CompatVerdict      RESTORE stage: S restored the first checkpoint (or not)
    P -> S  Durable            P's disk holds every write through an epoch
    P -> S  SwitchoverRequest  P stopped at a committed epoch and hands the VM over
    S -> P  Switched           the outcome of that request

An agent dispatches them by class, never by name::

    handlers = {wire.DiskCopy: self._on_disk_copy, wire.Durable: self._on_durable, ...}
    handler = handlers.get(type(msg))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from kemari_suite.protocol.fields import (
    MAX_PAYLOAD,
    MAX_SMALL_PAYLOAD,
    Blob,
    Layout,
    Message,
)

__all__ = [
    "CONTROL_MESSAGES",
    "MAX_GUEST_FRAME",
    "MAX_PAYLOAD",
    "MAX_SMALL_PAYLOAD",
    "MESSAGE_TYPES",
    "NO_EPOCH",
    "Ack",
    "Blob",
    "Bye",
    "CompatStage",
    "CompatVerdict",
    "DeviceState",
    "DeviceStateDelta",
    "DiskCopy",
    "DiskCopyMode",
    "DiskState",
    "Durable",
    "EpochBegin",
    "EpochEnd",
    "EpochKind",
    "GuestEvent",
    "GuestFrames",
    "Heartbeat",
    "Hello",
    "HelloProof",
    "IOLog",
    "Message",
    "Nack",
    "Pages",
    "RamState",
    "Resync",
    "Role",
    "SwitchOutcome",
    "Switched",
    "SwitchoverRequest",
    "VmProfile",
]


class Role(IntEnum):
    """What a node is on this connection."""

    PRIMARY = 1
    SECONDARY = 2
    WITNESS = 3
    CLIENT = 4


class EpochKind(IntEnum):
    """What an epoch carries: all of RAM, the pages dirtied since the last, or a pre-copy."""

    FULL = 1
    DELTA = 2
    PRECOPY = 3


class CompatStage(IntEnum):
    """Which check a :class:`CompatVerdict` reports."""

    PROFILE = 1  # the VM profiles compared, before a single page
    #: the trial restore: the first checkpoint restored in a throw-away QEMU on the secondary
    RESTORE = 2


class DiskCopyMode(IntEnum):
    """How the disk travels in a :class:`DiskCopy`."""

    FULL = 1  # every non-zero chunk, into a fresh file on the secondary
    INCREMENTAL = 2  # the chunks written since the secondary's copy, in place


class SwitchOutcome(IntEnum):
    """The answer to a :class:`SwitchoverRequest`."""

    REFUSED = 1  # the VM stays on the primary, which resumes it
    DONE = 2  # the VM runs on the secondary now
    UNKNOWN = 3  # no clear answer: the primary must not resume without a tiebreaker


# --- handshake, epochs, liveness -----------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """Opens the handshake; sent by the session itself.

    Layout: ``!H B B 32s`` version, role, initiator (0/1), nonce; then node_id as text.
    """

    TYPE: ClassVar[int] = 0x01
    LAYOUT: ClassVar[Layout] = (
        ("version", "u16"),
        ("role", Role),
        ("initiator", "bool"),
        ("nonce", "b32"),
        ("node_id", "text"),
    )
    MAX: ClassVar[int] = 4096
    version: int
    role: Role
    initiator: bool
    nonce: bytes
    node_id: str


@dataclass(frozen=True)
class HelloProof(Message):
    """Proves the sender holds the session key; sent by the session itself.

    Layout: ``32s`` HMAC(send key, "kemari-v1 proof" + sha256 of both Hello payloads).
    """

    TYPE: ClassVar[int] = 0x02
    LAYOUT: ClassVar[Layout] = (("mac", "b32"),)
    MAX: ClassVar[int] = 64
    mac: bytes


@dataclass(frozen=True)
class EpochBegin(Message):
    """Starts an epoch. Layout: ``!Q B Q I`` epoch, kind, ram_size, page_size."""

    TYPE: ClassVar[int] = 0x10
    LAYOUT: ClassVar[Layout] = (
        ("epoch", "u64"),
        ("kind", EpochKind),
        ("ram_size", "u64"),
        ("page_size", "u32"),
    )
    epoch: int
    kind: EpochKind
    ram_size: int
    page_size: int


@dataclass(frozen=True)
class Pages(Message):
    """One blob from ``codec.encode_pages``. Layout: ``!Q`` epoch, then the blob."""

    TYPE: ClassVar[int] = 0x11
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("encoded", "blob"))
    MAX: ClassVar[int] = MAX_PAYLOAD
    epoch: int
    encoded: Blob


@dataclass(frozen=True)
class DeviceState(Message):
    """QEMU's device state of the epoch. Layout: ``!Q`` epoch, then the bytes."""

    TYPE: ClassVar[int] = 0x12
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("data", "blob"))
    MAX: ClassVar[int] = MAX_PAYLOAD
    epoch: int
    data: Blob


@dataclass(frozen=True)
class DeviceStateDelta(Message):
    """The epoch's device state as a change to the previous epoch's, which the receiver
    committed just before: ``data`` is the zstd-compressed XOR of the two (same length,
    ``size``). Most of QEMU's device state (firmware and option ROMs, idle devices)
    does not change between sync points. Layout: ``!Q Q Q`` epoch, base_epoch, size,
    then the bytes."""

    TYPE: ClassVar[int] = 0x18
    LAYOUT: ClassVar[Layout] = (
        ("epoch", "u64"),
        ("base_epoch", "u64"),
        ("size", "u64"),
        ("data", "blob"),
    )
    MAX: ClassVar[int] = MAX_PAYLOAD
    epoch: int
    base_epoch: int
    size: int
    data: Blob


@dataclass(frozen=True)
class IOLog(Message):
    """The taps' I/O event log of the epoch (opaque here). Layout: ``!Q`` epoch, bytes."""

    TYPE: ClassVar[int] = 0x13
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("data", "blob"))
    MAX: ClassVar[int] = MAX_PAYLOAD
    epoch: int
    data: Blob


@dataclass(frozen=True)
class EpochEnd(Message):
    """Closes an epoch. Layout: ``!Q Q 32s`` epoch, n_pages, digest (``EpochDigest``)."""

    TYPE: ClassVar[int] = 0x14
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("n_pages", "u64"), ("digest", "b32"))
    epoch: int
    n_pages: int
    digest: bytes


@dataclass(frozen=True)
class Ack(Message):
    """The secondary holds the epoch. Layout: ``!Q`` epoch."""

    TYPE: ClassVar[int] = 0x15
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"),)
    epoch: int


@dataclass(frozen=True)
class Nack(Message):
    """The secondary rejected the epoch. Layout: ``!Q`` epoch, reason as text."""

    TYPE: ClassVar[int] = 0x16
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("reason", "text"))
    epoch: int
    reason: str


@dataclass(frozen=True)
class Resync(Message):
    """Ask for (or announce) a FULL epoch. Layout: reason as text."""

    TYPE: ClassVar[int] = 0x17
    LAYOUT: ClassVar[Layout] = (("reason", "text"),)
    reason: str


@dataclass(frozen=True)
class Heartbeat(Message):
    """Liveness. Layout: ``!Q Q`` seq, sent_ns; role_state as text."""

    TYPE: ClassVar[int] = 0x20
    LAYOUT: ClassVar[Layout] = (("seq", "u64"), ("sent_ns", "u64"), ("role_state", "text"))
    seq: int
    sent_ns: int
    role_state: str


@dataclass(frozen=True)
class GuestEvent(Message):
    """Something the guest did (shutdown, reset...). Layout: name, data as text."""

    TYPE: ClassVar[int] = 0x21
    LAYOUT: ClassVar[Layout] = (("name", "text"), ("data", "text"))
    name: str
    data: str


@dataclass(frozen=True)
class Bye(Message):
    """Orderly close; nothing may follow in that direction. Layout: reason as text."""

    TYPE: ClassVar[int] = 0x22
    LAYOUT: ClassVar[Layout] = (("reason", "text"),)
    reason: str


#: The longest Ethernet frame a :class:`GuestFrames` carries: QEMU's NET_BUFSIZE, the
#: longest frame its stream netdev passes (the tap's frame proxy reads no longer ones).
MAX_GUEST_FRAME = 4096 + 65536


@dataclass(frozen=True)
class GuestFrames(Message):
    """P -> S: copies of frames the primary's tap delivered to the guest (LAN -> guest)
    while ``epoch`` was its open epoch, oldest first.

    Not part of any epoch (no digest covers them, no ack answers them): the standby keeps
    the ones its last committed checkpoint may not contain and replays them into the
    guest it resumes (``replica/replay.py``; why that is safe: docs/sync-policy.md).
    They travel on the replication link, so they arrive in order with the epochs and
    are authenticated like everything else. Each frame is 1 to :data:`MAX_GUEST_FRAME`
    bytes; a batch that would exceed ``MAX`` is sent as several messages.

    Layout: ``!Q`` epoch; frames (``!I`` count, then ``!I`` length and bytes each).
    """

    TYPE: ClassVar[int] = 0x23
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("frames", "frames"))
    epoch: int
    frames: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frames", tuple(self.frames))
        for i, frame in enumerate(self.frames):
            if not 1 <= len(frame) <= MAX_GUEST_FRAME:
                raise ValueError(f"frame {i} is {len(frame)} bytes, not 1 to {MAX_GUEST_FRAME}")


# --- control verbs -------------------------------------------------------------------------


@dataclass(frozen=True)
class VmProfile(Message):
    """P -> S: the primary's VM (``compat.vm_profile``), before a single page.

    Layout: profile as json.
    """

    TYPE: ClassVar[int] = 0x40
    LAYOUT: ClassVar[Layout] = (("profile", "json"),)
    profile: dict[str, Any]


@dataclass(frozen=True)
class CompatVerdict(Message):
    """S -> P: whether the secondary can run the primary's VM, at one stage.

    ``ms`` is how long the trial restore took (0.0 when nothing was measured);
    ``details`` holds the rest (the profile's notes, the QEMU version...).

    Layout: ``!B B d`` stage, ok (0/1), ms; reason as text; details as json.
    """

    TYPE: ClassVar[int] = 0x41
    LAYOUT: ClassVar[Layout] = (
        ("stage", CompatStage),
        ("ok", "bool"),
        ("ms", "f64"),
        ("reason", "text"),
        ("details", "json"),
    )
    stage: CompatStage
    ok: bool
    ms: float = 0.0
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The verdict as plain JSON for events and status (``stage`` by name)."""
        return {
            **self.details,
            "stage": self.stage.name.lower(),
            "ok": self.ok,
            "ms": self.ms,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class DiskCopy(Message):
    """P -> S, inside a FULL epoch: the disk follows as IOLog writes of that epoch.

    ``lineage`` names the copy (new for every FULL copy); an INCREMENTAL copy continues
    the secondary's copy of the same lineage.

    Layout: ``!B`` mode; lineage as text; ``!Q`` epoch.
    """

    TYPE: ClassVar[int] = 0x42
    LAYOUT: ClassVar[Layout] = (("mode", DiskCopyMode), ("lineage", "text"), ("epoch", "u64"))
    mode: DiskCopyMode
    lineage: str
    epoch: int


#: :attr:`DiskState.epoch` of a disk that holds no usable copy.
NO_EPOCH = -1


@dataclass(frozen=True)
class DiskState(Message):
    """S -> P, first thing on a new link: which disk copy the secondary holds.

    ``epoch`` is the last epoch applied to copy ``lineage``, or :data:`NO_EPOCH` (and an
    empty lineage) when the disk is no usable copy.

    Layout: lineage as text; ``!q`` epoch (at least -1).
    """

    TYPE: ClassVar[int] = 0x43
    LAYOUT: ClassVar[Layout] = (("lineage", "text"), ("epoch", "i64"))
    lineage: str
    epoch: int

    def __post_init__(self) -> None:
        if self.epoch < NO_EPOCH:
            raise ValueError(f"epoch is {self.epoch}, below NO_EPOCH ({NO_EPOCH})")

    def as_dict(self) -> dict[str, Any]:
        """The state as plain JSON, as in the disk's ``.kemari.json`` sidecar."""
        return {"lineage": self.lineage, "epoch": self.epoch}


@dataclass(frozen=True)
class Durable(Message):
    """P -> S: the primary's disk holds every write through ``epoch``. Layout: ``!Q``."""

    TYPE: ClassVar[int] = 0x44
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"),)
    epoch: int


@dataclass(frozen=True)
class SwitchoverRequest(Message):
    """P -> S: the primary stopped its VM at committed ``epoch`` and hands it over.

    Layout: ``!Q`` epoch; lineage (of the disk copy) as text.
    """

    TYPE: ClassVar[int] = 0x45
    LAYOUT: ClassVar[Layout] = (("epoch", "u64"), ("lineage", "text"))
    epoch: int
    lineage: str


@dataclass(frozen=True)
class Switched(Message):
    """S -> P: the outcome of a :class:`SwitchoverRequest` for ``epoch``.

    ``resume_ms`` is how long the secondary took to resume (DONE only); ``reason`` says
    why it refused.

    Layout: ``!B Q d`` outcome, epoch, resume_ms; reason as text.
    """

    TYPE: ClassVar[int] = 0x46
    LAYOUT: ClassVar[Layout] = (
        ("outcome", SwitchOutcome),
        ("epoch", "u64"),
        ("resume_ms", "f64"),
        ("reason", "text"),
    )
    outcome: SwitchOutcome
    epoch: int
    resume_ms: float = 0.0
    reason: str = ""

    def as_reply(self) -> dict[str, Any]:
        """Plain JSON for events: ``ok`` is True (DONE), False (REFUSED) or None."""
        ok = {SwitchOutcome.DONE: True, SwitchOutcome.REFUSED: False}.get(self.outcome)
        return {"ok": ok, "epoch": self.epoch, "resume_ms": self.resume_ms, "reason": self.reason}


@dataclass(frozen=True)
class RamState(Message):
    """S -> P, right after :class:`DiskState`: the switchover checkpoint S holds in RAM.

    A host that handed its VM over in a planned switchover keeps its stopped guest's RAM
    as its replica: checkpoint ``epoch`` of the switchover whose disk copy is
    ``lineage``, with ``digest`` (:func:`~kemari_suite.vm.guestram.ram_digest`) of its
    bytes. The new primary, which resumed that very checkpoint, may then send only what
    its guest changed since (a DELTA first epoch) when all three match its own. ``epoch``
    is :data:`NO_EPOCH` (and the digest empty) when S holds no such checkpoint.

    Layout: ``!q`` epoch; lineage as text; digest as a blob (32 bytes, or empty).
    """

    TYPE: ClassVar[int] = 0x47
    LAYOUT: ClassVar[Layout] = (("epoch", "i64"), ("lineage", "text"), ("digest", "blob"))
    MAX: ClassVar[int] = 4096
    epoch: int
    lineage: str = ""
    digest: Blob = b""

    def __post_init__(self) -> None:
        if self.epoch < NO_EPOCH:
            raise ValueError(f"epoch is {self.epoch}, below NO_EPOCH ({NO_EPOCH})")
        if len(self.digest) not in (0, 32):
            raise ValueError(f"digest is {len(self.digest)} bytes, not 32 (or empty)")


#: The typed control verbs, for dispatch tables ``{cls: handler}``.
CONTROL_MESSAGES: tuple[type[Message], ...] = (
    VmProfile,
    CompatVerdict,
    DiskCopy,
    DiskState,
    Durable,
    SwitchoverRequest,
    Switched,
    RamState,
)

_ALL: tuple[type[Message], ...] = (
    Hello,
    HelloProof,
    EpochBegin,
    Pages,
    DeviceState,
    DeviceStateDelta,
    IOLog,
    EpochEnd,
    Ack,
    Nack,
    Resync,
    Heartbeat,
    GuestEvent,
    Bye,
    GuestFrames,
    *CONTROL_MESSAGES,
)
MESSAGE_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in _ALL}
