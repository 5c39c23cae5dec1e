"""SEV-SNP report and chain verification: a throw-away chain, each tampering refused by name, and real AMD evidence."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from snp_chain import SnpTestChain, der_int

from edge_client.attestation import sev_snp
from edge_client.attestation.errors import AttestationFailed
from edge_client.attestation.sev_snp import TcbVersion

ROOTS = Path(sev_snp.__file__).parent / "roots"
DATA = Path(__file__).parents[1] / "data" / "sev_snp"
MEASUREMENT = bytes(range(48))
REPORT_DATA = bytes(range(100, 164))
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@pytest.fixture(scope="module")
def chain() -> SnpTestChain:
    return SnpTestChain()


@pytest.fixture(scope="module")
def other() -> SnpTestChain:
    return SnpTestChain()


def refused(check: str, report: bytes, certs: dict[str, bytes], arks: list[bytes]) -> AttestationFailed:
    with pytest.raises(AttestationFailed) as failed:
        sev_snp.verify_report(report, certs, arks)
    assert failed.value.check == check, failed.value
    return failed.value


# --- the throw-away chain -------------------------------------------------------------------------------------

def test_throwaway_chain_verifies_and_fields_round_trip(chain):
    report = sev_snp.verify_report(chain.report(REPORT_DATA, MEASUREMENT, vmpl=1), chain.certs(), [chain.ark_pem])
    assert (report.report_data, report.measurement, report.chip_id) == (REPORT_DATA, MEASUREMENT, chain.chip_id)
    assert report.reported_tcb == report.current_tcb == report.committed_tcb == report.launch_tcb == chain.tcb
    assert (report.vmpl, report.policy, report.signing_key, report.current_version) == (1, 0x30000, "vcek", (1, 55, 21))
    assert not sev_snp.debug_allowed(report)
    claims = json.loads(json.dumps(report.claims()))
    assert claims["measurement"] == MEASUREMENT.hex() and claims["reported_tcb"] == chain.tcb.as_dict()


def test_pem_certificates_and_der_roots_are_taken(chain):
    pem = {n: x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
           for n, d in chain.certs().items()}
    sev_snp.verify_report(chain.report(REPORT_DATA, MEASUREMENT), pem, [chain.certs()["ark"]])


def test_without_an_ark_in_the_table_the_pinned_one_stands_in(chain, other):
    certs = {n: d for n, d in chain.certs().items() if n != "ark"}
    sev_snp.verify_report(chain.report(REPORT_DATA, MEASUREMENT), certs, [other.ark_pem, chain.ark_pem])
    # No pinned ARK signed this ASK.
    refused("sev-snp.ask-signature", chain.report(REPORT_DATA, MEASUREMENT), certs, [other.ark_pem])


def test_debug_bit(chain):
    report = sev_snp.parse_report(chain.report(REPORT_DATA, MEASUREMENT, policy=0x30000 | sev_snp.POLICY_DEBUG))
    assert sev_snp.debug_allowed(report) and report.claims()["debug"] is True


@pytest.mark.parametrize("offset", [0x90, 0xBF, 0x50, 0x8F, 0x00 + 4, 0x180 + 7, 0x2A0, 0x2E8 + 10])
def test_flipped_byte_breaks_the_signature(chain, offset):
    blob = bytearray(chain.report(REPORT_DATA, MEASUREMENT))
    blob[offset] ^= 0x01
    refused("sev-snp.report-signature", bytes(blob), chain.certs(), [chain.ark_pem])


def test_bytes_after_the_signature_are_not_signed_but_harmless(chain):
    blob = bytearray(chain.report(REPORT_DATA, MEASUREMENT))
    blob[-1] ^= 0xFF   # reserved; outside what AMD signs, and never read
    assert sev_snp.verify_report(bytes(blob), chain.certs(), [chain.ark_pem]).measurement == MEASUREMENT


def test_chain_is_checked_link_by_link(chain, other):
    report = chain.report(REPORT_DATA, MEASUREMENT)
    refused("sev-snp.vcek-signature", report, {**chain.certs(), "vcek": other.certs()["vcek"]}, [chain.ark_pem])
    refused("sev-snp.ask-signature", report, {**chain.certs(), "ask": other.certs()["ask"]}, [chain.ark_pem])
    refused("sev-snp.ark-pinned", report, chain.certs(), [other.ark_pem])
    refused("sev-snp.ark-pinned", report, chain.certs(), [])
    # Another chain's whole table, pinned: the chain holds but its VCEK did not sign this report.
    refused("sev-snp.report-signature", report, other.certs(), [other.ark_pem])


def test_ark_must_be_self_signed(chain, other):
    """A certificate with the pinned ARK's key but signed by someone else is not the ARK."""
    forged = (x509.CertificateBuilder().subject_name(chain.ark.subject).issuer_name(chain.ark.subject)
              .public_key(chain.ark_key.public_key()).serial_number(1).not_valid_before(chain.ark.not_valid_before_utc)
              .not_valid_after(chain.ark.not_valid_after_utc).sign(other.ark_key, hashes.SHA384(), rsa_padding=PSS))
    certs = {**chain.certs(), "ark": forged.public_bytes(serialization.Encoding.DER)}
    refused("sev-snp.ark-signature", chain.report(REPORT_DATA, MEASUREMENT), certs, [chain.ark_pem])


