"""AMD SEV-SNP attestation reports: parse the ABI layout, verify the VCEK chain to a pinned ARK and the signature."""
from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edge_client.attestation.errors import AttestationFailed

# SEV Secure Nested Paging Firmware ABI Specification, "ATTESTATION_REPORT Structure".
REPORT_SIZE = 0x4A0
SIGNED_BYTES = 0x2A0          # the signature covers the report up to its signature field
ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19

# The certificate table's GUIDs (GHCB specification, extended guest request), stored as EFI GUIDs.
CERT_GUIDS = {uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le: "vcek",
              uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes_le: "ask",
              uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes_le: "ark",
              uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes_le: "vlek"}

# AMD's X.509 extensions of a VCEK: the TCB it was issued for and the chip it belongs to.
_AMD = "1.3.6.1.4.1.3704.1"
TCB_OIDS = {"bootloader": f"{_AMD}.3.1", "tee": f"{_AMD}.3.2", "snp": f"{_AMD}.3.3", "microcode": f"{_AMD}.3.8"}
HWID_OID = f"{_AMD}.4"
# AMD signs ARK, ASK and VCEK with RSASSA-PSS, SHA-384, 48-byte salt.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION (Milan/Genoa layout): SPL of the bootloader, the TEE, the SNP firmware and microcode."""

    bootloader: int
    tee: int
    snp: int
    microcode: int

    @classmethod
    def from_u64(cls, raw: int) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_u64(self) -> int:
        return int.from_bytes(bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]), "little")

    def as_dict(self) -> dict[str, int]:
        return {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}


@dataclass(frozen=True)
class SnpReport:
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb: TcbVersion
    chip_id: bytes
    committed_tcb: TcbVersion
    launch_tcb: TcbVersion
    signature_r: int
    signature_s: int

    def claims(self) -> dict[str, object]:
        return {"version": self.version, "guest_svn": self.guest_svn, "policy": hex(self.policy),
                "vmpl": self.vmpl, "measurement": self.measurement.hex(), "report_data": self.report_data.hex(),
                "host_data": self.host_data.hex(), "id_key_digest": self.id_key_digest.hex(),
                "reported_tcb": self.reported_tcb.as_dict(), "current_tcb": self.current_tcb.as_dict(),
                "chip_id": self.chip_id.hex(), "debug": debug_allowed(self)}


