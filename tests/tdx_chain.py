"""A throw-away Intel-shaped DCAP chain (root, PCK CA, PCK, TCB signer, CRLs, QE) signing TDX quotes, for tests."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

# A standalone helper process (tsm_double.py) imports this with only tests/ on its path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_client.attestation.tdx import (  # noqa: E402
    ATTESTATION_KEY_ECDSA_P256,
    CERT_PCK_CHAIN,
    CERT_QE_REPORT,
    FMSPC_OID,
    INTEL_QE_VENDOR_ID,
    PCE_ID_OID,
    QE_REPORT_SIZE,
    SGX_EXTENSIONS_OID,
    TCB_OID,
    TD_ATTRIBUTES_DEBUG,
    TEE_TDX,
)

SEPT_VE_DISABLE = 1 << 28            # TD_ATTRIBUTES bit a production TD sets (dcap-qvl requires it)
QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")   # INIT | MODE64BIT, no DEBUG


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Throw-away test chain (not Intel)")])


def _der(tag: int, body: bytes) -> bytes:
    n, width = len(body), (len(body).bit_length() + 7) // 8
    size = bytes([n]) if n < 0x80 else bytes([0x80 | width]) + n.to_bytes(width, "big")
    return bytes([tag]) + size + body


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, body)


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _der(0x30, _der_oid(oid) + value)


def sgx_extensions(components: tuple[int, ...], pcesvn: int, fmspc: bytes, pce_id: bytes) -> bytes:
    """The SGX Extensions value of a PCK certificate (PPID, TCB, PCE-ID, FMSPC, SGX type), DER."""
    tcb = b"".join(_pair(f"{TCB_OID}.{i + 1}", _der_int(svn)) for i, svn in enumerate(components))
    tcb += _pair(f"{TCB_OID}.17", _der_int(pcesvn)) + _pair(f"{TCB_OID}.18", _der(0x04, bytes(components)))
    return _der(0x30, _pair(f"{SGX_EXTENSIONS_OID}.1", _der(0x04, bytes(16))) + _pair(TCB_OID, _der(0x30, tcb))
                + _pair(PCE_ID_OID, _der(0x04, pce_id)) + _pair(FMSPC_OID, _der(0x04, fmspc))
                + _pair(f"{SGX_EXTENSIONS_OID}.5", _der(0x0A, b"\x00")))


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """An ECDSA P-256 SHA-256 signature as Intel's structures hold it: r || s, 32 bytes each."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