def test_vcek_must_be_for_the_reported_tcb(chain):
    report = chain.report(REPORT_DATA, MEASUREMENT)
    for part in ("bootloader", "tee", "snp", "microcode"):
        tcb = TcbVersion(**{**chain.tcb.as_dict(), part: getattr(chain.tcb, part) + 1})
        failed = refused("sev-snp.tcb-mismatch", report, {**chain.certs(), "vcek": chain.issue_vcek(tcb=tcb)},
                         [chain.ark_pem])
        assert part in failed.detail
    newer = TcbVersion(chain.tcb.bootloader, chain.tcb.tee, chain.tcb.snp + 1, chain.tcb.microcode)
    refused("sev-snp.tcb-mismatch", chain.report(REPORT_DATA, MEASUREMENT, tcb=newer), chain.certs(), [chain.ark_pem])


def test_vcek_must_be_for_the_reporting_chip(chain):
    report = chain.report(REPORT_DATA, MEASUREMENT)
    refused("sev-snp.chip-id", report, {**chain.certs(), "vcek": chain.issue_vcek(hwid=os.urandom(64))},
            [chain.ark_pem])
    refused("sev-snp.vcek-extensions", report, {**chain.certs(), "vcek": chain.issue_vcek(hwid=os.urandom(8))},
            [chain.ark_pem])


def test_vcek_hwid_as_der_octet_string_is_taken(chain):
    wrapped = bytes([0x04, 64]) + chain.chip_id
    sev_snp.verify_report(chain.report(REPORT_DATA, MEASUREMENT), {**chain.certs(), "vcek": chain.issue_vcek(
        hwid=wrapped)}, [chain.ark_pem])


@pytest.mark.parametrize("oid", [*sev_snp.TCB_OIDS.values(), sev_snp.HWID_OID])
def test_vcek_without_an_amd_extension_is_refused(chain, oid):
    certs = {**chain.certs(), "vcek": chain.issue_vcek(drop=(oid,))}
    refused("sev-snp.vcek-extensions", chain.report(REPORT_DATA, MEASUREMENT), certs, [chain.ark_pem])


def test_vcek_must_be_p384(chain):
    p256 = ec.generate_private_key(ec.SECP256R1())
    certs = {**chain.certs(), "vcek": chain.issue_vcek(key=p256)}
    refused("sev-snp.vcek-signature", chain.report(REPORT_DATA, MEASUREMENT), certs, [chain.ark_pem])


