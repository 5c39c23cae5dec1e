"""A TLS key made in memory at start, with a self-signed certificate: the attested server's own identity.

In attested mode the key is what the evidence binds, so it must never leave the TEE: it is not written
anywhere, and a new one is made at every start. Edges do not check it against a CA; they pin the
certificate they reached and check that the evidence names its key (edge_client/attestation/).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The name in the certificate; edges check the certificate by pinning it, so the name only has to match itself.
ATTESTED_NAME = "dlora-attested"


@dataclass(frozen=True)
class TlsIdentity:
    cert_pem: bytes
    key_pem: bytes


def spki_der(cert_pem: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a PEM certificate (the first, for a chain)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate(days: int = 30) -> TlsIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ATTESTED_NAME)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(ATTESTED_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return TlsIdentity(cert.public_bytes(serialization.Encoding.PEM),
                       key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
