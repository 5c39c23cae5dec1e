"""AMD SEV-SNP attestation reports: parse the ABI layout, verify the VCEK (or VLEK) chain to a pinned ARK."""
from __future__ import annotations

import struct
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edge_client.attestation.errors import AttestationFailed

# SEV Secure Nested Paging Firmware ABI Specification (AMD 56860), "ATTESTATION_REPORT Structure".
REPORT_SIZE = 0x4A0
SIGNED_BYTES = 0x2A0          # the signature covers the report up to its signature field
SIGNATURE_COMPONENT = 72      # R and S: little-endian, zero-padded to 72 bytes each
ECDSA_P384_SHA384 = 1
# Version 2 is the first SNP report; 3 adds the CPUID fields, 5 the mitigation vectors. The layout only
# grows into reserved bytes, but an unknown version may mean things this code does not check: refuse it.
SUPPORTED_VERSIONS = range(2, 6)
POLICY_DEBUG = 1 << 19
ZEN5_FAMILY = 0x1A            # Turin: its TCB_VERSION has an FMC byte and another byte order

# SIGNING_KEY (bits 4:2 of the word at 0x48): which key signed the report.
SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}

# The certificate table's GUIDs (GHCB specification, SNP extended guest request), stored as EFI GUIDs.
CERT_GUIDS = {uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le: "vcek",
              uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes_le: "ask",
              uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes_le: "ark",
              uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes_le: "vlek",
              uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea").bytes_le: "crl"}
_TABLE_ENTRY = 24             # GUID, offset (u32), length (u32); an all-zero entry ends the table

# AMD's X.509 extensions of a VCEK/VLEK (AMD 57230, "VCEK Certificate Extensions").
_AMD = "1.3.6.1.4.1.3704.1"
TCB_OIDS = {"bootloader": f"{_AMD}.3.1", "tee": f"{_AMD}.3.2", "snp": f"{_AMD}.3.3", "microcode": f"{_AMD}.3.8"}
FMC_OID = f"{_AMD}.3.9"       # Turin only
HWID_OID = f"{_AMD}.4"        # VCEK only: the chip id (64 bytes; Turin: its first 8)
# AMD signs ARK, ASK/ASVK and VCEK/VLEK with RSASSA-PSS, SHA-384, 48-byte salt.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION: security patch levels of the bootloader, the TEE, the SNP firmware, the microcode.

    `fmc` (the Turin first mutable code) is None on Milan and Genoa, whose layout has no such byte.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def from_u64(cls, raw: int, turin: bool = False) -> TcbVersion:
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_u64(self) -> int:
        """The Turin layout where `fmc` is set, the Milan/Genoa one otherwise."""
        if self.fmc is not None:
            raw = [self.fmc, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode]
        else:
            raw = [self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]
        return int.from_bytes(bytes(raw), "little")

    def as_dict(self) -> dict[str, int]:
        parts = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        return parts if self.fmc is None else {**parts, "fmc": self.fmc}


@dataclass(frozen=True)
class SnpReport:
    """Every field of ATTESTATION_REPORT up to the signature (reserved bytes left out)."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: int               # 0x48: AUTHOR_KEY_EN (bit 0), MASK_CHIP_KEY (bit 1), SIGNING_KEY (bits 4:2)
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_family: int           # the CPUID fields are zero before version 3
    cpuid_model: int
    cpuid_stepping: int
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]     # firmware (major, minor, build)
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    launch_mit_vector: int      # zero before version 5
    current_mit_vector: int
    signature_r: int
    signature_s: int

    @property
    def signing_key(self) -> str:
        return SIGNING_KEYS.get((self.key_info >> 2) & 0b111, "reserved")

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & 0b10)

    @property
    def turin(self) -> bool:
        return self.cpuid_family == ZEN5_FAMILY

    def claims(self) -> dict[str, object]:
        """A JSON-serialisable summary, bytes as hex, for the run record."""
        return {"version": self.version, "guest_svn": self.guest_svn, "policy": hex(self.policy),
                "debug": debug_allowed(self), "vmpl": self.vmpl, "signing_key": self.signing_key,
                "measurement": self.measurement.hex(), "report_data": self.report_data.hex(),
                "host_data": self.host_data.hex(), "family_id": self.family_id.hex(),
                "image_id": self.image_id.hex(), "id_key_digest": self.id_key_digest.hex(),
                "author_key_digest": self.author_key_digest.hex(), "report_id": self.report_id.hex(),
                "platform_info": hex(self.platform_info), "chip_id": self.chip_id.hex(),
                "cpuid": [self.cpuid_family, self.cpuid_model, self.cpuid_stepping],
                "reported_tcb": self.reported_tcb.as_dict(), "current_tcb": self.current_tcb.as_dict(),
                "committed_tcb": self.committed_tcb.as_dict(), "launch_tcb": self.launch_tcb.as_dict(),
                "firmware": ".".join(map(str, self.current_version))}


def parse_report(blob: bytes) -> SnpReport:
    """The report's fields; AttestationFailed for a wrong size, an unknown version or signature algorithm."""
    if len(blob) != REPORT_SIZE:
        raise AttestationFailed("sev-snp.report-size", f"an attestation report has {REPORT_SIZE} bytes, got "
                                                       f"{len(blob)}")

    def u32(off: int) -> int:
        return int(struct.unpack_from("<I", blob, off)[0])

    def u64(off: int) -> int:
        return int(struct.unpack_from("<Q", blob, off)[0])

    version = u32(0x00)
    if version not in SUPPORTED_VERSIONS:
        raise AttestationFailed("sev-snp.report-version", f"report version {version}, expected "
                                                          f"{SUPPORTED_VERSIONS.start}..{SUPPORTED_VERSIONS.stop - 1}")
    family = blob[0x188] if version >= 3 else 0
    turin = family == ZEN5_FAMILY

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.from_u64(u64(off), turin)

    report = SnpReport(
        version=version, guest_svn=u32(0x04), policy=u64(0x08), family_id=blob[0x10:0x20],
        image_id=blob[0x20:0x30], vmpl=u32(0x30), signature_algo=u32(0x34), current_tcb=tcb(0x38),
        platform_info=u64(0x40), key_info=u32(0x48), report_data=blob[0x50:0x90], measurement=blob[0x90:0xC0],
        host_data=blob[0xC0:0xE0], id_key_digest=blob[0xE0:0x110], author_key_digest=blob[0x110:0x140],
        report_id=blob[0x140:0x160], report_id_ma=blob[0x160:0x180], reported_tcb=tcb(0x180),
        cpuid_family=family, cpuid_model=blob[0x189] if version >= 3 else 0,
        cpuid_stepping=blob[0x18A] if version >= 3 else 0, chip_id=blob[0x1A0:0x1E0], committed_tcb=tcb(0x1E0),
        current_version=(blob[0x1EA], blob[0x1E9], blob[0x1E8]),
        committed_version=(blob[0x1EE], blob[0x1ED], blob[0x1EC]), launch_tcb=tcb(0x1F0),
        launch_mit_vector=u64(0x1F8) if version >= 5 else 0, current_mit_vector=u64(0x200) if version >= 5 else 0,
        signature_r=int.from_bytes(blob[0x2A0:0x2A0 + SIGNATURE_COMPONENT], "little"),
        signature_s=int.from_bytes(blob[0x2E8:0x2E8 + SIGNATURE_COMPONENT], "little"))
    if report.signature_algo != ECDSA_P384_SHA384:
        raise AttestationFailed("sev-snp.signature-algo", f"signature algorithm {report.signature_algo}, expected "
                                                          f"{ECDSA_P384_SHA384} (ECDSA P-384 with SHA-384)")
    return report


def debug_allowed(report: SnpReport) -> bool:
    """The guest policy's DEBUG bit: the host may then read and change the guest's memory."""
    return bool(report.policy & POLICY_DEBUG)


def parse_cert_table(auxblob: bytes) -> dict[str, bytes]:
    """The GUID table of configfs-tsm's `auxblob` (an extended report's certificates): {"vcek"|"ask"|...: DER}.

    Offsets count from the table's start; GUIDs this code does not know are skipped.
    """
    out: dict[str, bytes] = {}
    for i in range(0, len(auxblob) - _TABLE_ENTRY + 1, _TABLE_ENTRY):
        entry = auxblob[i:i + _TABLE_ENTRY]
        if entry == bytes(_TABLE_ENTRY):
            return out
        guid, (offset, length) = entry[:16], struct.unpack_from("<II", entry, 16)
        if offset + length > len(auxblob):
            raise AttestationFailed("sev-snp.certificates", f"certificate table entry {i // _TABLE_ENTRY} runs to "
                                                            f"byte {offset + length}, past the end ({len(auxblob)})")
        name = CERT_GUIDS.get(guid)
        if name in out:
            raise AttestationFailed("sev-snp.certificates", f"the certificate table holds two {name.upper()}s")
        if name:
            out[name] = auxblob[offset:offset + length]
    raise AttestationFailed("sev-snp.certificates", "the certificate table has no terminating all-zero entry")


def _cert(data: bytes, name: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            # AMD's KDS issues every VCEK with serial number 0, which cryptography warns about (RFC 5280).
            warnings.filterwarnings("ignore", message=".*serial number.*")
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise AttestationFailed("sev-snp.certificates", f"the {name} is not an X.509 certificate ({exc})") from None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate, check: str, what: str) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationFailed(check, f"{what}: its issuer's key is not RSA, as AMD's are")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise AttestationFailed(check, f"{what}: RSA-PSS SHA-384 signature by "
                                       f"{issuer.subject.rfc4514_string()[:40]} does not verify") from None


def verify_chain(certs: dict[str, bytes], trusted_arks: Sequence[bytes], signer: str = "vcek") -> x509.Certificate:
    """The VCEK (or VLEK) once ARK (pinned, self-signed) -> ASK (or ASVK) -> it all verify.

    Without an "ark" in `certs`, the pinned ARK that signed the ASK stands in. A VLEK's ASVK is "asvk" or,
    as hosts put it in the table, "ask".
    """
    if not trusted_arks:
        raise AttestationFailed("sev-snp.ark-pinned", "no AMD root (ARK) is pinned; pin the ARK of your product")
    pinned = [_cert(r, "pinned ARK") for r in trusted_arks]
    ica_name = "asvk" if signer == "vlek" and "asvk" in certs else "ask"
    for name in (signer, ica_name):
        if name not in certs:
            raise AttestationFailed("sev-snp.certificates", f"no {name.upper()} among the certificates "
                                                            f"({', '.join(sorted(certs)) or 'none'})")
    ica, leaf = _cert(certs[ica_name], ica_name.upper()), _cert(certs[signer], signer.upper())
    ark = _cert(certs["ark"], "ARK") if "ark" in certs else _issuer_among(ica, pinned)
    if _spki(ark) not in {_spki(p) for p in pinned}:
        raise AttestationFailed("sev-snp.ark-pinned", f"the ARK ({ark.subject.rfc4514_string()[:60]}) is not one "
                                                      f"of the {len(pinned)} pinned AMD root(s)")
    _signed_by(ark, ark, "sev-snp.ark-signature", "the ARK is not self-signed")
    _signed_by(ica, ark, f"sev-snp.{ica_name}-signature", f"the {ica_name.upper()} is not signed by the ARK")
    _signed_by(leaf, ica, f"sev-snp.{signer}-signature",
               f"the {signer.upper()} is not signed by the {ica_name.upper()}")
    return leaf


def _issuer_among(cert: x509.Certificate, candidates: Sequence[x509.Certificate]) -> x509.Certificate:
    """The candidate whose key signed `cert`; the first where none did (its ASK check then fails)."""
    for candidate in candidates:
        try:
            _signed_by(cert, candidate, "sev-snp.ask-signature", "")
            return candidate
        except AttestationFailed:
            continue
    return candidates[0]


def verify_report(report: bytes, certs: dict[str, bytes], trusted_arks: Sequence[bytes]) -> SnpReport:
    """The parsed report, once the chain to a pinned ARK, the report's signature and the VCEK's TCB and chip verify.

    `certs` maps "ark", "ask", "vcek" (or "vlek", with "asvk" or "ask") to DER or PEM, as parse_cert_table
    gives them; `trusted_arks` are the PEM or DER ARKs the caller pins. Policy (measurement, debug, minimum
    TCB) is the caller's.
    """
    parsed = parse_report(report)
    signer = parsed.signing_key
    if signer not in ("vcek", "vlek") or parsed.mask_chip_key:
        raise AttestationFailed("sev-snp.signing-key", f"the report is signed by {signer}"
                                                       f"{' (chip key masked)' if parsed.mask_chip_key else ''}; "
                                                       "expected a VCEK or VLEK signature")
    leaf = verify_chain(certs, trusted_arks, signer)
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationFailed(f"sev-snp.{signer}-signature", f"the {signer.upper()}'s key is not ECDSA P-384")
    try:
        key.verify(encode_dss_signature(parsed.signature_r, parsed.signature_s), report[:SIGNED_BYTES],
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationFailed("sev-snp.report-signature", "the report's ECDSA P-384 signature does not verify "
                                                            f"with the {signer.upper()}") from None
    _fits(leaf, parsed, signer)
    return parsed


def _fits(leaf: x509.Certificate, report: SnpReport, signer: str) -> None:
    """A VCEK is issued for one chip at one TCB, a VLEK for one TCB: they must be the report's."""
    exts = {e.oid.dotted_string: e.value for e in leaf.extensions}
    parts = {**TCB_OIDS, **({"fmc": FMC_OID} if report.turin else {})}
    for part, oid in parts.items():
        have = _der_integer(_ext(exts, oid, part, signer), part, signer)
        want = getattr(report.reported_tcb, part)
        if have != want:
            raise AttestationFailed("sev-snp.tcb-mismatch", f"the {signer.upper()} is for {part} SPL {have}, the "
                                                            f"report's reported TCB says {want}")
    if signer == "vcek":
        hwid = _hwid(_ext(exts, HWID_OID, "hwID", signer), report.turin)
        if hwid != report.chip_id[:len(hwid)]:
            raise AttestationFailed("sev-snp.chip-id", f"the VCEK is for chip {hwid[:8].hex()}…, the report comes "
                                                       f"from chip {report.chip_id[:8].hex()}…")


def _ext(exts: dict[str, x509.ExtensionType], oid: str, part: str, signer: str) -> bytes:
    value = exts.get(oid)
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationFailed("sev-snp.vcek-extensions", f"the {signer.upper()} has no {part} extension ({oid})")
    return value.value


def _der_integer(raw: bytes, part: str, signer: str) -> int:
    """AMD encodes each SPL as a DER INTEGER (02 01 73; 02 02 00 d9 above 127)."""
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2 or raw[1] > 2:
        raise AttestationFailed("sev-snp.vcek-extensions", f"the {signer.upper()}'s {part} extension is "
                                                           f"{raw[:8].hex()}, not a small DER INTEGER")
    return int.from_bytes(raw[2:], "big", signed=True)


def _hwid(raw: bytes, turin: bool) -> bytes:
    """The KDS puts the chip id bare in the extension (Turin: its first 8 bytes); a DER OCTET STRING is taken too."""
    if len(raw) in (10, 66) and raw[0] == 0x04 and raw[1] == len(raw) - 2:
        raw = raw[2:]
    sizes = (8, 64) if turin else (64,)
    if len(raw) not in sizes:
        raise AttestationFailed("sev-snp.vcek-extensions", f"the VCEK's hwID extension has {len(raw)} bytes, "
                                                           f"expected {' or '.join(map(str, sizes))}")
    return raw