@pytest.mark.parametrize("cut", [0, 1, 0x2A0, sev_snp.REPORT_SIZE - 1, sev_snp.REPORT_SIZE + 1])
def test_wrong_size_report_is_refused(chain, cut):
    blob = chain.report(REPORT_DATA, MEASUREMENT)
    blob = blob[:cut] if cut < len(blob) else blob + b"\0"
    refused("sev-snp.report-size", blob, chain.certs(), [chain.ark_pem])


@pytest.mark.parametrize("offset, value, check", [(0x00, 1, "sev-snp.report-version"),
                                                  (0x00, 6, "sev-snp.report-version"),
                                                  (0x34, 2, "sev-snp.signature-algo"),
                                                  (0x48, 7 << 2, "sev-snp.signing-key"),
                                                  (0x48, 0b10, "sev-snp.signing-key")])
def test_header_fields_are_checked_even_when_signed(chain, offset, value, check):
    blob = bytearray(chain.report(REPORT_DATA, MEASUREMENT))
    struct.pack_into("<I", blob, offset, value)
    refused(check, chain.sign(bytes(blob)), chain.certs(), [chain.ark_pem])


def test_missing_or_garbled_certificates(chain):
    report = chain.report(REPORT_DATA, MEASUREMENT)
    no_vcek = {n: d for n, d in chain.certs().items() if n != "vcek"}
    refused("sev-snp.certificates", report, no_vcek, [chain.ark_pem])
    refused("sev-snp.certificates", report, {**chain.certs(), "ask": b"not a certificate"}, [chain.ark_pem])


def test_turin_layout_and_fmc():
    turin = SnpTestChain(tcb=TcbVersion(bootloader=1, tee=2, snp=3, microcode=0xDB, fmc=4))
    blob = turin.report(REPORT_DATA, MEASUREMENT)
    assert blob[0x180:0x188] == bytes([4, 1, 2, 3, 0, 0, 0, 0xDB])
    report = sev_snp.verify_report(blob, turin.certs(), [turin.ark_pem])
    assert report.turin and report.reported_tcb == turin.tcb and report.claims()["reported_tcb"]["fmc"] == 4
    wrong_fmc = TcbVersion(1, 2, 3, 0xDB, fmc=5)
    refused("sev-snp.tcb-mismatch", blob, {**turin.certs(), "vcek": turin.issue_vcek(tcb=wrong_fmc)}, [turin.ark_pem])
    refused("sev-snp.chip-id", blob, {**turin.certs(), "vcek": turin.issue_vcek(hwid=os.urandom(8))},
            [turin.ark_pem])


def test_vlek_signed_report():
    vlek = SnpTestChain(vlek=True)
    blob = vlek.report(REPORT_DATA, MEASUREMENT)
    report = sev_snp.verify_report(blob, vlek.certs(), [vlek.ark_pem])
    assert report.signing_key == "vlek" and report.chip_id == bytes(64)
    certs = {**vlek.certs()}
    certs["asvk"] = certs.pop("ask")
    sev_snp.verify_report(blob, certs, [vlek.ark_pem])
    refused("sev-snp.certificates", blob, {n: d for n, d in vlek.certs().items() if n != "vlek"}, [vlek.ark_pem])


def test_tcb_version_layouts_round_trip():
    for tcb in (TcbVersion(3, 0, 8, 115), TcbVersion(1, 2, 3, 255, fmc=9)):
        assert TcbVersion.from_u64(tcb.to_u64(), turin=tcb.fmc is not None) == tcb
    assert TcbVersion.from_u64(0x7308_0000_0000_0003) == TcbVersion(3, 0, 8, 0x73)


def test_der_int_encodes_as_amd_does():
    assert der_int(0x73) == bytes.fromhex("020173") and der_int(0xD9) == bytes.fromhex("020200d9")


# --- the certificate table ------------------------------------------------------------------------------------

def test_cert_table_round_trip(chain):
    assert sev_snp.parse_cert_table(chain.auxblob()) == chain.certs()
    # The kernel hands over a page-sized buffer: zero padding after the table is fine.
    assert sev_snp.parse_cert_table(chain.auxblob() + bytes(4096)) == chain.certs()


