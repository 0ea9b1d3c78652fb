"""TLS on the replication link: the opening preamble, the contexts, the channel binding.

No I/O here; :mod:`~kemari_suite.protocol.link` drives the socket. The opening of a
replication connection::

    primary (connects)                         secondary (listens)
    Preamble(tls) ───────────────────────────►  checks it: a mismatch is named, then closed
                  ◄───────────────────────────  Preamble(tls) (its own, so the primary can
                                                name a mismatch too)
    [tls = on]    TLS 1.3 handshake; the secondary presents an ephemeral self-signed
                  certificate made when it started listening
    wire.Hello / HelloProof (pre-shared key), with the channel binding in the proof

Preamble (8 bytes, network byte order, never encrypted)::

    offset  size  field
    0       4     magic b"KMRL"
    4       1     preamble version (PREAMBLE_VERSION)
    5       1     1 when TLS follows, 0 when wire frames follow in the clear
    6       2     reserved, zero

The preamble only lets each end say clearly what went wrong: each end's own
``replication.tls`` decides, and a mismatch ends the connection on both ends. A relay
that rewrote the byte would gain nothing: the ends would disagree and both refuse.

Why the certificate is not verified, and why that is safe: nobody issues certificates
for these hosts, and Python's ``ssl`` has neither TLS-PSK (3.11) nor a way to accept a
certificate it cannot chain. The primary accepts any certificate, and the pre-shared-key
handshake inside TLS then binds the one it saw: both ends put
``sha256(DER of the secondary's certificate)`` into the transcript their HelloProof MACs
(:meth:`wire.Session.bind_channel`). A relay that terminates TLS must show the primary a
certificate whose private key it holds, which cannot be the secondary's (generated in
memory, never written), so the two ends MAC different bindings and both proofs fail
(``AuthError``). Without the key, a relay cannot make a matching proof either.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import struct
from dataclasses import dataclass
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kemari_suite.errors import ConfigError, ProtocolError

PREAMBLE_MAGIC = b"KMRL"
PREAMBLE_VERSION = 1
PREAMBLE_SIZE = 8
#: The channel binding's label: what is bound, so that a future binding cannot collide.
BINDING_LABEL = b"kemari-tls-server-cert-sha256:"


def enabled(mode: str) -> bool:
    """``replication.tls`` as a bool.

    Raises:
        ConfigError: neither "on" nor "off".
    """
    if mode not in ("on", "off"):
        raise ConfigError(f"must be 'on' or 'off', not {mode!r}", key="replication.tls")
    return mode == "on"


def describe(on: bool) -> str:
    return "on" if on else "off"


@dataclass(frozen=True)
class Preamble:
    """The first 8 bytes each end sends (layout in the module docstring)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("!4sBBH")

    tls: bool

    def encode(self) -> bytes:
        return self.LAYOUT.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, int(self.tls), 0)

    @classmethod
    def decode(cls, data: bytes) -> Preamble:
        """Raises ProtocolError: not a Kemari link preamble (garbage, an old peer)."""
        if len(data) != PREAMBLE_SIZE:
            raise ProtocolError(f"link preamble of {len(data)} bytes, expected {PREAMBLE_SIZE}")
        magic, version, flag, reserved = cls.LAYOUT.unpack(data)
        if magic != PREAMBLE_MAGIC:
            raise ProtocolError(
                f"bad link preamble {bytes(data[:4])!r}: not a Kemari replication peer"
                " (or one older than the preamble)"
            )
        if version != PREAMBLE_VERSION:
            raise ProtocolError(
                f"link preamble version {version}, this node speaks {PREAMBLE_VERSION}"
            )
        if flag not in (0, 1) or reserved != 0:
            raise ProtocolError(f"malformed link preamble (tls={flag}, reserved={reserved})")
        return cls(tls=bool(flag))


def mismatch_reason(here: bool, there: bool, *, peer_is: str) -> str:
    """What a TLS mismatch says, the same words on both ends."""
    return (
        f"replication.tls is {describe(there)} on the {peer_is} and {describe(here)} here:"
        " set the same on both hosts"
    )


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def client_context() -> ssl.SSLContext:
    """The primary's context: TLS 1.3 only; any certificate (bound in the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # see the module docstring: the PSK proof binds it
    return _tls13(ctx)


def channel_binding(cert_der: bytes) -> bytes:
    """The bytes both ends bind into the handshake for the secondary's certificate."""
    return BINDING_LABEL + hashlib.sha256(cert_der).digest()


@dataclass(frozen=True)
class Identity:
    """An ephemeral key pair and self-signed certificate (the secondary's)."""

    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes

    @classmethod
    def generate(cls, name: str = "kemari-replication") -> Identity:
        """A fresh P-256 key and a certificate for it, in memory."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            # Nobody checks the dates (the fingerprint is bound instead); a listener
            # may run for years.
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_der=cert.public_bytes(serialization.Encoding.DER),
        )

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert_der).hexdigest()

    @property
    def binding(self) -> bytes:
        return channel_binding(self.cert_der)

    def server_context(self) -> ssl.SSLContext:
        """The secondary's context: TLS 1.3 only, this certificate."""
        ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        # ssl loads keys from files only: a memfd keeps the private key off every disk.
        fd = os.memfd_create("kemari-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.key_pem + self.cert_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx


__all__ = [
    "PREAMBLE_SIZE",
    "Identity",
    "Preamble",
    "channel_binding",
    "client_context",
    "enabled",
    "mismatch_reason",
]
