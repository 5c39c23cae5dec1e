"""TDX quote verification: real Intel-signed quotes, each tampering refused by name, a throw-away DCAP chain,
and agreement with dcap-qvl (an independent verifier). End to end: tests/test_attestation_tdx.py."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tdx_chain import TdxTestChain

from edge_client.attestation import tdx
from edge_client.attestation.errors import AttestationFailed

try:
    import dcap_qvl
except ImportError:   # pragma: no cover - the test extras install it
    dcap_qvl = None

DATA = Path(__file__).parents[1] / "data" / "tdx"
ROOTS = Path(tdx.__file__).parent / "roots"
INTEL_ROOT = (ROOTS / "intel_sgx_root_ca.pem").read_bytes()
INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"   # of its DER
MRTD = bytes(range(48))
REPORT_DATA = bytes(range(100, 164))
UTC = dt.timezone.utc

# Real quotes and their collateral, recorded in public test data (provenance: data/tdx/README.md). The
# collateral was current for a month when recorded and is long expired: each is verified at a `now` inside
# its validity window (every CRL, the TCB info and the QE identity current), given here.
REAL = {
    # v4 quote (TD 1.0) of an Intel platform with FMSPC B0C06F000000; collateral of 2025-06-19.
    "v4": ("dcapqvl_tdx_quote.bin", "dcapqvl_tdx_quote_collateral.json", dt.datetime(2025, 7, 1, tzinfo=UTC)),
    # v5 quote (TD 1.5 body), FMSPC 90C06F000000; collateral of 2026-02-18, whose TCB levels all need an SGX
    # TCB component 8 of at least 5 where this platform's PCK says 3: Intel does not support that TCB.
    "v5": ("dcapqvl_tdx_quote_v5_unsupported_tcb.bin", "dcapqvl_tdx_quote_v5_unsupported_tcb_collateral.json",
           dt.datetime(2026, 3, 1, tzinfo=UTC)),
}

needs_dcap_qvl = pytest.mark.skipif(dcap_qvl is None, reason="needs dcap-qvl, Phala's independent DCAP verifier "
                                                             "(pip install dcap-qvl==0.7.0; in the test extras)")


def real(name: str) -> tuple[bytes, bytes, dt.datetime]:
    quote, collateral, now = REAL[name]
    return (DATA / quote).read_bytes(), (DATA / collateral).read_bytes(), now


def refused(check: str, quote: bytes, collateral: bytes, root: bytes, now: dt.datetime | None = None
            ) -> AttestationFailed:
    with pytest.raises(AttestationFailed) as failed:
        tdx.verify_quote(quote, collateral, root, now)
    assert failed.value.check == check, failed.value
    return failed.value


def edit_collateral(collateral: bytes, **changes: str) -> bytes:
    return json.dumps({**json.loads(collateral), **changes}).encode()


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1:]


def signature_offset(quote: bytes) -> int:
    """Where the signature data starts (after its 4-byte size)."""
    parsed = tdx.parse_quote(quote)
    return len(parsed.signed) + 4


@pytest.fixture(scope="module")
def chain() -> TdxTestChain:
    return TdxTestChain()


# --- real Intel-signed quotes ---------------------------------------------------------------------------------

def test_real_v4_quote_verifies_up_to_date():
    quote, collateral, now = real("v4")
    verified = tdx.verify_quote(quote, collateral, INTEL_ROOT, now)
    assert (verified.tcb_status, verified.advisory_ids) == ("UpToDate", ())
    q = verified.quote
    assert (q.version, q.body_type, q.tee_tcb_svn[:3]) == (4, 2, bytes([6, 1, 3]))
    assert q.mrtd.hex().startswith("91eb2b44") and not tdx.debug_td(q)
    claims = json.loads(json.dumps(q.claims()))
    assert claims["mrtd"] == q.mrtd.hex() and len(claims["rtmrs"]) == 4 and claims["debug"] is False


def test_real_v5_quote_passes_every_signature_and_fails_only_its_unsupported_tcb():
    quote, collateral, now = real("v5")
    q = tdx.parse_quote(quote)
    assert (q.version, q.body_type) == (5, 3) and q.tee_tcb_svn2 is not None and q.mrservicetd == bytes(48)
    failed = refused("tdx.tcb-level", quote, collateral, INTEL_ROOT, now)
    assert "PCESVN 13" in failed.detail


def test_real_collateral_is_expired_now():
    """Verified at the current time, Intel's month-long collateral of the recordings has long expired."""
    quote, collateral, _ = real("v4")
    refused("tdx.collateral-expired", quote, collateral, INTEL_ROOT)


