"""Intel TDX quotes (DCAP v4, v5): parse them; verify PCK chain, signatures and TCB with Intel's collateral.

What `verify_quote` checks, each failure an AttestationFailed naming its check (`tdx.…`):

- the quote: version 4 or 5, TEE type TDX (0x81), ECDSA P-256 attestation key, Intel's QE vendor id
  (`tdx.quote-format`, `tdx.quote-version`, `tdx.tee-type`, `tdx.attestation-key-type`, `tdx.qe-vendor`);
- the PCK chain the quote carries (certification data type 6, the QE report, holding type 5, a PEM chain):
  PCK -> PCK Platform/Processor CA -> the pinned Intel SGX Root CA, each signature and each validity period at
  `now` (`tdx.root-pinned`, `tdx.pck-chain`, `tdx.certificate-expired`), and the PCK's SGX extensions
  (`tdx.pck-extensions`);
- the QE report's signature by the PCK key (`tdx.qe-report-signature`), its report data = SHA-256(attestation
  key || QE authentication data) || 32 zero bytes (`tdx.qe-report-data`), and the quote's signature by the
  attestation key over header and TD report (`tdx.quote-signature`);
- the collateral: the root CA CRL signed by the root, the PCK CRL signed by the PCK's issuer (whose chain is
  `pck_crl_issuer_chain`), both current at `now` (`tdx.crl`, `tdx.collateral-expired`), and revoking neither
  the PCK (`tdx.pck-revoked`) nor an intermediate (`tdx.ca-revoked`); the TCB info and QE identity signed by
  Intel's TCB signing certificate, chained to the root (`tdx.tcb-signing-chain`, `tdx.tcb-info-signature`,
  `tdx.qe-identity-signature`), both current (`tdx.collateral-expired`), for TDX (`tdx.tcb-info`,
  `tdx.qe-identity`) and for this platform's FMSPC and PCE-ID (`tdx.fmspc`, `tdx.pce-id`);
- the QE against its identity: MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES under their masks
  (`tdx.qe-identity`), its ISVSVN at some TCB level (`tdx.qe-tcb`);
- the TDX module (TEE_TCB_SVN[1] is its major version; for version > 0 the `tdxModuleIdentities` entry
  `TDX_%02X`): MRSIGNER_SEAM and SEAM_ATTRIBUTES under the mask, ISVSVN (TEE_TCB_SVN[0]) at some level
  (`tdx.module-identity`);
- the platform's TCB level: the first level whose SGX components and PCESVN (from the PCK certificate)
  and TDX components (TEE_TCB_SVN; from index 2 where the module version is > 0, its first two bytes
  being the module's, judged above) are each at least the level's (`tdx.tcb-level`).

The result is the platform level's status, lowered by the TDX module's and the QE's as Intel's QVL does
(OutOfDate there makes UpToDate or SWHardeningNeeded OutOfDate, and the Configuration… statuses
OutOfDateConfigurationNeeded), with the advisory IDs of all three; Revoked fails (`tdx.tcb-revoked`).
Whether the status is good enough, and the measurements, are the caller's policy (evidence.py).

Collateral is one JSON object, the format of Phala Network's dcap-qvl `QuoteCollateralV3` (what its
`get_collateral` fetches from a PCCS or Intel's PCS, serialised), so existing tools can fetch it:

    {"pck_crl_issuer_chain": PEM text (the PCK CA, then the root),
     "root_ca_crl": hex of the DER root CA CRL,
     "pck_crl": hex of the DER PCK CRL (of the Platform or Processor CA that issued the PCK),
     "tcb_info_issuer_chain": PEM text (the TCB signing certificate, then the root),
     "tcb_info": the `tcbInfo` JSON object of PCS /tdx/certification/v4/tcb, the exact text Intel signed,
     "tcb_info_signature": hex of its signature (r || s, 64 bytes),
     "qe_identity_issuer_chain": PEM text, "qe_identity": the `enclaveIdentity` object of
     /tdx/certification/v4/qe/identity, exact text, "qe_identity_signature": hex}

Other keys (dcap-qvl's optional `pck_certificate_chain`) are ignored: the PCK chain comes from the quote.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edge_client.attestation.errors import AttestationFailed

# Intel TDX DCAP Quoting Library API, appendix A.3 (quote v4) and A.4 (v5).
HEADER_SIZE = 48
TD10_SIZE = 584               # TD report body of TDX 1.0
TD15_SIZE = 648               # TDX 1.5: TEE_TCB_SVN_2 and MRSERVICETD follow
TEE_TDX = 0x81
ATTESTATION_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_TYPES = {2: TD10_SIZE, 3: TD15_SIZE}   # v5 body descriptor: 1 is an SGX enclave report
QE_REPORT_SIZE = 384          # an SGX REPORT body
CERT_PCK_CHAIN = 5            # certification data: PCK leaf, intermediate CA, root, as PEM
CERT_QE_REPORT = 6            # certification data: QE report, its signature, QE auth data, type 5 inside
TD_ATTRIBUTES_DEBUG = 1       # bit 0 of TD_ATTRIBUTES (TUD.DEBUG)
SGX_ATTRIBUTES_DEBUG = 0x02   # bit 1 of an SGX enclave's ATTRIBUTES

# Intel SGX PCK Certificate and CRL Profile: the SGX Extensions of a PCK certificate.
SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_SGX = SGX_EXTENSIONS_OID
TCB_OID, PCE_ID_OID, FMSPC_OID = f"{_SGX}.2", f"{_SGX}.3", f"{_SGX}.4"
PCESVN_ARC, CPUSVN_ARC = 17, 18   # under TCB_OID: .1 to .16 the SGX TCB components, .17 PCESVN, .18 CPUSVN

COLLATERAL_FIELDS = ("pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
                     "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature")
TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
                "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked")


@dataclass(frozen=True)
class QeReport:
    """The fields of the Quoting Enclave's SGX report that its identity is checked on."""

    cpu_svn: bytes
    misc_select: bytes          # 4 bytes, little-endian as in the report
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> QeReport:
        prod, svn = struct.unpack_from("<HH", raw, 256)
        return cls(cpu_svn=raw[0:16], misc_select=raw[16:20], attributes=raw[48:64], mr_enclave=raw[64:96],
                   mr_signer=raw[128:160], isv_prod_id=prod, isv_svn=svn, report_data=raw[320:384])