def _table(entries: list[tuple[bytes, bytes]], terminate: bool = True) -> bytes:
    offset = 24 * (len(entries) + terminate)
    head, body = b"", b""
    for guid, data in entries:
        head += guid + struct.pack("<II", offset + len(body), len(data))
        body += data
    return head + (bytes(24) if terminate else b"") + body


def test_cert_table_faults():
    vcek = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le
    unknown = uuid.uuid4().bytes_le
    assert sev_snp.parse_cert_table(_table([(unknown, b"x"), (vcek, b"der")])) == {"vcek": b"der"}
    assert sev_snp.parse_cert_table(bytes(24)) == {}
    for bad in (_table([(vcek, b"a"), (vcek, b"b")]), _table([(vcek, b"der")], terminate=False), b"",
                vcek + struct.pack("<II", 48, 1000) + bytes(24)):
        with pytest.raises(AttestationFailed) as failed:
            sev_snp.parse_cert_table(bad)
        assert failed.value.check == "sev-snp.certificates"


# --- AMD's real roots and recorded real evidence (tests/data/sev_snp/README.md) ----------------------------------

def _pem(name: str) -> bytes:
    return (ROOTS / name).read_bytes()


REAL = {  # name: (report bytes, certificates, product)
    "virtee-milan": (lambda: bytes.fromhex((DATA / "virtee_milan_report.hex").read_text().strip()),
                     {"vcek": "virtee_milan_vcek.der"}, "milan"),
    "go-sev-guest-milan": (lambda: (DATA / "gosevguest_milan_attestation.bin").read_bytes(),
                           {"vcek": "gosevguest_milan_vcek.der"}, "milan"),
    "trustee-aws-milan-vlek": (lambda: (DATA / "trustee_milan_vlek_report.bin").read_bytes(),
                               {"vlek": "trustee_milan_vlek.der"}, "milan"),
    # An Azure CVM's HCL report: a 32-byte header, then the SNP report.
    "trustee-azure-genoa": (lambda: bytes(json.loads((DATA / "trustee_azure_genoa_evidence.json").read_text())
                                          ["report"])[0x20:0x20 + sev_snp.REPORT_SIZE],
                            {"vcek": "trustee_azure_genoa_vcek.pem"}, "genoa"),
}


def _real(name: str) -> tuple[bytes, dict[str, bytes], str]:
    load, files, product = REAL[name]
    certs = {role: (DATA / f).read_bytes() for role, f in files.items()}
    certs["ask"] = _pem(f"{'asvk' if 'vlek' in certs else 'ask'}_{product}.pem")
    certs["ark"] = _pem(f"amd_ark_{product}.pem")
    return load(), certs, product


def _der(data: bytes) -> bytes:
    """PEM to DER without parsing (cryptography warns about the serial number 0 of AMD's VCEKs)."""
    match = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.S)
    return base64.b64decode(match.group(1)) if match else data


def all_arks() -> list[bytes]:
    return [p.read_bytes() for p in sorted(ROOTS.glob("amd_ark_*.pem"))]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_amd_evidence_verifies(name):
    blob, certs, product = _real(name)
    report = sev_snp.verify_report(blob, certs, [_pem(f"amd_ark_{product}.pem")])
    assert report.signing_key == ("vlek" if "vlek" in certs else "vcek")
    assert sev_snp.verify_report(blob, certs, all_arks()) == report
    # The same evidence as the kernel's table would carry it.
    table = _table([(g, _der(certs[n])) for g, n in sev_snp.CERT_GUIDS.items() if n in certs])
    assert sev_snp.verify_report(blob, sev_snp.parse_cert_table(table), all_arks()) == report