@pytest.mark.parametrize("where", ["body", "header", "signature"])
def test_tampered_real_quote_is_refused(where):
    quote, collateral, now = real("v4")
    offset = {"body": 48 + 200, "header": 28, "signature": signature_offset(quote) + 10}[where]
    refused("tdx.quote-signature", flip(quote, offset), collateral, INTEL_ROOT, now)


def test_tampered_real_qe_report_is_refused():
    quote, collateral, now = real("v4")
    qe_report = signature_offset(quote) + 64 + 64 + 6
    refused("tdx.qe-report-signature", flip(quote, qe_report + 320), collateral, INTEL_ROOT, now)   # report data


def test_tampered_real_pck_chain_is_refused():
    quote, collateral, now = real("v4")
    pem = tdx.parse_quote(quote).signature_data.pck_chain_pem
    at = quote.index(pem) + pem.index(b"-----END CERTIFICATE-----") - 100   # inside the PCK's signature
    tampered = quote[:at] + (b"A" if quote[at:at + 1] != b"A" else b"B") + quote[at + 1:]
    refused("tdx.pck-chain", tampered, collateral, INTEL_ROOT, now)


def test_tampered_real_collateral_is_refused():
    quote, collateral, now = real("v4")
    doc = json.loads(collateral)
    refused("tdx.tcb-info-signature", quote, edit_collateral(collateral, tcb_info=doc["tcb_info"].replace(
        '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18')), INTEL_ROOT, now)
    refused("tdx.qe-identity-signature", quote, edit_collateral(collateral, qe_identity=doc["qe_identity"].replace(
        '"isvprodid":2', '"isvprodid":3')), INTEL_ROOT, now)
    sig = bytes.fromhex(doc["tcb_info_signature"])
    refused("tdx.tcb-info-signature", quote, edit_collateral(collateral, tcb_info_signature=flip(sig, 5).hex()),
            INTEL_ROOT, now)
    crl = bytes.fromhex(doc["pck_crl"])
    refused("tdx.crl", quote, edit_collateral(collateral, pck_crl=flip(crl, len(crl) - 10).hex()), INTEL_ROOT, now)
    refused("tdx.crl", quote, edit_collateral(collateral, pck_crl=doc["root_ca_crl"]), INTEL_ROOT, now)


def test_real_quote_under_another_root_is_refused():
    quote, collateral, now = real("v4")
    failed = refused("tdx.root-pinned", quote, collateral, TdxTestChain(now=now).root_pem, now)
    assert "Intel SGX Root CA" in failed.detail


def test_real_quote_with_another_platforms_collateral_is_refused():
    quote, _, now = real("v4")
    _, other, other_now = real("v5")
    failed = refused("tdx.fmspc", quote, other, INTEL_ROOT, other_now)
    assert "90c06f000000" in failed.detail and "b0c06f000000" in failed.detail


def test_pinned_intel_root_is_intels_and_listed():
    root = x509.load_pem_x509_certificate(INTEL_ROOT)
    der = root.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == INTEL_ROOT_SHA256
    assert root.subject.rfc4514_string() == "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX Root CA"
    root.verify_directly_issued_by(root)
    assert INTEL_ROOT_SHA256 in (ROOTS / "README.md").read_text()
    assert not (ROOTS / "intel_sgx_root_ca.pem").name.startswith("amd_")   # policy.py pins every amd_*.pem
    for name in REAL:   # the very certificate that ends each real quote's PCK chain
        quote, _, _ = real(name)
        assert x509.load_pem_x509_certificates(tdx.parse_quote(quote).signature_data.pck_chain_pem)[-1] == root


def test_data_files_match_their_recorded_digests():
    readme = (DATA / "README.md").read_text()
    for path in sorted(DATA.iterdir()):
        if path.name != "README.md":
            assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, path.name


# --- dcap-qvl agrees --------------------------------------------------------------------------------------------