@dataclass(frozen=True)
class QuoteSignature:
    """The quote's ECDSA signature data: what signs the quote, and what vouches for that key."""

    signature: bytes            # r || s over header and body, by the attestation key
    attestation_key: bytes      # P-256 point x || y
    qe_report_raw: bytes
    qe_report_signature: bytes  # r || s over the QE report, by the PCK key
    qe_auth_data: bytes
    pck_chain_pem: bytes

    @property
    def qe_report(self) -> QeReport:
        return QeReport.parse(self.qe_report_raw)


@dataclass(frozen=True)
class TdxQuote:
    """Every field of a TD quote's header and TD report, and its signature data."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int              # 2: TD report of TDX 1.0; 3: of TDX 1.5 (v5 quotes only)
    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None  # TDX 1.5 only
    mrservicetd: bytes | None   # TDX 1.5 only
    signed: bytes               # header and body: what the attestation key signs
    signature_data: QuoteSignature

    def claims(self) -> dict[str, object]:
        """A JSON-serialisable summary, bytes as hex, for the run record."""
        out: dict[str, object] = {
            "version": self.version, "debug": debug_td(self), "mrtd": self.mrtd.hex(),
            "rtmrs": [r.hex() for r in self.rtmrs], "report_data": self.report_data.hex(),
            "td_attributes": self.td_attributes.hex(), "xfam": self.xfam.hex(), "mrseam": self.mrseam.hex(),
            "mrsignerseam": self.mrsignerseam.hex(), "seam_attributes": self.seam_attributes.hex(),
            "mrconfigid": self.mrconfigid.hex(), "mrowner": self.mrowner.hex(),
            "mrownerconfig": self.mrownerconfig.hex(), "tee_tcb_svn": self.tee_tcb_svn.hex()}
        if self.tee_tcb_svn2 is not None and self.mrservicetd is not None:
            out.update(tee_tcb_svn2=self.tee_tcb_svn2.hex(), mrservicetd=self.mrservicetd.hex())
        return out


@dataclass(frozen=True)
class TdxVerified:
    quote: TdxQuote
    tcb_status: str
    advisory_ids: tuple[str, ...]


class _Reader:
    """Reads a quote front to back; running off its end is a malformed quote, named by the field."""

    def __init__(self, blob: bytes) -> None:
        self.blob, self.at = blob, 0

    def take(self, size: int, what: str) -> bytes:
        if self.at + size > len(self.blob):
            raise AttestationFailed("tdx.quote-format", f"the quote's {what} (bytes {self.at}..{self.at + size}) "
                                                        f"runs past its end ({len(self.blob)} bytes)")
        out = self.blob[self.at:self.at + size]
        self.at += size
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def parse_quote(blob: bytes) -> TdxQuote:
    """The quote's fields; AttestationFailed for a malformed quote, another version, TEE or key type."""
    r = _Reader(bytes(blob))
    version, key_type, tee_type = struct.unpack("<HHI", r.take(8, "header"))
    r.take(4, "header")
    vendor, user_data = r.take(16, "QE vendor id"), r.take(20, "user data")
    if version not in (4, 5):
        raise AttestationFailed("tdx.quote-version", f"quote version {version}, expected 4 or 5 (TDX)")
    if tee_type != TEE_TDX:
        raise AttestationFailed("tdx.tee-type", f"TEE type {tee_type:#x}, expected {TEE_TDX:#x} (TDX; 0 is SGX)")
    if key_type != ATTESTATION_KEY_ECDSA_P256:
        raise AttestationFailed("tdx.attestation-key-type", f"attestation key type {key_type}, expected "
                                                            f"{ATTESTATION_KEY_ECDSA_P256} (ECDSA P-256)")
    body_type = 2
    if version == 5:
        body_type, size = r.u16("body type"), r.u32("body size")
        if BODY_TYPES.get(body_type) != size:
            raise AttestationFailed("tdx.quote-format", f"v5 body type {body_type} of {size} bytes; expected a "
                                                        "TD report (type 2: 584 bytes, type 3: 648)")
    body = r.take(BODY_TYPES[body_type], "TD report")
    signed = r.blob[:r.at]
    fields = [body[a:b] for a, b in _TD10_FIELDS]
    extra = (body[584:600], body[600:648]) if body_type == 3 else (None, None)
    sig_size = r.u32("signature data size")
    # Quote buffers often hold more after the signature data (zeros, or stale bytes of a larger buffer, in
    # real quotes too); nothing signs or vouches for them, and they are ignored, as dcap-qvl does.
    sig_data = r.take(sig_size, "signature data")
    (tee_tcb_svn, mrseam, mrsignerseam, seam_attributes, td_attributes, xfam, mrtd, mrconfigid, mrowner,
     mrownerconfig, rtmr0, rtmr1, rtmr2, rtmr3, report_data) = fields
    return TdxQuote(version=version, attestation_key_type=key_type, tee_type=tee_type, qe_vendor_id=vendor,
                    user_data=user_data, body_type=body_type, tee_tcb_svn=tee_tcb_svn, mrseam=mrseam,
                    mrsignerseam=mrsignerseam, seam_attributes=seam_attributes, td_attributes=td_attributes,
                    xfam=xfam, mrtd=mrtd, mrconfigid=mrconfigid, mrowner=mrowner, mrownerconfig=mrownerconfig,
                    rtmrs=(rtmr0, rtmr1, rtmr2, rtmr3), report_data=report_data, tee_tcb_svn2=extra[0],
                    mrservicetd=extra[1], signed=signed, signature_data=_signature(_Reader(sig_data)))