def parse_report(blob: bytes) -> SnpReport:
    if len(blob) != REPORT_SIZE:
        raise AttestationFailed("sev-snp.report-size", f"an attestation report has {REPORT_SIZE} bytes, got "
                                                       f"{len(blob)}")
    u32 = lambda off: struct.unpack_from("<I", blob, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", blob, off)[0]  # noqa: E731
    report = SnpReport(
        version=u32(0x00), guest_svn=u32(0x04), policy=u64(0x08), family_id=blob[0x10:0x20],
        image_id=blob[0x20:0x30], vmpl=u32(0x30), signature_algo=u32(0x34),
        current_tcb=TcbVersion.from_u64(u64(0x38)), platform_info=u64(0x40), report_data=blob[0x50:0x90],
        measurement=blob[0x90:0xC0], host_data=blob[0xC0:0xE0], id_key_digest=blob[0xE0:0x110],
        author_key_digest=blob[0x110:0x140], report_id=blob[0x140:0x160],
        reported_tcb=TcbVersion.from_u64(u64(0x180)), chip_id=blob[0x1A0:0x1E0],
        committed_tcb=TcbVersion.from_u64(u64(0x1E0)), launch_tcb=TcbVersion.from_u64(u64(0x1F0)),
        signature_r=int.from_bytes(blob[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(blob[0x2E8:0x330], "little"))
    if report.version < 2:
        raise AttestationFailed("sev-snp.report-version", f"report version {report.version}; SEV-SNP gives 2 or "
                                                          "later")
    if report.signature_algo != ECDSA_P384_SHA384:
        raise AttestationFailed("sev-snp.signature-algo", f"signature algorithm {report.signature_algo}, expected "
                                                          f"{ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)")
    return report


def debug_allowed(report: SnpReport) -> bool:
    """The guest policy's DEBUG bit: the host may then read and change the guest's memory."""
    return bool(report.policy & POLICY_DEBUG)


def parse_cert_table(auxblob: bytes) -> dict[str, bytes]:
    """The GUID table configfs-tsm's `auxblob` holds: {"vcek"|"ask"|"ark"|"vlek": DER}."""
    out: dict[str, bytes] = {}
    for i in range(0, len(auxblob) - 23, 24):
        guid, offset, length = auxblob[i:i + 16], *struct.unpack_from("<II", auxblob, i + 16)
        if guid == bytes(16):
            return out
        if offset + length > len(auxblob):
            raise AttestationFailed("sev-snp.certificates", f"certificate table entry {i // 24} runs past the end")
        name = CERT_GUIDS.get(guid)
        if name:
            out[name] = auxblob[offset:offset + length]
    raise AttestationFailed("sev-snp.certificates", "the certificate table has no terminating entry")


def _cert(data: bytes, name: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise AttestationFailed("sev-snp.certificates", f"the {name.upper()} is not an X.509 certificate") from None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate, check: str, what: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationFailed(check, f"{what}: the issuer's key is not RSA")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise AttestationFailed(check, f"{what}: the signature does not verify") from None


def _der_value(ext: x509.Extension, tag: int) -> bytes:
    """The content of a DER INTEGER or OCTET STRING extension value (short or one-byte long form)."""
    raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    if len(raw) < 2 or raw[0] != tag:
        return raw
    if raw[1] < 0x80:
        return raw[2:]
    return raw[3:] if raw[1] == 0x81 else raw


def _vcek_tcb(vcek: x509.Certificate) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    exts = {e.oid.dotted_string: e for e in vcek.extensions}
    for part, oid in TCB_OIDS.items():
        found[part] = int.from_bytes(_der_value(exts[oid], 0x02), "big") if oid in exts else None
    return found


def verify_report(report: bytes, certs: dict[str, bytes], trusted_arks: Sequence[bytes]) -> SnpReport:
    """The report, once ARK (pinned) -> ASK -> VCEK -> report all verify and the VCEK fits the report."""
    parsed = parse_report(report)
    for name in ("ark", "ask", "vcek"):
        if name not in certs:
            raise AttestationFailed("sev-snp.certificates", f"no {name.upper()} in the certificate table (VLEK-"
                                                            "signed reports are not supported)")
    ark, ask, vcek = (_cert(certs[n], n) for n in ("ark", "ask", "vcek"))
    pinned = {_spki(_cert(r, "pinned ARK")) for r in trusted_arks}
    if _spki(ark) not in pinned:
        raise AttestationFailed("sev-snp.ark-pinned", f"the ARK ({ark.subject.rfc4514_string()[:60]}) is not one "
                                                      f"of the {len(pinned)} pinned AMD root(s)")
    _signed_by(ark, ark, "sev-snp.ark-signature", "the ARK is not self-signed")
    _signed_by(ask, ark, "sev-snp.ask-signature", "the ASK is not signed by the ARK")
    _signed_by(vcek, ask, "sev-snp.vcek-signature", "the VCEK is not signed by the ASK")
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationFailed("sev-snp.vcek-signature", "the VCEK's key is not ECDSA P-384")
    try:
        key.verify(encode_dss_signature(parsed.signature_r, parsed.signature_s), report[:SIGNED_BYTES],
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationFailed("sev-snp.report-signature", "the report's signature does not verify with the "
                                                            "VCEK") from None
    _vcek_fits(vcek, parsed)
    return parsed


def _vcek_fits(vcek: x509.Certificate, report: SnpReport) -> None:
    """A VCEK is issued for one chip at one TCB: both must be the report's."""
    for part, value in _vcek_tcb(vcek).items():
        want = getattr(report.reported_tcb, part)
        if value is not None and value != want:
            raise AttestationFailed("sev-snp.tcb-mismatch", f"the VCEK is for {part} SPL {value}, the report "
                                                            f"says {want}")
    exts = {e.oid.dotted_string: e for e in vcek.extensions}
    if HWID_OID in exts:
        hwid = _der_value(exts[HWID_OID], 0x04)
        if hwid != report.chip_id:
            raise AttestationFailed("sev-snp.chip-id", f"the VCEK is for chip {hwid[:8].hex()}…, the report comes "
                                                       f"from {report.chip_id[:8].hex()}…")