def test_real_milan_report_fields():
    report = sev_snp.verify_report(*_real("virtee-milan")[:2], all_arks())
    assert report.reported_tcb == TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)
    assert report.chip_id.hex().startswith("d49554ec717f4e5b") and report.policy == 0x30000
    assert report.measurement.hex().startswith("7a1e5c266c0108db")
    genoa = sev_snp.verify_report(*_real("trustee-azure-genoa")[:2], all_arks())
    assert (genoa.version, genoa.cpuid_family, genoa.cpuid_model) == (3, 0x19, 0x11)
    assert genoa.reported_tcb == TcbVersion(bootloader=10, tee=0, snp=23, microcode=84)


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("offset", [0x50, 0x90, 0x1A0, 0x2A0])
def test_tampered_real_evidence_is_refused(name, offset):
    blob, certs, product = _real(name)
    tampered = bytearray(blob)
    tampered[offset] ^= 0x80
    refused("sev-snp.report-signature", bytes(tampered), certs, [_pem(f"amd_ark_{product}.pem")])


def test_real_evidence_under_wrong_roots_or_keys():
    blob, certs, _ = _real("virtee-milan")
    refused("sev-snp.ark-pinned", blob, certs, [_pem("amd_ark_genoa.pem"), _pem("amd_ark_turin.pem")])
    refused("sev-snp.ask-signature", blob, {**certs, "ask": _pem("ask_genoa.pem")}, all_arks())
    refused("sev-snp.vcek-signature", blob, {**certs, "ask": _pem("asvk_milan.pem")}, all_arks())
    # A real VCEK of another Milan chip: AMD-signed, but it did not sign this report.
    other_vcek = (DATA / "gosevguest_milan_vcek.der").read_bytes()
    refused("sev-snp.report-signature", blob, {**certs, "vcek": other_vcek}, all_arks())
    # A real VCEK whose extensions are tampered no longer carries AMD's signature.
    vcek = bytearray(certs["vcek"])
    microcode = bytes.fromhex("2b060104019c7801030804030201")   # OID ...3704.1.3.8, then OCTET STRING { INTEGER
    at = vcek.find(microcode) + len(microcode)
    assert vcek[at] == 115
    vcek[at] = 116
    refused("sev-snp.vcek-signature", blob, {**certs, "vcek": bytes(vcek)}, all_arks())


def test_real_turin_vcek_chains_to_the_turin_ark():
    certs = {"ask": _pem("ask_turin.pem"), "ark": _pem("amd_ark_turin.pem"),
             "vcek": (DATA / "virtee_turin_vcek.der").read_bytes()}
    leaf = sev_snp.verify_chain(certs, all_arks())
    assert leaf.subject.rfc4514_string().startswith("CN=SEV-VCEK")
    with pytest.raises(AttestationFailed) as failed:
        sev_snp.verify_chain({**certs, "ask": _pem("ask_milan.pem"), "ark": _pem("amd_ark_milan.pem")}, all_arks())
    assert failed.value.check == "sev-snp.vcek-signature"


@pytest.mark.parametrize("product", ["milan", "genoa", "turin"])
def test_pinned_roots_are_amds_and_listed(product):
    ark, ask, asvk = (x509.load_pem_x509_certificate(_pem(f)) for f in (f"amd_ark_{product}.pem",
                                                                        f"ask_{product}.pem", f"asvk_{product}.pem"))
    for cert in (ark, ask, asvk):   # RSA-PSS SHA-384 by the ARK, or this raises InvalidSignature
        ark.public_key().verify(cert.signature, cert.tbs_certificate_bytes, PSS, hashes.SHA384())
    assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product.capitalize()},O=Advanced Micro Devices")
    readme = (ROOTS / "README.md").read_text()
    for cert in (ark, ask, asvk):
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert re.search(fingerprint, readme), f"{cert.subject.rfc4514_string()} is not listed in roots/README.md"


def test_data_files_match_their_recorded_digests():
    readme = (DATA / "README.md").read_text()
    for path in sorted(DATA.iterdir()):
        if path.name != "README.md":
            assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, path.name