# (start, end) of TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAMATTRIBUTES, TDATTRIBUTES, XFAM, MRTD, MRCONFIGID,
# MROWNER, MROWNERCONFIG, RTMR0..3, REPORTDATA in a TD report body.
_TD10_SIZES = (16, 48, 48, 8, 8, 8, 48, 48, 48, 48, 48, 48, 48, 48, 64)
_TD10_FIELDS = [(sum(_TD10_SIZES[:i]), sum(_TD10_SIZES[:i + 1])) for i in range(len(_TD10_SIZES))]


def _signature(r: _Reader) -> QuoteSignature:
    signature, key = r.take(64, "quote signature"), r.take(64, "attestation key")
    cert_type, cert_size = r.u16("certification data type"), r.u32("certification data size")
    if cert_type != CERT_QE_REPORT:
        raise AttestationFailed("tdx.quote-format", f"certification data type {cert_type}, expected "
                                                    f"{CERT_QE_REPORT} (QE report certification data)")
    if cert_size != len(r.blob) - r.at:
        raise AttestationFailed("tdx.quote-format", f"the certification data is said to have {cert_size} bytes, "
                                                    f"the signature data holds {len(r.blob) - r.at}")
    qe_report, qe_sig = r.take(QE_REPORT_SIZE, "QE report"), r.take(64, "QE report signature")
    auth = r.take(r.u16("QE auth data size"), "QE auth data")
    inner_type, inner_size = r.u16("PCK certification data type"), r.u32("PCK certification data size")
    if inner_type != CERT_PCK_CHAIN:
        raise AttestationFailed("tdx.quote-format", f"the QE report's certification data has type {inner_type}, "
                                                    f"expected {CERT_PCK_CHAIN} (the PCK chain as PEM)")
    chain = r.take(inner_size, "PCK certificate chain")
    if r.at != len(r.blob):
        raise AttestationFailed("tdx.quote-format", f"{len(r.blob) - r.at} bytes follow the PCK chain inside the "
                                                    "signature data")
    return QuoteSignature(signature, key, qe_report, qe_sig, auth, chain.rstrip(b"\0"))