class TdxTestChain:
    """Every key and certificate of a DCAP platform, P-256 throughout, valid from a day ago for a year; the
    CRLs, TCB info and QE identity from an hour ago for 30 days (Intel's are current for a month).

    The TCB info has an UpToDate level at the chain's TCB (`components`, `pcesvn`, `tee_tcb_svn`) and an
    OutOfDate one with TEE_TCB_SVN[2] one lower (advisory INTEL-SA-TEST-1); its TDX module identity has an
    UpToDate level at TEE_TCB_SVN[0] and an OutOfDate one two below (INTEL-SA-TEST-2). A quote signed with
    a lower `tee_tcb_svn` falls to those.
    """

    def __init__(self, *, components: tuple[int, ...] = (3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8, pcesvn: int = 13,
                 tee_tcb_svn: bytes = bytes([6, 1, 3]) + bytes(13), fmspc: bytes = bytes.fromhex("b0c06f000000"),
                 now: dt.datetime | None = None) -> None:
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.components, self.pcesvn, self.tee_tcb_svn, self.fmspc = components, pcesvn, tee_tcb_svn, fmspc
        self.pce_id = bytes(2)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        self.tcb_key = ec.generate_private_key(ec.SECP256R1())
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self.issue("Test SGX Root CA", self.root_key, "Test SGX Root CA", self.root_key, ca=True)
        self.ca = self.issue("Test SGX PCK Platform CA", self.ca_key, "Test SGX Root CA", self.root_key, ca=True)
        self.pck = self.issue_pck()
        self.tcb_signer = self.issue("Test SGX TCB Signing", self.tcb_key, "Test SGX Root CA", self.root_key)
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)
        self.qe_auth_data = os.urandom(32)
        self.revoked_pcks: list[int] = []
        self.revoked_cas: list[int] = []

    def issue(self, subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
              extensions: tuple[tuple[str, bytes], ...] = (), days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(self.now + dt.timedelta(days=days[0]))
             .not_valid_after(self.now + dt.timedelta(days=days[1]))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for oid, value in extensions:
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def issue_pck(self, *, components: tuple[int, ...] | None = None, pcesvn: int | None = None,
                  fmspc: bytes | None = None, key: ec.EllipticCurvePrivateKey | None = None,
                  days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
        """A PCK certificate of this platform (or the TCB, FMSPC, key given), issued by the PCK CA."""
        value = sgx_extensions(components or self.components, self.pcesvn if pcesvn is None else pcesvn,
                               fmspc or self.fmspc, self.pce_id)
        return self.issue("Test SGX PCK Certificate", key or self.pck_key, "Test SGX PCK Platform CA", self.ca_key,
                          extensions=((SGX_EXTENSIONS_OID, value),), days=days)

    def pck_chain_pem(self) -> bytes:
        return _pem(self.pck, self.ca, self.root).encode()

    # --- the quote ---------------------------------------------------------------------------------------

    def qe_report(self) -> bytes:
        """The QE's SGX report, vouching for the attestation key and QE auth data."""
        point = self.attestation_key.public_key().public_bytes(serialization.Encoding.X962,
                                                               serialization.PublicFormat.UncompressedPoint)[1:]
        report = bytearray(QE_REPORT_SIZE)
        report[0:16] = bytes(self.components)
        report[48:64] = QE_ATTRIBUTES
        report[64:96] = hashlib.sha256(b"test QE").digest()
        report[128:160] = QE_MRSIGNER
        struct.pack_into("<HH", report, 256, 2, 4)           # ISVPRODID 2 (TD_QE), ISVSVN 4
        report[320:384] = hashlib.sha256(point + self.qe_auth_data).digest() + bytes(32)
        return bytes(report)

    def body(self, report_data: bytes, mrtd: bytes, *, debug: bool = False, tee_tcb_svn: bytes | None = None,
             rtmrs: tuple[bytes, ...] = (bytes(48),) * 4) -> bytes:
        """A TD report of TDX 1.0 (584 bytes)."""
        attributes = SEPT_VE_DISABLE | (TD_ATTRIBUTES_DEBUG if debug else 0)
        return b"".join([tee_tcb_svn or self.tee_tcb_svn, hashlib.sha384(b"test TDX module").digest(), bytes(48),
                         bytes(8), struct.pack("<Q", attributes), struct.pack("<Q", 0xE7), mrtd.ljust(48, b"\0"),
                         bytes(48 * 3), *rtmrs, report_data.ljust(64, b"\0")])

    def quote(self, report_data: bytes, mrtd: bytes, *, version: int = 4, debug: bool = False,
              tee_tcb_svn: bytes | None = None, rtmrs: tuple[bytes, ...] = (bytes(48),) * 4) -> bytes:
        """A quote of a TD with this MRTD and report data (v4, or v5 with a TD 1.0 body), signed end to end."""
        header = struct.pack("<HHI", version, ATTESTATION_KEY_ECDSA_P256, TEE_TDX) + bytes(4) + INTEL_QE_VENDOR_ID
        header += bytes(20)
        body = self.body(report_data, mrtd, debug=debug, tee_tcb_svn=tee_tcb_svn, rtmrs=rtmrs)
        if version == 5:
            body = struct.pack("<HI", 2, len(body)) + body
        return self.sign(header + body)

    def sign(self, signed: bytes, *, qe_report: bytes | None = None, pck_chain: bytes | None = None) -> bytes:
        """Header and body with signature data: the attestation key's signature, the QE report signed by
        the PCK key, the QE auth data and the PCK chain (`qe_report`, `pck_chain` replace this chain's)."""
        qe_report = qe_report or self.qe_report()
        qe_sig = raw_signature(self.pck_key, qe_report)
        chain = pck_chain if pck_chain is not None else self.pck_chain_pem()
        inner = struct.pack("<HI", CERT_PCK_CHAIN, len(chain)) + chain
        cert_data = qe_report + qe_sig + struct.pack("<H", len(self.qe_auth_data)) + self.qe_auth_data + inner
        point = self.attestation_key.public_key().public_bytes(serialization.Encoding.X962,
                                                               serialization.PublicFormat.UncompressedPoint)[1:]
        sig_data = (raw_signature(self.attestation_key, signed) + point
                    + struct.pack("<HI", CERT_QE_REPORT, len(cert_data)) + cert_data)
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    # --- the collateral ----------------------------------------------------------------------------------

    def _stamp(self, hours: float) -> str:
        return (self.now + dt.timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def tcb_info(self) -> dict[str, Any]:
        def level(sgx: tuple[int, ...], pcesvn: int, tdx: bytes, status: str, advisories: list[str]) -> dict[str, Any]:
            out: dict[str, Any] = {"tcb": {"sgxtcbcomponents": [{"svn": s} for s in sgx], "pcesvn": pcesvn,
                                           "tdxtcbcomponents": [{"svn": s} for s in tdx]},
                                   "tcbDate": self._stamp(-24 * 30), "tcbStatus": status}
            if advisories:
                out["advisoryIDs"] = advisories
            return out

        svn = self.tee_tcb_svn
        lower_tdx = svn[:2] + bytes([max(0, svn[2] - 1)]) + svn[3:]
        module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        module_levels = [{"tcb": {"isvsvn": svn[0]}, "tcbDate": self._stamp(-24 * 30), "tcbStatus": "UpToDate"},
                         {"tcb": {"isvsvn": max(0, svn[0] - 2)}, "tcbDate": self._stamp(-24 * 60),
                          "tcbStatus": "OutOfDate", "advisoryIDs": ["INTEL-SA-TEST-2"]}]
        return {"id": "TDX", "version": 3, "issueDate": self._stamp(-1), "nextUpdate": self._stamp(24 * 30),
                "fmspc": self.fmspc.hex().upper(), "pceId": self.pce_id.hex(), "tcbType": 0,
                "tcbEvaluationDataNumber": 17, "tdxModule": module,
                "tdxModuleIdentities": [{"id": f"TDX_{svn[1]:02X}", **module, "tcbLevels": module_levels}],
                "tcbLevels": [level(self.components, self.pcesvn, svn, "UpToDate", []),
                              level(self.components, self.pcesvn, lower_tdx, "OutOfDate", ["INTEL-SA-TEST-1"])]}

    def qe_identity(self) -> dict[str, Any]:
        return {"id": "TD_QE", "version": 2, "issueDate": self._stamp(-1), "nextUpdate": self._stamp(24 * 30),
                "tcbEvaluationDataNumber": 17, "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
                "attributes": QE_ATTRIBUTES.hex().upper(), "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
                "mrsigner": QE_MRSIGNER.hex().upper(), "isvprodid": 2,
                "tcbLevels": [{"tcb": {"isvsvn": 4}, "tcbDate": self._stamp(-24 * 30), "tcbStatus": "UpToDate"}]}

    def crl(self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int],
            hours: tuple[float, float] = (-1, 24 * 30)) -> bytes:
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
             .last_update(self.now + dt.timedelta(hours=hours[0]))
             .next_update(self.now + dt.timedelta(hours=hours[1]))
             .add_extension(x509.CRLNumber(1), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
        for serial in revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                          .revocation_date(self.now - dt.timedelta(hours=2)).build())
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def collateral_dict(self, *, tcb_info: dict[str, Any] | None = None,
                        qe_identity: dict[str, Any] | None = None) -> dict[str, str]:
        """The collateral (dcap-qvl's QuoteCollateralV3 as JSON), each signed part signed by this chain."""
        tcb_text = json.dumps(tcb_info or self.tcb_info(), separators=(",", ":"))
        qe_text = json.dumps(qe_identity or self.qe_identity(), separators=(",", ":"))
        signing = _pem(self.tcb_signer, self.root)
        return {"pck_crl_issuer_chain": _pem(self.ca, self.root),
                "root_ca_crl": self.crl(self.root, self.root_key, self.revoked_cas).hex(),
                "pck_crl": self.crl(self.ca, self.ca_key, self.revoked_pcks).hex(),
                "tcb_info_issuer_chain": signing, "tcb_info": tcb_text,
                "tcb_info_signature": raw_signature(self.tcb_key, tcb_text.encode()).hex(),
                "qe_identity_issuer_chain": signing, "qe_identity": qe_text,
                "qe_identity_signature": raw_signature(self.tcb_key, qe_text.encode()).hex()}

    def collateral(self, **changes: Any) -> bytes:
        return json.dumps(self.collateral_dict(**changes), indent=1).encode()