def qvl(quote: bytes, collateral: bytes, now: dt.datetime,
        root_der: bytes | None = None) -> tuple[str, tuple[str, ...]]:
    """dcap-qvl's (status, advisories), or ("refused", ()) where it refuses the quote."""
    assert dcap_qvl is not None
    col = dcap_qvl.QuoteCollateralV3.from_json(collateral.decode())
    try:
        if root_der is None:
            report = dcap_qvl.verify(quote, col, int(now.timestamp()))
        else:
            report = dcap_qvl.verify_with_root_ca(quote, col, root_der, int(now.timestamp()))
    except ValueError:
        return "refused", ()
    return report.status, tuple(report.advisory_ids)


def ours(quote: bytes, collateral: bytes, now: dt.datetime, root: bytes = INTEL_ROOT) -> tuple[str, tuple[str, ...]]:
    try:
        verified = tdx.verify_quote(quote, collateral, root, now)
    except AttestationFailed:
        return "refused", ()
    return verified.tcb_status, verified.advisory_ids


@needs_dcap_qvl
@pytest.mark.parametrize("name", sorted(REAL))
def test_dcap_qvl_agrees_on_real_quotes(name):
    quote, collateral, now = real(name)
    assert ours(quote, collateral, now) == qvl(quote, collateral, now)
    later = now + dt.timedelta(days=365)
    assert ours(quote, collateral, later) == qvl(quote, collateral, later) == ("refused", ())


@needs_dcap_qvl
@pytest.mark.parametrize("svn, want", [((6, 1, 3), ("UpToDate", ())),
                                       ((6, 1, 2), ("OutOfDate", ("INTEL-SA-TEST-1",))),
                                       ((4, 1, 3), ("OutOfDate", ("INTEL-SA-TEST-2",))),
                                       ((4, 1, 2), ("OutOfDate", ("INTEL-SA-TEST-1", "INTEL-SA-TEST-2"))),
                                       ((6, 1, 1), ("refused", ())), ((3, 1, 3), ("refused", ()))])
def test_dcap_qvl_agrees_on_throwaway_quotes(chain, svn, want):
    quote = chain.quote(REPORT_DATA, MRTD, tee_tcb_svn=bytes(svn) + bytes(13))
    root_der = chain.root.public_bytes(serialization.Encoding.DER)
    now = dt.datetime.now(UTC)
    assert ours(quote, chain.collateral(), now, chain.root_pem) == want
    assert qvl(quote, chain.collateral(), now, root_der) == want


# --- the throw-away chain ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
def test_throwaway_quote_verifies_and_fields_round_trip(chain, version):
    rtmrs = tuple(bytes([i]) * 48 for i in range(4))
    verified = tdx.verify_quote(chain.quote(REPORT_DATA, MRTD, version=version, rtmrs=rtmrs), chain.collateral(),
                                chain.root_pem)
    assert (verified.tcb_status, verified.advisory_ids) == ("UpToDate", ())
    q = verified.quote
    assert (q.version, q.mrtd, q.report_data, q.rtmrs, q.tee_tcb_svn) == (version, MRTD, REPORT_DATA, rtmrs,
                                                                            chain.tee_tcb_svn)
    assert q.xfam == (0xE7).to_bytes(8, "little") and q.mrowner == q.mrconfigid == q.mrownerconfig == bytes(48)
    assert not tdx.debug_td(q) and json.loads(json.dumps(q.claims()))["rtmrs"][3] == "03" * 48


def test_debug_td_is_detected(chain):
    verified = tdx.verify_quote(chain.quote(REPORT_DATA, MRTD, debug=True), chain.collateral(), chain.root_pem)
    assert tdx.debug_td(verified.quote) and verified.quote.claims()["debug"] is True


def test_revoked_pck_is_refused():
    chain = TdxTestChain()
    chain.revoked_pcks.append(chain.pck.serial_number)
    refused("tdx.pck-revoked", chain.quote(REPORT_DATA, MRTD), chain.collateral(), chain.root_pem)


def test_revoked_pck_ca_is_refused():
    chain = TdxTestChain()
    chain.revoked_cas.append(chain.ca.serial_number)
    refused("tdx.ca-revoked", chain.quote(REPORT_DATA, MRTD), chain.collateral(), chain.root_pem)