def debug_td(quote: TdxQuote) -> bool:
    """TD_ATTRIBUTES' DEBUG bit: the host may then read and change the TD's memory and state."""
    return bool(quote.td_attributes[0] & TD_ATTRIBUTES_DEBUG)


def verify_quote(quote: bytes, collateral: bytes, trusted_root: bytes,
                 now: dt.datetime | None = None) -> TdxVerified:
    """The parsed quote with its TCB status and advisory IDs, once every check of the module docstring passes.

    `collateral` is the JSON above, `trusted_root` the PEM (or DER) of the root to pin (Intel SGX Root CA),
    `now` the time at which certificates, CRLs and collateral must be valid (default: the current time).
    """
    at = _utc(now)
    parsed = parse_quote(quote)
    if parsed.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise AttestationFailed("tdx.qe-vendor", f"QE vendor id {parsed.qe_vendor_id.hex()}, expected Intel's "
                                                 f"{INTEL_QE_VENDOR_ID.hex()}")
    root = _pinned_root(trusted_root, at)
    col = _collateral(collateral)
    sig = parsed.signature_data
    pck, pck_ca = _chain(_certs(sig.pck_chain_pem, "the quote's PCK chain", "tdx.pck-chain"), root, at,
                         "tdx.pck-chain", "the PCK chain")
    _verify_raw(pck.public_key(), sig.qe_report_signature, sig.qe_report_raw, "tdx.qe-report-signature",
                "the QE report's signature does not verify with the PCK certificate's key")
    qe = sig.qe_report
    expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest() + bytes(32)
    if qe.report_data != expected:
        raise AttestationFailed("tdx.qe-report-data", "the QE report does not vouch for this attestation key: "
                                                      f"its report data is {qe.report_data[:8].hex()}…, "
                                                      f"SHA-256(key || auth data) is {expected[:8].hex()}…")
    _verify_raw(_p256(sig.attestation_key), sig.signature, parsed.signed, "tdx.quote-signature",
                "the quote's signature does not verify with the attestation key the QE vouches for")
    root_crl = _revocation(col, root, pck, pck_ca, at)
    tcb_info = _signed_json(col, "tcb_info", root, root_crl, at, "tdx.tcb-info-signature")
    qe_identity = _signed_json(col, "qe_identity", root, root_crl, at, "tdx.qe-identity-signature")
    platform = _pck_tcb(pck)
    try:
        status, advisories = _platform_level(tcb_info, parsed, platform)
        others = (_module_level(tcb_info, parsed), _qe_level(qe_identity, qe))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:   # signed by Intel, yet not as specified
        raise AttestationFailed("tdx.tcb-info", f"the TCB info or QE identity is malformed ({type(exc).__name__}: "
                                                f"{exc})") from None
    for other in others:
        if other is not None:
            status = _converge(status, other[0])
            advisories += tuple(a for a in other[1] if a not in advisories)
    if status == "Revoked":
        raise AttestationFailed("tdx.tcb-revoked", f"Intel lists this platform's TCB as revoked (advisories "
                                                   f"{', '.join(advisories) or 'none'})")
    return TdxVerified(parsed, status, advisories)


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.timezone.utc)


# --- certificates and CRLs -------------------------------------------------------------------------------

