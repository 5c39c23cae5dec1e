"""A throw-away AMD-shaped chain (ARK -> ASK -> VCEK) that signs SEV-SNP reports, for tests and tsm_double.py."""
from __future__ import annotations

import datetime as dt
import os
import struct
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_client.attestation.sev_snp import (  # noqa: E402
    CERT_GUIDS,
    HWID_OID,
    REPORT_SIZE,
    SIGNED_BYTES,
    TCB_OIDS,
    TcbVersion,
)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_GUIDS = {name: guid for guid, name in CERT_GUIDS.items()}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Throw-away test chain (not AMD)")])


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _build(subject: str, key, issuer: str, issuer_key, extensions=(), ca: bool = True) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for oid, der in extensions:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der), critical=False)
    return b.sign(issuer_key, hashes.SHA384(), rsa_padding=_PSS)


class SnpTestChain:
    """ARK and ASK are RSA (2048 bits here, 4096 at AMD: the verifier does not care), the VCEK P-384."""

    def __init__(self, chip_id: bytes | None = None, tcb: TcbVersion | None = None) -> None:
        self.chip_id = chip_id or os.urandom(64)
        self.tcb = tcb or TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.ask_key = rsa.generate_private_key(65537, 2048)
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())
        self.ark = _build("ARK-Test", self.ark_key, "ARK-Test", self.ark_key)
        self.ask = _build("SEV-Test", self.ask_key, "ARK-Test", self.ark_key)
        exts = [(oid, _der_int(getattr(self.tcb, part))) for part, oid in TCB_OIDS.items()]
        exts.append((HWID_OID, bytes([0x04, len(self.chip_id)]) + self.chip_id))
        self.vcek = _build("SEV-VCEK-Test", self.vcek_key, "SEV-Test", self.ask_key, exts, ca=False)
        self.ark_pem = self.ark.public_bytes(serialization.Encoding.PEM)

    def certs(self) -> dict[str, bytes]:
        return {n: c.public_bytes(serialization.Encoding.DER)
                for n, c in (("ark", self.ark), ("ask", self.ask), ("vcek", self.vcek))}

    def report(self, report_data: bytes, measurement: bytes, *, policy: int = 0x30000, vmpl: int = 0,
               tcb: TcbVersion | None = None) -> bytes:
        tcb_raw = (tcb or self.tcb).to_u64()
        blob = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", blob, 0x00, 2, 0, policy)
        struct.pack_into("<II", blob, 0x30, vmpl, 1)
        struct.pack_into("<Q", blob, 0x38, tcb_raw)
        blob[0x50:0x90] = report_data.ljust(64, b"\0")
        blob[0x90:0xC0] = measurement
        struct.pack_into("<Q", blob, 0x180, tcb_raw)
        blob[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", blob, 0x1E0, tcb_raw)
        struct.pack_into("<Q", blob, 0x1F0, tcb_raw)
        r, s = decode_dss_signature(self.vcek_key.sign(bytes(blob[:SIGNED_BYTES]), ec.ECDSA(hashes.SHA384())))
        blob[0x2A0:0x2E8] = r.to_bytes(72, "little")
        blob[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(blob)

    def auxblob(self) -> bytes:
        certs = self.certs()
        table_size = 24 * (len(certs) + 1)
        table, body, offset = b"", b"", table_size
        for name, der in certs.items():
            table += _GUIDS[name] + struct.pack("<II", offset, len(der))
            body += der
            offset += len(der)
        return table + bytes(24) + body