def test_expired_collateral_and_certificates_are_refused(chain):
    quote, collateral = chain.quote(REPORT_DATA, MRTD), chain.collateral()
    tdx.verify_quote(quote, collateral, chain.root_pem, chain.now + dt.timedelta(days=29, hours=23))
    refused("tdx.collateral-expired", quote, collateral, chain.root_pem, chain.now + dt.timedelta(days=30, hours=1))
    refused("tdx.certificate-expired", quote, collateral, chain.root_pem, chain.now + dt.timedelta(days=366))
    refused("tdx.certificate-expired", quote, collateral, chain.root_pem, chain.now - dt.timedelta(days=2))
    tcb_info = {**chain.tcb_info(), "nextUpdate": chain._stamp(-0.5)}
    refused("tdx.collateral-expired", quote, chain.collateral(tcb_info=tcb_info), chain.root_pem)


def test_pck_of_another_ca_is_refused(chain):
    other = TdxTestChain()
    foreign = chain.pck_chain_pem().replace(
        chain.pck.public_bytes(serialization.Encoding.PEM),
        other.issue_pck(key=chain.pck_key).public_bytes(serialization.Encoding.PEM))
    refused("tdx.pck-chain", chain.sign(chain.quote(REPORT_DATA, MRTD)[:632], pck_chain=foreign),
            chain.collateral(), chain.root_pem)


def test_qe_must_vouch_for_the_attestation_key(chain):
    report = bytearray(chain.qe_report())
    report[320:352] = hashlib.sha256(b"another key").digest()
    refused("tdx.qe-report-data", chain.sign(chain.quote(REPORT_DATA, MRTD)[:632], qe_report=bytes(report)),
            chain.collateral(), chain.root_pem)


def test_quote_signed_by_another_key_is_refused(chain):
    quote = bytearray(chain.quote(REPORT_DATA, MRTD))
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    quote[636 + 64:636 + 128] = point[1:]   # not the key the QE report vouches for
    refused("tdx.qe-report-data", bytes(quote), chain.collateral(), chain.root_pem)