def _certs(pem: bytes, what: str, check: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise AttestationFailed(check, f"{what} is not a PEM certificate chain ({exc})") from None
    return certs


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _name(cert: x509.Certificate) -> str:
    """The subject's common name ("Intel SGX PCK Platform CA"), or the whole subject where it has none."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()[:60]


def _pinned_root(trusted_root: bytes, at: dt.datetime) -> x509.Certificate:
    try:
        if trusted_root.lstrip().startswith(b"-----BEGIN"):
            root = x509.load_pem_x509_certificate(trusted_root)
        else:
            root = x509.load_der_x509_certificate(trusted_root)
    except ValueError as exc:
        raise AttestationFailed("tdx.root-pinned", f"the pinned root is not an X.509 certificate ({exc})") from None
    _issued_by(root, root, "tdx.root-pinned", "the pinned root is not self-signed")
    _valid_at(root, at)
    return root


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, check: str, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AttestationFailed(check, f"{what}: {_name(cert)} is not signed by {_name(issuer)} "
                                       f"({exc or type(exc).__name__})") from None


def _valid_at(cert: x509.Certificate, at: dt.datetime) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise AttestationFailed("tdx.certificate-expired", f"{_name(cert)} is valid "
                                                           f"{cert.not_valid_before_utc:%Y-%m-%d} – "
                                                           f"{cert.not_valid_after_utc:%Y-%m-%d}, not at "
                                                           f"{at:%Y-%m-%d %H:%M}")


def _chain(certs: Sequence[x509.Certificate], root: x509.Certificate, at: dt.datetime, check: str,
           what: str) -> tuple[x509.Certificate, x509.Certificate]:
    """(leaf, its issuer) once leaf -> intermediates -> the pinned root verify; a chain's own root must be it."""
    pinned = _spki(root)
    if certs and certs[-1].issuer == certs[-1].subject:
        if _spki(certs[-1]) != pinned:
            raise AttestationFailed("tdx.root-pinned", f"{what} ends at {_name(certs[-1])}, which is not the "
                                                       f"pinned root ({_name(root)})")
        certs = certs[:-1]
    if not certs:
        raise AttestationFailed(check, f"{what} holds no certificate below the root")
    path = [*certs, root]
    for cert, issuer in zip(path, path[1:]):
        _issued_by(cert, issuer, check, f"{what} does not verify")
        _valid_at(cert, at)
    for ca in path[1:-1]:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value \
            if _has(ca, x509.BasicConstraints) else None
        if constraints is None or not constraints.ca:
            raise AttestationFailed(check, f"{what}: {_name(ca)} signs certificates but is not a CA")
    return path[0], path[1]


def _has(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    try:
        cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return False
    return True


def _crl(raw: bytes, issuer: x509.Certificate, at: dt.datetime, what: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(raw)
    except ValueError as exc:
        raise AttestationFailed("tdx.crl", f"the {what} is not a DER CRL ({exc})") from None
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise AttestationFailed("tdx.crl", f"the {what} is not signed by {_name(issuer)}")
    if crl.next_update_utc is None or not crl.last_update_utc <= at <= crl.next_update_utc:
        raise AttestationFailed("tdx.collateral-expired", f"the {what} is current {crl.last_update_utc:%Y-%m-%d} – "
                                                          f"{crl.next_update_utc or 'never'}, not at "
                                                          f"{at:%Y-%m-%d %H:%M}: fetch fresh collateral")
    return crl


def _revocation(col: dict[str, Any], root: x509.Certificate, pck: x509.Certificate, pck_ca: x509.Certificate,
                at: dt.datetime) -> x509.CertificateRevocationList:
    """The root CA CRL, once both CRLs verify and revoke neither the PCK nor its CA."""
    root_crl = _crl(col["root_ca_crl"], root, at, "root CA CRL")
    crl_issuer, _ = _chain(_certs(col["pck_crl_issuer_chain"].encode(), "pck_crl_issuer_chain", "tdx.crl"), root,
                           at, "tdx.crl", "the PCK CRL's issuer chain")
    pck_crl = _crl(col["pck_crl"], crl_issuer, at, "PCK CRL")
    if pck_crl.issuer != pck.issuer or _spki(crl_issuer) != _spki(pck_ca):
        raise AttestationFailed("tdx.crl", f"the PCK CRL is {pck_crl.issuer.rfc4514_string()[:60]}'s; the PCK was "
                                           f"issued by {pck.issuer.rfc4514_string()[:60]}")
    if pck_crl.get_revoked_certificate_by_serial_number(pck.serial_number) is not None:
        raise AttestationFailed("tdx.pck-revoked", f"Intel revoked this platform's PCK certificate (serial "
                                                   f"{pck.serial_number:x})")
    for ca in {_spki(c): c for c in (pck_ca, crl_issuer)}.values():
        if root_crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None:
            raise AttestationFailed("tdx.ca-revoked", f"Intel revoked {_name(ca)} (root CA CRL)")
    return root_crl


# --- collateral ------------------------------------------------------------------------------------------

def _collateral(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AttestationFailed("tdx.collateral", "the collateral is not JSON (dcap-qvl's QuoteCollateralV3)") \
            from None
    if not isinstance(doc, dict):
        raise AttestationFailed("tdx.collateral", "the collateral is not a JSON object")
    missing = [f for f in COLLATERAL_FIELDS if not isinstance(doc.get(f), str)]
    if missing:
        raise AttestationFailed("tdx.collateral", f"the collateral lacks {', '.join(missing)} (text fields of "
                                                  "dcap-qvl's QuoteCollateralV3)")
    out: dict[str, Any] = {f: doc[f] for f in COLLATERAL_FIELDS}
    for f in ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature"):
        try:
            out[f] = bytes.fromhex(doc[f])
        except ValueError:
            raise AttestationFailed("tdx.collateral", f"the collateral's {f} is not hex") from None
    return out


def _signed_json(col: dict[str, Any], name: str, root: x509.Certificate, root_crl: x509.CertificateRevocationList,
                 at: dt.datetime, check: str) -> dict[str, Any]:
    """The TCB info or QE identity object, once its signature by the TCB signing certificate and dates hold."""
    signer, _ = _chain(_certs(col[f"{name}_issuer_chain"].encode(), f"{name}_issuer_chain", "tdx.tcb-signing-chain"),
                       root, at, "tdx.tcb-signing-chain", f"the {name} issuer chain")
    if root_crl.get_revoked_certificate_by_serial_number(signer.serial_number) is not None:
        raise AttestationFailed("tdx.ca-revoked", f"Intel revoked {_name(signer)} (root CA CRL)")
    text: str = col[name]
    _verify_raw(signer.public_key(), col[f"{name}_signature"], text.encode(), check,
                f"the {name} signature does not verify with {_name(signer)}")
    try:
        doc = json.loads(text)
        issued, next_update = _date(doc["issueDate"]), _date(doc["nextUpdate"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AttestationFailed(f"tdx.{name.replace('_', '-')}", f"the {name} is not a TCB info / identity object "
                                                                 f"({type(exc).__name__}: {exc})") from None
    if not issued <= at <= next_update:
        raise AttestationFailed("tdx.collateral-expired", f"the {name} is current {issued:%Y-%m-%d} – "
                                                          f"{next_update:%Y-%m-%d}, not at {at:%Y-%m-%d %H:%M}: "
                                                          "fetch fresh collateral")
    return dict(doc)


def _date(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def _verify_raw(key: Any, signature: bytes, data: bytes, check: str, what: str) -> None:
    """An ECDSA P-256 SHA-256 signature given as r || s (32 bytes each), as Intel's structures hold them."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationFailed(check, f"{what} (the key is not ECDSA P-256)")
    if len(signature) != 64:
        raise AttestationFailed(check, f"{what} (a signature of {len(signature)} bytes, expected 64)")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationFailed(check, what) from None


def _p256(point: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + point)
    except ValueError:
        raise AttestationFailed("tdx.quote-signature", "the attestation key is not a P-256 point") from None


# --- the PCK certificate's SGX extensions ----------------------------------------------------------------

@dataclass(frozen=True)
class PckTcb:
    """What the PCK certificate says of the platform: its SGX TCB components, PCESVN, FMSPC and PCE-ID."""

    sgx_components: tuple[int, ...]
    pcesvn: int
    cpusvn: bytes
    fmspc: bytes
    pce_id: bytes


def _tlvs(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """The DER elements one after another in `data` (tag, contents); single-byte tags only, as Intel uses."""
    out, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise AttestationFailed("tdx.pck-extensions", f"{what}: truncated DER")
        tag, length, i = data[i], data[i + 1], i + 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or i + n > len(data):
                raise AttestationFailed("tdx.pck-extensions", f"{what}: bad DER length")
            length, i = int.from_bytes(data[i:i + n], "big"), i + n
        if i + length > len(data):
            raise AttestationFailed("tdx.pck-extensions", f"{what}: DER runs past its end")
        out.append((tag, data[i:i + length]))
        i += length
    return out


def _oid(contents: bytes) -> str:
    arcs, value = [], 0
    for b in contents:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2) if arcs else 0
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]])) if arcs else ""


def _pairs(seq: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """A SEQUENCE OF SEQUENCE {OID, value}: {oid: (value tag, value contents)}."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, item in _tlvs(seq, what):
        parts = _tlvs(item, what)
        if tag != 0x30 or len(parts) != 2 or parts[0][0] != 0x06:
            raise AttestationFailed("tdx.pck-extensions", f"{what}: an entry is not SEQUENCE {{OID, value}}")
        out[_oid(parts[0][1])] = parts[1]
    return out


def _pck_tcb(pck: x509.Certificate) -> PckTcb:
    try:
        ext = pck.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID)).value
    except x509.ExtensionNotFound:
        raise AttestationFailed("tdx.pck-extensions", "the PCK certificate has no SGX extensions "
                                                      f"({SGX_EXTENSIONS_OID})") from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    outer = _tlvs(raw, "SGX extensions")
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise AttestationFailed("tdx.pck-extensions", "the SGX extensions are not one SEQUENCE")
    top = _pairs(outer[0][1], "SGX extensions")
    need = {TCB_OID: 0x30, PCE_ID_OID: 0x04, FMSPC_OID: 0x04}
    for oid, tag in need.items():
        if top.get(oid, (-1, b""))[0] != tag:
            raise AttestationFailed("tdx.pck-extensions", f"the SGX extensions lack {oid}")
    tcb = _pairs(top[TCB_OID][1], "SGX TCB")
    ints = {}
    for arc in range(1, PCESVN_ARC + 1):
        tag, value = tcb.get(f"{TCB_OID}.{arc}", (-1, b""))
        if tag != 0x02 or not value:
            raise AttestationFailed("tdx.pck-extensions", f"the SGX TCB lacks INTEGER {TCB_OID}.{arc}")
        ints[arc] = int.from_bytes(value, "big", signed=True)
    cpusvn = tcb.get(f"{TCB_OID}.{CPUSVN_ARC}", (0x04, b""))[1]
    return PckTcb(sgx_components=tuple(ints[a] for a in range(1, 17)), pcesvn=ints[PCESVN_ARC], cpusvn=cpusvn,
                  fmspc=top[FMSPC_OID][1], pce_id=top[PCE_ID_OID][1])


# --- TCB levels ------------------------------------------------------------------------------------------

Level = tuple[str, tuple[str, ...]]


def _hex(doc: dict[str, Any], key: str, size: int, check: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(str(doc[key]))
    except (KeyError, ValueError):
        raise AttestationFailed(check, f"the {what} has no hex {key}") from None
    if len(value) != size:
        raise AttestationFailed(check, f"the {what}'s {key} has {len(value)} bytes, expected {size}")
    return value


def _masked(have: bytes, want: bytes, mask: bytes) -> bool:
    return all((h & m) == (w & m) for h, w, m in zip(have, want, mask, strict=True))


def _status(level: dict[str, Any], check: str) -> Level:
    status = str(level.get("tcbStatus"))
    if status not in TCB_STATUSES:
        raise AttestationFailed(check, f"unknown TCB status {status!r}")
    return status, tuple(str(a) for a in level.get("advisoryIDs", []))


def _svns(components: Any, check: str) -> tuple[int, ...]:
    if not isinstance(components, list) or len(components) != 16:
        raise AttestationFailed(check, "a TCB level does not list 16 components")
    return tuple(int(c["svn"]) for c in components)


def _platform_level(tcb_info: dict[str, Any], quote: TdxQuote, pck: PckTcb) -> Level:
    check = "tdx.tcb-info"
    if tcb_info.get("id") != "TDX" or tcb_info.get("version") != 3:
        raise AttestationFailed(check, f"the TCB info is {tcb_info.get('id')} version {tcb_info.get('version')}, "
                                       "expected TDX version 3 (PCS /tdx/certification/v4/tcb)")
    fmspc = _hex(tcb_info, "fmspc", 6, check, "TCB info")
    if fmspc != pck.fmspc:
        raise AttestationFailed("tdx.fmspc", f"the TCB info is for FMSPC {fmspc.hex()}, the PCK certificate's "
                                             f"platform is {pck.fmspc.hex()}")
    pce_id = _hex(tcb_info, "pceId", 2, check, "TCB info")
    if pce_id != pck.pce_id:
        raise AttestationFailed("tdx.pce-id", f"the TCB info is for PCE-ID {pce_id.hex()}, the PCK certificate "
                                              f"says {pck.pce_id.hex()}")
    levels = []
    for level in tcb_info.get("tcbLevels", []):
        tcb = level.get("tcb", {})
        levels.append((_svns(tcb.get("sgxtcbcomponents"), check), int(tcb.get("pcesvn", 1 << 16)),
                       _svns(tcb.get("tdxtcbcomponents"), check), level))
    # Intel lists the levels highest first; sorted here too, as Intel's QVL keeps them.
    levels.sort(key=lambda t: (t[0], t[1], t[2]), reverse=True)
    # From TDX module version 1 on, TEE_TCB_SVN[0:2] are the module's SVN and version, which its identity's
    # levels judge (_module_level): the platform's levels compare the rest, as Intel's QVL does.
    first = 2 if quote.tee_tcb_svn[1] > 0 else 0
    for sgx, pcesvn, tdx, level in levels:
        if (all(h >= w for h, w in zip(pck.sgx_components, sgx)) and pck.pcesvn >= pcesvn
                and all(h >= w for h, w in zip(quote.tee_tcb_svn[first:], tdx[first:]))):
            return _status(level, check)
    raise AttestationFailed("tdx.tcb-level", f"no TCB level of the TCB info fits this platform (SGX components "
                                             f"{list(pck.sgx_components)}, PCESVN {pck.pcesvn}, TEE_TCB_SVN "
                                             f"{quote.tee_tcb_svn.hex()}): not supported by Intel")


def _module_level(tcb_info: dict[str, Any], quote: TdxQuote) -> Level | None:
    """The TDX module's identity and, for module versions > 0, its TCB level (None: nothing to fold in)."""
    check = "tdx.module-identity"
    isvsvn, major = quote.tee_tcb_svn[0], quote.tee_tcb_svn[1]
    module = tcb_info.get("tdxModule")
    identities = tcb_info.get("tdxModuleIdentities") or []
    if not isinstance(module, dict):
        raise AttestationFailed(check, "the TCB info has no tdxModule")
    levels = None
    if major > 0 and identities:
        wanted = f"TDX_{major:02X}"
        found = [i for i in identities if str(i.get("id", "")).upper() == wanted]
        if not found:
            raise AttestationFailed(check, f"the TCB info knows no TDX module {wanted} (TEE_TCB_SVN[1] = {major})")
        module, levels = found[0], found[0].get("tcbLevels", [])
    mrsigner = _hex(module, "mrsigner", 48, check, "TDX module identity")
    attributes = _hex(module, "attributes", 8, check, "TDX module identity")
    mask = _hex(module, "attributesMask", 8, check, "TDX module identity")
    if quote.mrsignerseam != mrsigner:
        raise AttestationFailed(check, f"MRSIGNER_SEAM {quote.mrsignerseam.hex()[:16]}…, Intel's module is "
                                       f"signed by {mrsigner.hex()[:16]}…")
    if not _masked(quote.seam_attributes, attributes, mask) or any(
            a & ~m & 0xFF for a, m in zip(quote.seam_attributes, mask)):
        raise AttestationFailed(check, f"SEAM_ATTRIBUTES {quote.seam_attributes.hex()}, expected "
                                       f"{attributes.hex()} under mask {mask.hex()}")
    if levels is None:
        return None
    for level in levels:
        if isvsvn >= int(level.get("tcb", {}).get("isvsvn", 1 << 16)):
            return _status(level, check)
    raise AttestationFailed(check, f"the TDX module's SVN {isvsvn} is below every TCB level of TDX_{major:02X}")


def _qe_level(identity: dict[str, Any], qe: QeReport) -> Level:
    check = "tdx.qe-identity"
    if identity.get("id") != "TD_QE" or identity.get("version") not in (2, 3):
        raise AttestationFailed(check, f"the QE identity is {identity.get('id')} version {identity.get('version')}, "
                                       "expected TD_QE version 2 (PCS /tdx/certification/v4/qe/identity)")
    mrsigner = _hex(identity, "mrsigner", 32, check, "QE identity")
    if qe.mr_signer != mrsigner:
        raise AttestationFailed(check, f"the QE's MRSIGNER {qe.mr_signer.hex()[:16]}… is not Intel's "
                                       f"{mrsigner.hex()[:16]}…")
    if qe.isv_prod_id != int(identity.get("isvprodid", -1)):
        raise AttestationFailed(check, f"the QE's ISVPRODID is {qe.isv_prod_id}, expected {identity.get('isvprodid')}")
    for field, have, size in (("miscselect", qe.misc_select, 4), ("attributes", qe.attributes, 16)):
        want = _hex(identity, field, size, check, "QE identity")
        mask = _hex(identity, f"{field}Mask", size, check, "QE identity")
        if not _masked(have, want, mask):
            raise AttestationFailed(check, f"the QE's {field.upper()} {have.hex()} is not {want.hex()} under mask "
                                           f"{mask.hex()}")
    if qe.attributes[0] & SGX_ATTRIBUTES_DEBUG:
        raise AttestationFailed(check, "the QE is a debug enclave")
    for level in identity.get("tcbLevels", []):
        if qe.isv_svn >= int(level.get("tcb", {}).get("isvsvn", 1 << 16)):
            return _status(level, check)
    raise AttestationFailed("tdx.qe-tcb", f"the QE's ISVSVN {qe.isv_svn} is below every level of its identity")


def _converge(platform: str, other: str) -> str:
    """The platform's status lowered by the TDX module's or the QE's, as Intel's QVL converges them."""
    if other == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform
