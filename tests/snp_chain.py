"""A throw-away AMD-shaped chain (ARK -> ASK -> VCEK or VLEK) signing SEV-SNP reports, for tests and tsm_double.py."""
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

# A standalone helper process (tsm_double.py) imports this with only tests/ on its path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_client.attestation.sev_snp import (  # noqa: E402
    CERT_GUIDS,
    FMC_OID,
    HWID_OID,
    REPORT_SIZE,
    SIGNATURE_COMPONENT,
    SIGNED_BYTES,
    TCB_OIDS,
    ZEN5_FAMILY,
    TcbVersion,
)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_GUIDS = {name: guid for guid, name in CERT_GUIDS.items()}
_MILAN_CPUID = (0x19, 0x01, 0x01)   # family, model, stepping as a v3 report states them
_TURIN_CPUID = (ZEN5_FAMILY, 0x02, 0x00)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Throw-away test chain (not AMD)")])


def der_int(value: int) -> bytes:
    """A DER INTEGER, as AMD encodes each SPL extension (a leading zero above 127)."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _build(subject: str, key, issuer: str, issuer_key, extensions=(), ca: bool = True) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for oid, value in extensions:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return b.sign(issuer_key, hashes.SHA384(), rsa_padding=_PSS)


class SnpTestChain:
    """ARK and ASK are RSA (2048 bits here, 4096 at AMD: the verifier does not care), the VCEK P-384.

    A `tcb` with `fmc` set makes a Turin chain (version 3 reports of CPU family 1Ah, the Turin TCB layout,
    an FMC extension, an 8-byte hwID). `vlek=True` signs with a VLEK under an ASVK (in the table's ASK slot).
    """

    def __init__(self, chip_id: bytes | None = None, tcb: TcbVersion | None = None, *, vlek: bool = False) -> None:
        self.chip_id = chip_id or os.urandom(64)
        self.tcb = tcb or TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
        self.vlek = vlek
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.ask_key = rsa.generate_private_key(65537, 2048)
        self.vcek_key = ec.generate_private_key(ec.SECP384R1())
        self.ark = _build("ARK-Test", self.ark_key, "ARK-Test", self.ark_key)
        self.ask_cn = "SEV-VLEK-Test" if vlek else "SEV-Test"
        self.ask = _build(self.ask_cn, self.ask_key, "ARK-Test", self.ark_key)
        self.vcek = x509.load_der_x509_certificate(self.issue_vcek())
        self.ark_pem = self.ark.public_bytes(serialization.Encoding.PEM)

    @property
    def signer(self) -> str:
        return "vlek" if self.vlek else "vcek"

    def issue_vcek(self, *, tcb: TcbVersion | None = None, hwid: bytes | None = None,
                   key: ec.EllipticCurvePrivateKey | None = None, drop: tuple[str, ...] = ()) -> bytes:
        """A VCEK (VLEK) DER for this chain's key (or `key`), signed by its ASK; `drop` leaves extension OIDs out."""
        tcb = tcb or self.tcb
        exts = [(oid, der_int(getattr(tcb, part))) for part, oid in TCB_OIDS.items()]
        if tcb.fmc is not None:
            exts.append((FMC_OID, der_int(tcb.fmc)))
        if not self.vlek:
            # AMD puts the chip id's bytes bare in the extension value (Turin: the first 8).
            exts.append((HWID_OID, hwid if hwid is not None else self.chip_id[:8 if self.turin else 64]))
        exts = [(oid, value) for oid, value in exts if oid not in drop]
        cert = _build(f"SEV-{self.signer.upper()}", key or self.vcek_key, self.ask_cn, self.ask_key, exts, ca=False)
        return cert.public_bytes(serialization.Encoding.DER)

    @property
    def turin(self) -> bool:
        return self.tcb.fmc is not None

    def certs(self) -> dict[str, bytes]:
        return {n: c.public_bytes(serialization.Encoding.DER)
                for n, c in (("ark", self.ark), ("ask", self.ask), (self.signer, self.vcek))}

    def report(self, report_data: bytes, measurement: bytes, *, policy: int = 0x30000, vmpl: int = 0,
               tcb: TcbVersion | None = None) -> bytes:
        """A signed version 3 report; `tcb` (default the chain's) goes into every TCB field."""
        tcb_raw = (tcb or self.tcb).to_u64()
        blob = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", blob, 0x00, 3, 0, policy)
        struct.pack_into("<II", blob, 0x30, vmpl, 1)
        struct.pack_into("<QQI", blob, 0x38, tcb_raw, 0b1, 0x04 if self.vlek else 0)  # platform info: SMT on
        blob[0x50:0x90] = report_data.ljust(64, b"\0")
        blob[0x90:0xC0] = measurement
        struct.pack_into("<Q", blob, 0x180, tcb_raw)
        blob[0x188:0x18B] = bytes(_TURIN_CPUID if self.turin else _MILAN_CPUID)
        if not self.vlek:   # a VLEK-signed report may carry no chip id
            blob[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", blob, 0x1E0, tcb_raw)
        blob[0x1E8:0x1EB] = bytes([21, 55, 1])   # firmware 1.55 build 21
        struct.pack_into("<Q", blob, 0x1F0, tcb_raw)
        return self.sign(bytes(blob))

    def sign(self, blob: bytes) -> bytes:
        """`blob` with its signature field replaced by this chain's signature over its first 0x2A0 bytes."""
        r, s = decode_dss_signature(self.vcek_key.sign(blob[:SIGNED_BYTES], ec.ECDSA(hashes.SHA384())))
        sig = r.to_bytes(SIGNATURE_COMPONENT, "little") + s.to_bytes(SIGNATURE_COMPONENT, "little")
        return blob[:SIGNED_BYTES] + sig + blob[SIGNED_BYTES + len(sig):]

    def auxblob(self) -> bytes:
        """The certificate table as the kernel gives it: GUID entries, an all-zero one, then the DER bodies."""
        certs = self.certs()
        offset = 24 * (len(certs) + 1)
        table, body = b"", b""
        for name, der in certs.items():
            table += _GUIDS[name] + struct.pack("<II", offset, len(der))
            body += der
            offset += len(der)
        return table + bytes(24) + body