def test_collateral_of_another_platform_or_qe_is_refused(chain):
    quote = chain.quote(REPORT_DATA, MRTD)
    refused("tdx.fmspc", quote, chain.collateral(tcb_info={**chain.tcb_info(), "fmspc": "00906ED50000"}),
            chain.root_pem)
    refused("tdx.pce-id", quote, chain.collateral(tcb_info={**chain.tcb_info(), "pceId": "0100"}), chain.root_pem)
    refused("tdx.tcb-info", quote, chain.collateral(tcb_info={**chain.tcb_info(), "id": "SGX"}), chain.root_pem)
    refused("tdx.qe-identity", quote, chain.collateral(qe_identity={**chain.qe_identity(), "mrsigner": "00" * 32}),
            chain.root_pem)
    refused("tdx.qe-identity", quote, chain.collateral(qe_identity={**chain.qe_identity(), "isvprodid": 1}),
            chain.root_pem)
    levels = [{"tcb": {"isvsvn": 8}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]
    refused("tdx.qe-tcb", quote, chain.collateral(qe_identity={**chain.qe_identity(), "tcbLevels": levels}),
            chain.root_pem)


def test_malformed_tcb_levels_are_refused(chain):
    info = chain.tcb_info()
    info["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][3] = {"no": "svn"}
    refused("tdx.tcb-info", chain.quote(REPORT_DATA, MRTD), chain.collateral(tcb_info=info), chain.root_pem)
    info["tcbLevels"] = [{"tcb": {"sgxtcbcomponents": [], "pcesvn": 0}}]
    refused("tdx.tcb-info", chain.quote(REPORT_DATA, MRTD), chain.collateral(tcb_info=info), chain.root_pem)


def test_tdx_module_identity_is_checked(chain):
    info = chain.tcb_info()
    info["tdxModuleIdentities"][0]["mrsigner"] = "11" * 48
    refused("tdx.module-identity", chain.quote(REPORT_DATA, MRTD), chain.collateral(tcb_info=info), chain.root_pem)
    info = chain.tcb_info()
    info["tdxModuleIdentities"][0]["id"] = "TDX_02"
    refused("tdx.module-identity", chain.quote(REPORT_DATA, MRTD), chain.collateral(tcb_info=info), chain.root_pem)


@pytest.mark.parametrize("qe_status, want", [("OutOfDate", "OutOfDate"), ("Revoked", None)])
def test_qe_status_lowers_the_platforms(chain, qe_status, want):
    identity = chain.qe_identity()
    identity["tcbLevels"][0].update(tcbStatus=qe_status, advisoryIDs=["INTEL-SA-TEST-QE"])
    quote, collateral = chain.quote(REPORT_DATA, MRTD), chain.collateral(qe_identity=identity)
    if want is None:
        refused("tdx.tcb-revoked", quote, collateral, chain.root_pem)
        return
    verified = tdx.verify_quote(quote, collateral, chain.root_pem)
    assert (verified.tcb_status, verified.advisory_ids) == (want, ("INTEL-SA-TEST-QE",))


def test_configuration_needed_and_an_outdated_module_converge_as_intel_does(chain):
    info = chain.tcb_info()
    info["tcbLevels"][0]["tcbStatus"] = "ConfigurationNeeded"
    quote = chain.quote(REPORT_DATA, MRTD, tee_tcb_svn=bytes([4, 1, 3]) + bytes(13))
    verified = tdx.verify_quote(quote, chain.collateral(tcb_info=info), chain.root_pem)
    assert verified.tcb_status == "OutOfDateConfigurationNeeded"


def test_tcb_signing_chain_is_checked(chain):
    other = TdxTestChain()
    doc = chain.collateral_dict()
    foreign = other.collateral_dict()
    mixed = {**doc, "tcb_info_issuer_chain": foreign["tcb_info_issuer_chain"]}
    refused("tdx.root-pinned", chain.quote(REPORT_DATA, MRTD), json.dumps(mixed).encode(), chain.root_pem)
    signer = other.issue("Test SGX TCB Signing", chain.tcb_key, "Test SGX Root CA", other.root_key)
    chained = signer.public_bytes(serialization.Encoding.PEM).decode() + doc["qe_identity_issuer_chain"].split(
        "-----END CERTIFICATE-----\n", 1)[1]
    refused("tdx.tcb-signing-chain", chain.quote(REPORT_DATA, MRTD),
            json.dumps({**doc, "qe_identity_issuer_chain": chained}).encode(), chain.root_pem)


@pytest.mark.parametrize("offset, value, check", [(0, 3, "tdx.quote-version"), (4, 0, "tdx.tee-type"),
                                                  (2, 3, "tdx.attestation-key-type")])
def test_header_fields_are_checked(chain, offset, value, check):
    quote = bytearray(chain.quote(REPORT_DATA, MRTD))
    quote[offset] = value
    refused(check, bytes(quote), chain.collateral(), chain.root_pem)


def test_qe_vendor_is_intels(chain):
    quote = chain.quote(REPORT_DATA, MRTD)
    refused("tdx.qe-vendor", chain.sign(flip(quote, 12)[:632]), chain.collateral(), chain.root_pem)


@pytest.mark.parametrize("cut", [0, 47, 632, 700, -1])
def test_truncated_quote_is_refused(chain, cut):
    quote = chain.quote(REPORT_DATA, MRTD)
    refused("tdx.quote-format", quote[:cut], chain.collateral(), chain.root_pem)


def test_padding_after_the_quote_is_ignored(chain):
    quote = chain.quote(REPORT_DATA, MRTD) + bytes(70) + b"stale"
    assert tdx.verify_quote(quote, chain.collateral(), chain.root_pem).quote.mrtd == MRTD


def test_malformed_collateral_is_refused(chain):
    quote = chain.quote(REPORT_DATA, MRTD)
    refused("tdx.collateral", quote, b"not json", chain.root_pem)
    refused("tdx.collateral", quote, b"[]", chain.root_pem)
    doc = chain.collateral_dict()
    del doc["pck_crl"]
    assert "pck_crl" in refused("tdx.collateral", quote, json.dumps(doc).encode(), chain.root_pem).detail
    refused("tdx.collateral", quote, edit_collateral(chain.collateral(), root_ca_crl="zz"), chain.root_pem)
    refused("tdx.root-pinned", quote, chain.collateral(), b"not a certificate")
