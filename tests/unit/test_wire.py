"""The replication wire protocol, driven through in-memory session pairs."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kemari_suite.errors import AuthError, ConfigError, ProtocolError
from kemari_suite.protocol import wire
from kemari_suite.protocol.wire import (
    CONTROL_MESSAGES,
    HEADER_SIZE,
    MAC_SIZE,
    MAX_PAYLOAD,
    MESSAGE_TYPES,
    NO_EPOCH,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    CompatStage,
    CompatVerdict,
    DeviceState,
    DeviceStateDelta,
    DiskCopy,
    DiskCopyMode,
    DiskState,
    Durable,
    EpochBegin,
    EpochDigest,
    EpochEnd,
    EpochKind,
    GuestEvent,
    GuestFrames,
    Heartbeat,
    Hello,
    HelloProof,
    IOLog,
    Message,
    Nack,
    Pages,
    RamState,
    Resync,
    Role,
    Session,
    SessionState,
    Switched,
    SwitchOutcome,
    SwitchoverRequest,
    VmProfile,
)

PSK = "correct horse battery staple"

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_pair(psk_primary: str = PSK, psk_secondary: str = PSK) -> tuple[Session, Session]:
    primary = Session(psk_primary, role=Role.PRIMARY, node_id="host-a", initiator=True)
    secondary = Session(psk_secondary, role=Role.SECONDARY, node_id="host-b", initiator=False)
    return primary, secondary


def handshake(primary: Session, secondary: Session) -> None:
    """Pass bytes back and forth until both sides have nothing more to say."""
    primary.start()
    for _ in range(4):
        assert secondary.feed(primary.data_to_send()) == []
        assert primary.feed(secondary.data_to_send()) == []


def established_pair() -> tuple[Session, Session]:
    primary, secondary = make_pair()
    handshake(primary, secondary)
    assert primary.state is SessionState.ESTABLISHED
    assert secondary.state is SessionState.ESTABLISHED
    return primary, secondary


def hello_key(psk: str = PSK) -> bytes:
    # Derived here from the documented protocol, not from the module's helpers.
    return hmac.digest(psk.encode(), b"kemari-v1 hello", "sha256")


def raw_frame(
    frame_type: int,
    payload: bytes,
    seq: int,
    key: bytes,
    *,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    n = len(payload) if length is None else length
    head = struct.pack("!4sBBHIQ", b"KMRI", version, frame_type, flags, n, seq)
    header = head + struct.pack("!I", zlib.crc32(head))
    return header + payload + hmac.digest(key, header + payload, "sha256")


def hello_payload(version: int, role: Role, initiator: bool, nonce: bytes, node: str) -> bytes:
    raw = node.encode()
    return struct.pack("!HBB32sI", version, role, initiator, nonce, len(raw)) + raw


SAMPLES: list[Message] = [
    EpochBegin(epoch=7, kind=EpochKind.DELTA, ram_size=128 << 20, page_size=4096),
    Pages(epoch=7, encoded=b"KMPG" + bytes(range(256)) * 3),
    DeviceState(epoch=7, data=os.urandom(5000)),
    DeviceStateDelta(epoch=8, base_epoch=7, size=5000, data=os.urandom(300)),
    IOLog(epoch=7, data=b""),
    EpochEnd(epoch=7, n_pages=4100, digest=hashlib.sha256(b"x").digest()),
    Ack(epoch=7),
    Nack(epoch=8, reason="digest mismatch: ü"),
    Resync(reason="secondary restarted"),
    Heartbeat(seq=2**64 - 1, sent_ns=123456789, role_state="secondary/replicating"),
    GuestEvent(name="SHUTDOWN", data='{"guest": true}'),
    GuestFrames(epoch=7, frames=(b"\xff" * 60, bytes(range(256)) * 5)),
    GuestFrames(epoch=8, frames=()),
    VmProfile(profile={"machine": "pc-q35-8.2", "ram_mb": 2048, "cpu": {"model": "host"}}),
    CompatVerdict(stage=CompatStage.PROFILE, ok=True, details={"notes": ["cpu flags differ"]}),
    CompatVerdict(stage=CompatStage.RESTORE, ok=False, ms=812.5, reason="QEMU said: ü"),
    DiskCopy(mode=DiskCopyMode.INCREMENTAL, lineage="3f2a9c1d00b4e7a1", epoch=12),
    DiskState(lineage="", epoch=NO_EPOCH),
    DiskState(lineage="3f2a9c1d00b4e7a1", epoch=2**63 - 1),
    Durable(epoch=11),
    SwitchoverRequest(epoch=12, lineage="3f2a9c1d00b4e7a1"),
    Switched(outcome=SwitchOutcome.DONE, epoch=12, resume_ms=41.25),
    Switched(outcome=SwitchOutcome.REFUSED, epoch=12, reason="this host is waiting"),
    RamState(epoch=NO_EPOCH),
    RamState(epoch=12, lineage="3f2a9c1d00b4e7a1", digest=hashlib.sha256(b"ram").digest()),
    Bye(reason="operator asked"),
]


# --- handshake -------------------------------------------------------------------------------


def test_handshake_goes_through_the_states_and_names_the_peers() -> None:
    primary, secondary = make_pair()
    assert primary.state is SessionState.NEW
    primary.start()
    assert primary.state is SessionState.HANDSHAKE
    hello = primary.data_to_send()
    assert secondary.state is SessionState.NEW
    assert secondary.feed(hello) == []
    # The responder answered with its own Hello and its proof, but has no proof yet.
    assert secondary.state is SessionState.HANDSHAKE
    assert primary.feed(secondary.data_to_send()) == []
    assert primary.state is SessionState.ESTABLISHED
    assert secondary.feed(primary.data_to_send()) == []
    assert secondary.state is SessionState.ESTABLISHED
    assert primary.peer == wire.PeerInfo(Role.SECONDARY, "host-b", PROTOCOL_VERSION)
    assert secondary.peer == wire.PeerInfo(Role.PRIMARY, "host-a", PROTOCOL_VERSION)
    assert primary.data_to_send() == secondary.data_to_send() == b""


def test_both_sides_may_start_at_once() -> None:
    primary, secondary = make_pair()
    primary.start()
    secondary.start()
    a, b = primary.data_to_send(), secondary.data_to_send()
    secondary.feed(a)
    primary.feed(b)
    secondary.feed(primary.data_to_send())
    primary.feed(secondary.data_to_send())
    assert primary.established and secondary.established


def test_session_keys_follow_the_documented_derivation() -> None:
    primary, secondary = make_pair()
    handshake(primary, secondary)
    session_key = hmac.digest(
        PSK.encode(), b"kemari-v1" + primary.nonce + secondary.nonce, "sha256"
    )
    i2r = hmac.digest(session_key, b"i2r", "sha256")
    frame = primary.encode(Ack(epoch=1))
    header, payload, mac = frame[:HEADER_SIZE], frame[HEADER_SIZE:-MAC_SIZE], frame[-MAC_SIZE:]
    assert mac == hmac.digest(i2r, header + payload, "sha256")
    assert struct.unpack("!Q", header[12:20])[0] == 2  # Hello 0, HelloProof 1
    r2i = hmac.digest(session_key, b"r2i", "sha256")
    frame = secondary.encode(Ack(epoch=1))
    header, payload, mac = frame[:HEADER_SIZE], frame[HEADER_SIZE:-MAC_SIZE], frame[-MAC_SIZE:]
    assert mac == hmac.digest(r2i, header + payload, "sha256")


def test_frame_reflected_to_its_sender_is_rejected() -> None:
    primary, _ = established_pair()
    frame = primary.encode(Ack(epoch=1))  # sequence 2, as the primary now expects
    with pytest.raises(AuthError, match="MAC"):
        primary.feed(frame)


def test_wrong_key_fails_the_handshake_on_both_sides() -> None:
    primary, secondary = make_pair(PSK, "another key")
    primary.start()
    with pytest.raises(AuthError, match="MAC"):
        secondary.feed(primary.data_to_send())
    assert secondary.state is SessionState.FAILED
    secondary2 = Session("another key", role=Role.SECONDARY, node_id="b", initiator=False)
    secondary2.start()
    with pytest.raises(AuthError):
        primary.feed(secondary2.data_to_send())
    assert not primary.established


def test_empty_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        Session("", role=Role.PRIMARY, node_id="a", initiator=True)


def test_recorded_session_cannot_be_replayed() -> None:
    primary, secondary = make_pair()
    primary.start()
    hello = primary.data_to_send()
    secondary.feed(hello)
    primary.feed(secondary.data_to_send())
    rest = primary.data_to_send() + primary.encode(Ack(epoch=1))
    assert secondary.feed(rest) == [Ack(epoch=1)]
    recorded = hello + rest
    # A fresh responder (fresh nonce) fed the whole recording: the proof, made for the
    # old nonce, does not verify.
    fresh = Session(PSK, role=Role.SECONDARY, node_id="host-b", initiator=False)
    with pytest.raises(AuthError):
        fresh.feed(recorded)
    assert fresh.state is SessionState.FAILED


def test_reflected_hello_is_rejected() -> None:
    primary, _ = make_pair()
    primary.start()
    own = primary.data_to_send()
    with pytest.raises(ProtocolError, match="initiator"):
        primary.feed(own)
    # A forged Hello carrying the victim's nonce with the right role flag.
    victim = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    victim.start()
    payload = hello_payload(PROTOCOL_VERSION, Role.PRIMARY, True, victim.nonce, "x")
    with pytest.raises(AuthError, match="own nonce"):
        victim.feed(raw_frame(Hello.TYPE, payload, 0, hello_key()))


def test_both_responders_are_rejected() -> None:
    a = Session(PSK, role=Role.PRIMARY, node_id="a", initiator=False)
    b = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    a.start()
    with pytest.raises(ProtocolError, match="responder"):
        b.feed(a.data_to_send())


def test_unaccepted_role_is_rejected() -> None:
    client = Session(PSK, role=Role.CLIENT, node_id="c", initiator=True)
    secondary = Session(
        PSK,
        role=Role.SECONDARY,
        node_id="b",
        initiator=False,
        accept_roles={Role.PRIMARY},
    )
    client.start()
    with pytest.raises(ProtocolError, match="client"):
        secondary.feed(client.data_to_send())


def test_version_mismatch_in_hello_names_both_versions() -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    payload = hello_payload(PROTOCOL_VERSION + 1, Role.PRIMARY, True, os.urandom(32), "new")
    with pytest.raises(ProtocolError) as info:
        secondary.feed(raw_frame(Hello.TYPE, payload, 0, hello_key()))
    assert f"version {PROTOCOL_VERSION + 1}" in str(info.value)
    assert f"version {PROTOCOL_VERSION}" in str(info.value)
    assert not isinstance(info.value, AuthError)


def test_version_mismatch_in_frame_header_names_both_versions() -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    payload = hello_payload(9, Role.PRIMARY, True, os.urandom(32), "new")
    with pytest.raises(ProtocolError) as info:
        secondary.feed(raw_frame(Hello.TYPE, payload, 0, hello_key(), version=9))
    assert "version 9" in str(info.value)
    assert f"version {PROTOCOL_VERSION}" in str(info.value)


def test_application_frame_before_handshake_is_rejected() -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    frame = raw_frame(Ack.TYPE, struct.pack("!Q", 1), 0, hello_key())
    with pytest.raises(AuthError, match="handshake"):
        secondary.feed(frame)


def test_send_before_established_is_refused() -> None:
    primary, _ = make_pair()
    with pytest.raises(ProtocolError, match="new"):
        primary.encode(Ack(epoch=1))
    primary.start()
    with pytest.raises(ProtocolError, match="handshake"):
        primary.encode(Ack(epoch=1))
    p2, _ = established_pair()
    with pytest.raises(ValueError, match="handshake messages"):
        p2.encode(HelloProof(mac=bytes(32)))


# --- messages --------------------------------------------------------------------------------


def test_every_message_type_round_trips_both_ways() -> None:
    covered = {type(m) for m in SAMPLES}
    assert covered | {Hello, HelloProof} == set(MESSAGE_TYPES.values())
    primary, secondary = established_pair()
    for msg in SAMPLES:
        if isinstance(msg, Bye):
            continue
        assert secondary.feed(primary.encode(msg)) == [msg]
        assert primary.feed(secondary.encode(msg)) == [msg]
    # Decoded blobs are read-only views; they compare equal to the bytes sent.
    sent = Pages(epoch=1, encoded=b"blob")
    [got] = secondary.feed(primary.encode(sent))
    assert isinstance(got, Pages) and isinstance(got.encoded, memoryview)
    assert got.encoded.readonly
    assert wire.message_fields(got) == {"epoch": 1, "encoded": b"blob"}


def test_byte_by_byte_feeding_gives_the_same_messages() -> None:
    primary, secondary = make_pair()
    primary.start()
    stream = primary.data_to_send()
    got: list[Message] = []
    for i in range(len(stream)):
        got += secondary.feed(stream[i : i + 1])
    primary.feed(secondary.data_to_send())
    stream = primary.data_to_send()
    body = [m for m in SAMPLES if not isinstance(m, Bye)]
    stream += b"".join(primary.encode(m) for m in body)
    for i in range(len(stream)):
        got += secondary.feed(stream[i : i + 1])
    assert secondary.established
    assert got == body


@given(st.data())
@FUZZ
def test_arbitrary_fragmentation_gives_the_same_messages(data: st.DataObject) -> None:
    primary, secondary = established_pair()
    body = [m for m in SAMPLES if not isinstance(m, Bye)]
    stream = b"".join(primary.encode(m) for m in body)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30), label="cuts"))
    got: list[Message] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += secondary.feed(stream[prev:cut])
        prev = cut
    assert got == body
    assert secondary.decoder.at_boundary


def test_buffered_protocol_path_reads_into_the_frame_buffer() -> None:
    primary, secondary = established_pair()
    blob = os.urandom(300_000)
    stream = primary.encode(Pages(epoch=3, encoded=blob)) + primary.encode(Ack(epoch=3))
    got: list[Message] = []
    pos = 0
    while pos < len(stream):
        buf = secondary.decoder.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), len(stream) - pos, 70_000)
        buf[:n] = stream[pos : pos + n]
        pos += n
        got += secondary.decoder.buffer_updated(n)
    assert got == [Pages(epoch=3, encoded=blob), Ack(epoch=3)]


def test_encode_parts_does_not_copy_the_blob() -> None:
    primary, secondary = established_pair()
    blob = bytearray(os.urandom(1 << 20))
    parts = primary.encode_parts(Pages(epoch=1, encoded=blob))
    assert len(parts) == 3
    assert isinstance(parts[1], memoryview) and parts[1].obj is blob
    assert secondary.feed(b"".join(parts)) == [Pages(epoch=1, encoded=bytes(blob))]


def message_strategy() -> st.SearchStrategy[Message]:
    u64 = st.integers(0, 2**64 - 1)
    text = st.text(max_size=50)
    blob = st.binary(max_size=2000)
    return st.one_of(
        st.builds(EpochBegin, u64, st.sampled_from(EpochKind), u64, st.integers(0, 2**32 - 1)),
        st.builds(Pages, u64, blob),
        st.builds(DeviceState, u64, blob),
        st.builds(DeviceStateDelta, u64, u64, u64, blob),
        st.builds(IOLog, u64, blob),
        st.builds(EpochEnd, u64, u64, st.binary(min_size=32, max_size=32)),
        st.builds(Ack, u64),
        st.builds(Nack, u64, text),
        st.builds(Resync, text),
        st.builds(Heartbeat, u64, u64, text),
        st.builds(GuestEvent, text, text),
        st.builds(GuestFrames, u64, st.lists(st.binary(min_size=1, max_size=200), max_size=5)),
        *control_strategies(),
    )


def json_objects() -> st.SearchStrategy[dict[str, object]]:
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    value = st.recursive(
        leaf,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids),
        max_leaves=12,
    )
    return st.dictionaries(st.text(max_size=12), value, max_size=6)


def control_strategies() -> list[st.SearchStrategy[Message]]:
    u64 = st.integers(0, 2**64 - 1)
    text = st.text(max_size=50)
    f64 = st.floats(allow_nan=False, allow_infinity=False)
    return [
        st.builds(VmProfile, json_objects()),
        st.builds(
            CompatVerdict, st.sampled_from(CompatStage), st.booleans(), f64, text, json_objects()
        ),
        st.builds(DiskCopy, st.sampled_from(DiskCopyMode), text, u64),
        st.builds(DiskState, text, st.integers(NO_EPOCH, 2**63 - 1)),
        st.builds(Durable, u64),
        st.builds(SwitchoverRequest, u64, text),
        st.builds(Switched, st.sampled_from(SwitchOutcome), u64, f64, text),
    ]


@given(st.lists(message_strategy(), max_size=8))
@FUZZ
def test_random_messages_round_trip(msgs: list[Message]) -> None:
    primary, secondary = established_pair()
    assert secondary.feed(b"".join(primary.encode(m) for m in msgs)) == msgs


def test_out_of_range_field_is_a_local_value_error() -> None:
    primary, _ = established_pair()
    with pytest.raises(ValueError, match="Ack"):
        primary.encode(Ack(epoch=-1))
    with pytest.raises(ValueError, match="32 bytes"):
        primary.encode(EpochEnd(epoch=1, n_pages=1, digest=b"short"))


# --- sequence, replay, lifecycle -------------------------------------------------------------


def test_replayed_frame_is_rejected_and_the_session_fails() -> None:
    primary, secondary = established_pair()
    frame = primary.encode(Ack(epoch=1))
    assert secondary.feed(frame) == [Ack(epoch=1)]
    with pytest.raises(AuthError, match="sequence"):
        secondary.feed(frame)
    assert secondary.state is SessionState.FAILED
    # Sticky: even a correct next frame is refused now.
    with pytest.raises(ProtocolError, match="failed earlier"):
        secondary.feed(primary.encode(Ack(epoch=2)))


def test_reordered_and_lost_frames_are_rejected() -> None:
    primary, secondary = established_pair()
    first = primary.encode(Ack(epoch=1))
    second = primary.encode(Ack(epoch=2))
    with pytest.raises(AuthError, match="expected sequence number 2, got 3"):
        secondary.feed(second)
    primary, secondary = established_pair()
    primary.encode(Ack(epoch=1))  # lost
    with pytest.raises(AuthError, match="sequence"):
        secondary.feed(primary.encode(Ack(epoch=2)))
    del first


def test_frame_from_another_session_with_the_same_key_is_rejected() -> None:
    p1, _ = established_pair()
    _, s2 = established_pair()
    with pytest.raises(AuthError, match="MAC"):
        s2.feed(p1.encode(Ack(epoch=1)))


def test_bye_closes_the_session() -> None:
    primary, secondary = established_pair()
    assert secondary.feed(primary.encode(Bye(reason="done"))) == [Bye(reason="done")]
    assert primary.state is SessionState.CLOSED
    assert secondary.state is SessionState.CLOSED
    with pytest.raises(ProtocolError, match="closed"):
        primary.encode(Ack(epoch=1))
    # Anything the peer sends after its Bye is a protocol error.
    forged = raw_frame(Ack.TYPE, struct.pack("!Q", 1), 3, b"k" * 32)
    with pytest.raises(ProtocolError, match="after Bye"):
        secondary.feed(forged)


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    primary, secondary = established_pair()
    frame = primary.encode(Ack(epoch=1))
    secondary.decoder.eof()  # at a boundary: fine
    secondary.feed(frame[:-1])
    with pytest.raises(ProtocolError, match="truncated"):
        secondary.decoder.eof()


# --- framing errors --------------------------------------------------------------------------


def test_unknown_message_type_is_named() -> None:
    _, secondary = established_pair()
    with pytest.raises(ProtocolError, match="0x7f") as info:
        secondary.feed(raw_frame(0x7F, b"", 2, b"k" * 32))
    assert info.value.frame_type == 0x7F


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    _, secondary = established_pair()
    header = raw_frame(Pages.TYPE, b"", 2, b"k" * 32, length=MAX_PAYLOAD + 1)[:HEADER_SIZE]
    with pytest.raises(ProtocolError, match="exceeds"):
        secondary.feed(header)  # no payload bytes were ever needed
    _, secondary = established_pair()
    header = raw_frame(Ack.TYPE, b"", 2, b"k" * 32, length=2 << 20)[:HEADER_SIZE]
    with pytest.raises(ProtocolError, match="exceeds"):
        secondary.feed(header)


def test_sender_refuses_oversized_payloads() -> None:
    primary, _ = established_pair()
    with pytest.raises(ValueError, match="exceeds"):
        primary.encode(Nack(epoch=1, reason="x" * (2 << 20)))


def test_garbage_is_caught_by_magic_or_checksum() -> None:
    _, secondary = established_pair()
    with pytest.raises(ProtocolError, match="magic"):
        secondary.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    primary, secondary = established_pair()
    frame = bytearray(primary.encode(Ack(epoch=1)))
    frame[9] ^= 0x01  # inside the length field
    with pytest.raises(ProtocolError, match="checksum"):
        secondary.feed(bytes(frame))


def test_unknown_flags_are_rejected() -> None:
    _, secondary = established_pair()
    with pytest.raises(ProtocolError, match="flags"):
        secondary.feed(raw_frame(Ack.TYPE, struct.pack("!Q", 1), 2, b"k" * 32, flags=4))


def recv_key(secondary: Session, primary: Session) -> bytes:
    """The primary-to-secondary key, derived from the documented protocol."""
    session_key = hmac.digest(
        PSK.encode(), b"kemari-v1" + primary.nonce + secondary.nonce, "sha256"
    )
    return hmac.digest(session_key, b"i2r", "sha256")


def test_proof_with_a_valid_frame_mac_but_a_wrong_transcript_is_rejected() -> None:
    primary, secondary = make_pair()
    primary.start()
    secondary.feed(primary.data_to_send())
    key = recv_key(secondary, primary)
    with pytest.raises(AuthError, match="proof mismatch"):
        secondary.feed(raw_frame(HelloProof.TYPE, bytes(32), 1, key))
    assert not secondary.established


def text(value: bytes) -> bytes:
    return struct.pack("!I", len(value)) + value


@pytest.mark.parametrize(
    ("frame_type", "payload", "match"),
    [
        (Nack.TYPE, struct.pack("!Q", 1) + text(b"\xff\xfe"), "not UTF-8"),
        (Nack.TYPE, struct.pack("!Q", 1) + struct.pack("!I", 100) + b"short", "needs"),
        (Ack.TYPE, struct.pack("!Q", 1) + b"x", "1 trailing bytes"),
        (Ack.TYPE, b"\x00" * 7, "needs 8 bytes"),
        (EpochBegin.TYPE, struct.pack("!QBQI", 1, 9, 4096, 4096), "epoch kind 9"),
        (EpochEnd.TYPE, struct.pack("!QQ", 1, 1) + bytes(31), "needs"),
    ],
)
def test_malformed_payloads_under_a_valid_mac(frame_type: int, payload: bytes, match: str) -> None:
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    with pytest.raises(ProtocolError, match=match) as info:
        secondary.feed(raw_frame(frame_type, payload, 2, key))
    assert info.value.frame_type == frame_type
    assert not isinstance(info.value, AuthError)


def test_hello_with_an_unknown_role_is_rejected() -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    payload = bytearray(hello_payload(PROTOCOL_VERSION, Role.PRIMARY, True, os.urandom(32), "a"))
    payload[2] = 77
    with pytest.raises(ProtocolError, match="unknown role 77"):
        secondary.feed(raw_frame(Hello.TYPE, bytes(payload), 0, hello_key()))


# --- control verbs --------------------------------------------------------------------------


def payload_on_the_wire(msg: Message) -> bytes:
    primary, secondary = established_pair()
    frame = primary.encode(msg)
    assert secondary.feed(frame) == [msg]
    return frame[HEADER_SIZE:-MAC_SIZE]


def test_control_verbs_have_their_own_type_codes() -> None:
    assert {cls.__name__: cls.TYPE for cls in CONTROL_MESSAGES} == {
        "VmProfile": 0x40,
        "CompatVerdict": 0x41,
        "DiskCopy": 0x42,
        "DiskState": 0x43,
        "Durable": 0x44,
        "SwitchoverRequest": 0x45,
        "Switched": 0x46,
        "RamState": 0x47,
    }
    assert all(MESSAGE_TYPES[cls.TYPE] is cls for cls in CONTROL_MESSAGES)


def test_the_retired_name_dispatched_verbs_are_gone() -> None:
    """0x30 and 0x31 carried a verb's name and JSON text (and its answer); the typed
    control verbs replaced them, and their codes stay unused."""
    assert not {0x30, 0x31} & set(MESSAGE_TYPES)
    assert not {"Command", "Reply"} & set(wire.__all__)
    assert not hasattr(wire, "Command") and not hasattr(wire, "Reply")


@pytest.mark.parametrize("frame_type", [0x30, 0x31])
def test_a_frame_of_a_retired_type_is_a_protocol_error(frame_type: int) -> None:
    """An old peer's name-dispatched verb, correctly framed and MACed, fails the session
    from its header alone."""
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    old_payload = text(b"status") + text(b"")  # name, args: the layout it had
    with pytest.raises(ProtocolError, match=f"unknown message type {frame_type:#04x}") as info:
        secondary.feed(raw_frame(frame_type, old_payload, 2, key))
    assert info.value.frame_type == frame_type
    assert not isinstance(info.value, AuthError)
    assert secondary.state is SessionState.FAILED
    with pytest.raises(ProtocolError, match="failed earlier"):
        secondary.feed(b"")


# Built here from each class's documented layout, not from the module's codecs.
CONTROL_GOLDEN: list[tuple[Message, bytes]] = [
    (VmProfile(profile={"b": 1, "a": [True, None]}), text(b'{"a":[true,null],"b":1}')),
    (
        CompatVerdict(CompatStage.RESTORE, ok=False, ms=812.5, reason="no", details={"q": 8}),
        struct.pack("!BBd", 2, 0, 812.5) + text(b"no") + text(b'{"q":8}'),
    ),
    (
        CompatVerdict(CompatStage.PROFILE, ok=True),
        struct.pack("!BBd", 1, 1, 0.0) + text(b"") + text(b"{}"),
    ),
    (DiskCopy(DiskCopyMode.FULL, "ab", 7), b"\x01" + text(b"ab") + struct.pack("!Q", 7)),
    (DiskState(lineage="", epoch=NO_EPOCH), text(b"") + struct.pack("!q", -1)),
    (DiskState(lineage="ab", epoch=5), text(b"ab") + struct.pack("!q", 5)),
    (Durable(epoch=11), struct.pack("!Q", 11)),
    (SwitchoverRequest(epoch=12, lineage="ab"), struct.pack("!Q", 12) + text(b"ab")),
    (
        Switched(SwitchOutcome.REFUSED, 12, reason="busy"),
        struct.pack("!BQd", 1, 12, 0.0) + text(b"busy"),
    ),
    (RamState(epoch=NO_EPOCH), struct.pack("!q", -1) + text(b"")),
    (
        RamState(epoch=12, lineage="ab", digest=bytes(range(32))),
        struct.pack("!q", 12) + text(b"ab") + bytes(range(32)),
    ),
]


def test_ram_state_refuses_a_malformed_digest_or_epoch() -> None:
    with pytest.raises(ValueError, match="digest"):
        RamState(epoch=3, digest=b"short")
    with pytest.raises(ValueError, match="NO_EPOCH"):
        RamState(epoch=-2)


@pytest.mark.parametrize(("msg", "payload"), CONTROL_GOLDEN)
def test_control_verbs_golden_bytes(msg: Message, payload: bytes) -> None:
    assert payload_on_the_wire(msg) == payload
    # And the other way: a frame built by hand decodes to the message.
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    assert secondary.feed(raw_frame(msg.TYPE, payload, 2, key)) == [msg]


def test_switched_golden_hex() -> None:
    msg = Switched(outcome=SwitchOutcome.DONE, epoch=12, resume_ms=41.25)
    assert payload_on_the_wire(msg) == bytes.fromhex("02000000000000000c4044a0000000000000000000")


# The epoch, liveness and close messages, from their documented layouts too.
EPOCH_GOLDEN: list[tuple[Message, bytes]] = [
    (
        EpochBegin(epoch=7, kind=EpochKind.DELTA, ram_size=128 << 20, page_size=4096),
        struct.pack("!QBQI", 7, 2, 128 << 20, 4096),
    ),
    (Pages(epoch=7, encoded=b"KMPG\x01"), struct.pack("!Q", 7) + b"KMPG\x01"),
    (DeviceState(epoch=3, data=b"dev"), struct.pack("!Q", 3) + b"dev"),
    (
        DeviceStateDelta(epoch=4, base_epoch=3, size=400, data=b"xor"),
        struct.pack("!QQQ", 4, 3, 400) + b"xor",
    ),
    (IOLog(epoch=3, data=b""), struct.pack("!Q", 3)),
    (
        EpochEnd(epoch=7, n_pages=4100, digest=bytes(range(32))),
        struct.pack("!QQ", 7, 4100) + bytes(range(32)),
    ),
    (Ack(epoch=7), struct.pack("!Q", 7)),
    (Nack(epoch=8, reason="ü"), struct.pack("!Q", 8) + text("ü".encode())),
    (Resync(reason="restarted"), text(b"restarted")),
    (
        Heartbeat(seq=2**64 - 1, sent_ns=5, role_state="s"),
        struct.pack("!QQ", 2**64 - 1, 5) + text(b"s"),
    ),
    (GuestEvent(name="SHUTDOWN", data="{}"), text(b"SHUTDOWN") + text(b"{}")),
    (
        GuestFrames(epoch=9, frames=(b"ab", b"c")),
        struct.pack("!QI", 9, 2) + text(b"ab") + text(b"c"),
    ),
    (Bye(reason="done"), text(b"done")),
]


@pytest.mark.parametrize(("msg", "payload"), EPOCH_GOLDEN)
def test_epoch_messages_golden_bytes(msg: Message, payload: bytes) -> None:
    assert payload_on_the_wire(msg) == payload
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    assert secondary.feed(raw_frame(msg.TYPE, payload, 2, key)) == [msg]


def test_golden_bytes_cover_every_message_type() -> None:
    # The handshake's own two are built by hand in the handshake tests.
    golden = {type(m) for m, _ in CONTROL_GOLDEN + EPOCH_GOLDEN}
    assert golden | {Hello, HelloProof} == set(MESSAGE_TYPES.values())


def test_a_dispatch_table_covers_every_control_verb() -> None:
    primary, secondary = established_pair()
    got: list[tuple[str, Message]] = []
    handlers = {cls: (lambda m, n=cls.__name__: got.append((n, m))) for cls in CONTROL_MESSAGES}
    verbs = [m for m in SAMPLES if isinstance(m, CONTROL_MESSAGES)]
    assert {type(m) for m in verbs} == set(CONTROL_MESSAGES)
    for msg in secondary.feed(b"".join(primary.encode(m) for m in verbs)):
        handlers[type(msg)](msg)
    assert got == [(type(m).__name__, m) for m in verbs]


def test_control_verbs_as_plain_json() -> None:
    verdict = CompatVerdict(CompatStage.RESTORE, ok=True, ms=9.5, details={"qemu": "8.2"})
    assert verdict.as_dict() == {
        "qemu": "8.2",
        "stage": "restore",
        "ok": True,
        "ms": 9.5,
        "reason": "",
    }
    assert DiskState(lineage="ab", epoch=3).as_dict() == {"lineage": "ab", "epoch": 3}
    answers = [Switched(outcome, 4).as_reply()["ok"] for outcome in SwitchOutcome]
    assert answers == [False, True, None]  # REFUSED, DONE, UNKNOWN


def f64(value: float) -> bytes:
    return struct.pack("!d", value)


@pytest.mark.parametrize(
    ("frame_type", "payload", "match"),
    [
        (
            CompatVerdict.TYPE,
            b"\x09\x01" + f64(0) + text(b"") + text(b"{}"),
            "unknown compat stage 9 in field stage",
        ),
        (CompatVerdict.TYPE, b"\x01\x02" + f64(0) + text(b"") + text(b"{}"), "ok is 2"),
        (CompatVerdict.TYPE, b"\x01\x01" + f64(math.nan) + text(b"") + text(b"{}"), "ms is nan"),
        (CompatVerdict.TYPE, b"\x01\x01" + f64(-math.inf) + text(b"") + text(b"{}"), "ms is -inf"),
        (CompatVerdict.TYPE, b"\x01\x01" + f64(0) + text(b"") + text(b"{"), "details is not JSON"),
        (
            CompatVerdict.TYPE,
            b"\x01\x01" + f64(0) + text(b"") + text(b'{"a": NaN}'),
            "details is not JSON",
        ),
        (
            CompatVerdict.TYPE,
            b"\x01\x01" + f64(0) + text(b"") + text(b"[" * 100_000),
            "details is not JSON",
        ),
        (
            CompatVerdict.TYPE,
            b"\x01\x01" + f64(0) + text(b"") + text(b"[1]"),
            "details is a JSON list, not an object",
        ),
        (CompatVerdict.TYPE, b"\x01\x01" + f64(0) + text(b""), "details needs"),
        (VmProfile.TYPE, text(b'"x"'), "profile is a JSON str"),
        (VmProfile.TYPE, text(b"\xff"), "profile is not UTF-8"),
        (
            DiskCopy.TYPE,
            b"\x00" + text(b"") + struct.pack("!Q", 1),
            "unknown disk copy mode 0 in field mode",
        ),
        (DiskState.TYPE, text(b"ab") + struct.pack("!q", -2), "epoch is -2, below NO_EPOCH"),
        (DiskState.TYPE, text(b"ab") + b"\x00" * 4, "epoch needs"),
        (Durable.TYPE, struct.pack("!Q", 1) + b"\x00", "1 trailing bytes"),
        (SwitchoverRequest.TYPE, struct.pack("!Q", 1), "lineage needs"),
        (
            Switched.TYPE,
            struct.pack("!BQd", 0, 1, 0.0) + text(b""),
            "unknown switch outcome 0 in field outcome",
        ),
        (Switched.TYPE, struct.pack("!BQ", 2, 1), "resume_ms needs"),
    ],
)
def test_malformed_control_verbs_name_the_field(
    frame_type: int, payload: bytes, match: str
) -> None:
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    with pytest.raises(ProtocolError, match=match) as info:
        secondary.feed(raw_frame(frame_type, payload, 2, key))
    assert info.value.frame_type == frame_type
    assert MESSAGE_TYPES[frame_type].__name__ in str(info.value)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (VmProfile(profile=[1]), "must be a dict"),  # type: ignore[arg-type]
        (VmProfile(profile={"x": math.nan}), "Out of range float"),
        (VmProfile(profile={"x": object()}), "not JSON serializable"),
        (CompatVerdict(CompatStage.PROFILE, ok=True, ms=math.inf), "not a finite number"),
        (CompatVerdict(CompatStage.PROFILE, ok=2), "not a bool"),  # type: ignore[arg-type]
        (CompatVerdict(stage=7, ok=True), "7 is not a valid CompatStage"),  # type: ignore[arg-type]
        (DiskCopy(mode=5, lineage="", epoch=1), "5 is not a valid"),  # type: ignore[arg-type]
        (Durable(epoch=-1), "Durable"),
        (SwitchoverRequest(epoch=1, lineage=None), "SwitchoverRequest"),  # type: ignore[arg-type]
    ],
)
def test_control_verbs_that_do_not_fit_are_a_local_value_error(msg: Message, match: str) -> None:
    primary, _ = established_pair()
    with pytest.raises(ValueError, match=match):
        primary.encode(msg)
    assert primary.established  # the caller's bug, not the session's


def test_disk_state_below_no_epoch_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="below NO_EPOCH"):
        DiskState(lineage="x", epoch=-2)


@given(st.one_of(*control_strategies()))
@FUZZ
def test_random_control_verbs_round_trip_byte_by_byte(msg: Message) -> None:
    primary, secondary = established_pair()
    frame = primary.encode(msg)
    got: list[Message] = []
    for i in range(len(frame)):
        got += secondary.feed(frame[i : i + 1])
    assert got == [msg]


# --- epoch digest ----------------------------------------------------------------------------


def test_epoch_digest_verifies_what_was_sent() -> None:
    primary, secondary = established_pair()
    parts: list[Message] = [
        Pages(epoch=5, encoded=b"pages-1"),
        Pages(epoch=5, encoded=b"pages-2"),
        DeviceState(epoch=5, data=b"dev"),
        IOLog(epoch=5, data=b"log"),
    ]
    sent = EpochDigest(5)
    stream = primary.encode(EpochBegin(5, EpochKind.DELTA, 1 << 27, 4096))
    for m in parts:
        assert isinstance(m, Pages | DeviceState | IOLog)
        sent.update(m)
        stream += primary.encode(m)
    stream += primary.encode(EpochEnd(epoch=5, n_pages=2, digest=sent.digest()))
    received = EpochDigest(5)
    end = None
    for m in secondary.feed(stream):
        if isinstance(m, Pages | DeviceState | IOLog):
            received.update(m)
        elif isinstance(m, EpochEnd):
            end = m
    assert end is not None
    received.verify(end)

    swapped = EpochDigest(5)
    for m in [parts[1], parts[0], parts[2], parts[3]]:
        assert isinstance(m, Pages | DeviceState | IOLog)
        swapped.update(m)
    with pytest.raises(ProtocolError, match="digest mismatch"):
        swapped.verify(end)
    # Moving bytes between messages changes the digest too.
    shifted = EpochDigest(5)
    shifted.update(Pages(epoch=5, encoded=b"pages-1p"))
    shifted.update(Pages(epoch=5, encoded=b"ages-2"))
    shifted.update(DeviceState(epoch=5, data=b"dev"))
    shifted.update(IOLog(epoch=5, data=b"log"))
    with pytest.raises(ProtocolError):
        shifted.verify(end)
    with pytest.raises(ProtocolError, match="epoch 6"):
        received.update(IOLog(epoch=6, data=b""))
    with pytest.raises(ProtocolError, match="epoch 4"):
        EpochDigest(4).verify(end)


# --- fuzzing: only ProtocolError may come out ------------------------------------------------


def only_protocol_errors(session: Session, data: bytes) -> None:
    try:
        session.feed(data)
    except ProtocolError:
        assert session.state is SessionState.FAILED


@given(st.binary(max_size=400))
@FUZZ
def test_fuzz_random_bytes_into_a_fresh_session(data: bytes) -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    only_protocol_errors(secondary, data)


@given(st.binary(max_size=400))
@FUZZ
def test_fuzz_random_bytes_into_an_established_session(data: bytes) -> None:
    _, secondary = established_pair()
    only_protocol_errors(secondary, data)


@given(st.binary(min_size=HEADER_SIZE - 4, max_size=HEADER_SIZE - 4), st.binary(max_size=64))
@FUZZ
def test_fuzz_random_headers_with_a_valid_checksum(head: bytes, rest: bytes) -> None:
    _, secondary = established_pair()
    head = b"KMRI" + head[4:]
    only_protocol_errors(secondary, head + struct.pack("!I", zlib.crc32(head)) + rest)


def valid_stream() -> tuple[Session, bytes]:
    primary, secondary = established_pair()
    stream = b"".join(primary.encode(m) for m in SAMPLES)
    return secondary, stream


@given(st.data())
@FUZZ
def test_fuzz_any_bit_flip_in_valid_frames_is_detected(data: st.DataObject) -> None:
    secondary, stream = valid_stream()
    bit = data.draw(st.integers(0, len(stream) * 8 - 1), label="bit")
    flipped = bytearray(stream)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        secondary.feed(bytes(flipped))
        secondary.decoder.eof()


@given(st.data())
@FUZZ
def test_fuzz_truncated_streams(data: st.DataObject) -> None:
    secondary, stream = valid_stream()
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    try:
        got = secondary.feed(stream[:cut])
    except ProtocolError:
        raise AssertionError("a prefix of a valid stream must not fail") from None
    assert got == SAMPLES[: len(got)]
    if secondary.decoder.at_boundary:
        secondary.decoder.eof()
    else:
        with pytest.raises(ProtocolError):
            secondary.decoder.eof()


@given(st.integers(0, len(SAMPLES) - 1))
@FUZZ
def test_fuzz_valid_frames_under_a_wrong_key(first: int) -> None:
    wrong_p, wrong_s = make_pair("wrong", "wrong")
    handshake(wrong_p, wrong_s)
    stream = b"".join(wrong_p.encode(m) for m in SAMPLES[first:])
    _, secondary = established_pair()
    with pytest.raises(AuthError):
        secondary.feed(stream)


@given(st.integers(0, 255), st.binary(max_size=300))
@FUZZ
def test_fuzz_authenticated_frames_with_random_payloads(frame_type: int, payload: bytes) -> None:
    """Frames that pass the MAC still meet a payload parser that raises only ProtocolError."""
    _, secondary = established_pair()
    key = secondary._recv_key
    assert key is not None
    try:
        got = secondary.feed(raw_frame(frame_type, payload, 2, key))
    except ProtocolError:
        return
    assert [m.TYPE for m in got] == [frame_type]


@given(st.data())
@FUZZ
def test_fuzz_mutated_payloads_under_a_valid_mac(data: st.DataObject) -> None:
    """Valid payloads with a few bytes changed, re-MACed: reaches every field parser."""
    primary, secondary = established_pair()
    msg = data.draw(st.sampled_from(SAMPLES), label="msg")
    frame = primary.encode(msg)
    payload = bytearray(frame[HEADER_SIZE:-MAC_SIZE])
    if payload:
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(payload) - 1))
            payload[pos] = data.draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xC3, 0xFF]))
    cut = data.draw(st.integers(0, len(payload)))
    key = secondary._recv_key
    assert key is not None
    try:
        got = secondary.feed(raw_frame(msg.TYPE, bytes(payload[:cut]), 2, key))
    except ProtocolError as err:
        assert not isinstance(err, AuthError)
        return
    assert [type(m) for m in got] == [type(msg)]


@given(st.binary(min_size=36, max_size=36), st.binary(max_size=64))
@FUZZ
def test_fuzz_hello_payloads(fixed: bytes, tail: bytes) -> None:
    secondary = Session(PSK, role=Role.SECONDARY, node_id="b", initiator=False)
    try:
        secondary.feed(raw_frame(Hello.TYPE, fixed + tail, 0, hello_key()))
    except ProtocolError:
        return
    assert secondary.peer is not None
