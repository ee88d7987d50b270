"""TLS 1.3 for the direct data plane, bound to the node's ed25519 identity (as the libp2p TLS spec binds it).

Each daemon presents a self-signed certificate whose key *is* its ed25519 identity key, so TLS 1.3's
CertificateVerify proves the server holds the key behind its peer id; the dialer checks that the certificate's key
derives the peer id it meant to reach (`peer_id_of_certificate`). Python's `ssl` cannot run a custom check of a
client certificate, so the dialer proves its identity inside the encrypted channel instead: its first message
carries its public key and an ed25519 signature over a label and the SHA-256 of the server's certificate
(`client_proof`/`check_client_proof`), which binds the proof to this server and cannot be replayed to another.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from petal.daemon.identity import Identity
from petal.protocol.records import RecordError, peer_id_from_public_key

PROOF_LABEL = b"petal-direct-v1 client proof:"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class PeerAuthError(Exception):
    """The peer at the other end of a TLS connection is not who it should be (or proved nothing)."""


def certificate(identity: Identity) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM) for the identity's own ed25519 key, and that key (PEM, PKCS#8)."""
    key = Ed25519PrivateKey.from_private_bytes(identity.seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _context(server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # peers are checked against their peer id, not a CA (see the module doc)
    return ctx


def server_context(identity: Identity) -> tuple[ssl.SSLContext, bytes]:
    """A listener's context presenting a fresh certificate for `identity`, and that certificate (DER): client
    proofs are bound to it."""
    ctx = _context(server=True)
    cert_pem, key_pem = certificate(identity)
    # ssl loads a chain only from files: a private temp dir, removed at once
    with tempfile.TemporaryDirectory(prefix="petal-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(0o600)
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx, x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def client_context() -> ssl.SSLContext:
    return _context(server=False)


def peer_id_of_certificate(der: bytes | None) -> str:
    """The peer id whose key signed the TLS handshake (the certificate's ed25519 key); PeerAuthError if none."""
    if not der:
        raise PeerAuthError("the peer presented no TLS certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as e:
        raise PeerAuthError(f"the peer's TLS certificate cannot be parsed: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PeerAuthError(f"the peer's TLS certificate holds a {type(key).__name__}, not an ed25519 identity key")
    return peer_id_from_public_key(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def client_proof(identity: Identity, server_der: bytes) -> bytes:
    """The dialer's first message: its public key and its signature over the server's certificate."""
    return identity.public_key + identity.sign(PROOF_LABEL + hashlib.sha256(server_der).digest())


def check_client_proof(proof: bytes, own_der: bytes) -> str:
    """The dialer's peer id, if `proof` is a valid signature over our own certificate; PeerAuthError otherwise."""
    if len(proof) != PUBLIC_KEY_BYTES + SIGNATURE_BYTES:
        raise PeerAuthError(f"client proof of {len(proof)} bytes, expected {PUBLIC_KEY_BYTES + SIGNATURE_BYTES}")
    public, signature = proof[:PUBLIC_KEY_BYTES], proof[PUBLIC_KEY_BYTES:]
    try:
        VerifyKey(public).verify(PROOF_LABEL + hashlib.sha256(own_der).digest(), signature)
        return peer_id_from_public_key(public)
    except (BadSignatureError, RecordError, ValueError) as e:
        raise PeerAuthError(f"the dialer's identity proof does not verify: {e}") from None
