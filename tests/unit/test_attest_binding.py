"""Evidence checks without servers: SEV-SNP signatures and chain, and the report-data binding (nonce, TLS key,
settings), each refused by name, on reports signed by a throw-away chain (tests/snp_chain.py)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
from snp_chain import SnpTestChain

from common.attestation import canonical_settings, report_data, settings_digest
from common.wire import dlora_pb2 as pb
from edge_client.attestation import evidence, sev_snp
from edge_client.attestation.errors import AttestationFailed
from edge_client.attestation.policy import PolicyError, from_dict

MEASUREMENT = os.urandom(48)
SETTINGS = {"attestation": "sev-snp", "tls_key_origin": "generated", "record_dir": None, "state_dir": None,
            "allow_insecure_remote": False, "mode": "any"}


@pytest.fixture(scope="module")
def chain() -> SnpTestChain:
    return SnpTestChain()


def policy(chain: SnpTestChain, **settings):
    """A policy allowing MEASUREMENT, pinning the chain's ARK, requiring `settings`."""
    root = chain.ark_pem.decode()
    base = from_dict({"tee": "sev-snp", "sev-snp": {"measurements": [MEASUREMENT.hex()], "roots": ["ark.pem"]}},
                     _dir_with("ark.pem", root))
    return dataclasses.replace(base, settings=settings)


def _dir_with(name: str, text: str):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="dlora-policy-"))
    (d / name).write_text(text)
    return d


def reply(chain: SnpTestChain, nonce: bytes, key: bytes, settings: dict, *, signed_settings: dict | None = None,
          signed_key: bytes | None = None, signed_nonce: bytes | None = None, measurement: bytes = MEASUREMENT,
          **report_kw) -> pb.AttestReply:
    """A reply whose report is signed over the `signed_*` values (default: the ones shown)."""
    shown = canonical_settings(settings)
    bound = canonical_settings(signed_settings) if signed_settings is not None else shown
    data = report_data(signed_nonce or nonce, signed_key or key, settings_digest(bound))
    return pb.AttestReply(tee="sev-snp", provider="sev_guest", report=chain.report(data, measurement, **report_kw),
                          auxblob=chain.auxblob(), settings=shown, tls_key_sha256=signed_key or key)


NONCE, KEY = os.urandom(32), os.urandom(32)


def test_good_evidence_gives_claims(chain):
    claims = evidence.check(reply(chain, NONCE, KEY, SETTINGS), NONCE, KEY, policy(chain))
    assert claims["cpu"]["measurement"] == MEASUREMENT.hex() and claims["settings"] == SETTINGS
    assert claims["cpu"]["reported_tcb"] == chain.tcb.as_dict()


@pytest.mark.parametrize("case, check", [
    ("nonce", "binding.nonce"), ("key", "binding.tls-key"), ("settings", "binding.settings"),
    ("measurement", "sev-snp.measurement"), ("debug", "sev-snp.debug"), ("record_dir", "settings.record_dir"),
    ("origin", "settings.tls_key_origin"), ("mode", "settings.mode"),
])
def test_each_mismatch_is_refused_by_name(chain, case, check):
    settings, kw, rules = dict(SETTINGS), {}, policy(chain)
    if case == "nonce":
        kw["signed_nonce"] = os.urandom(32)          # replayed evidence, made for an earlier nonce
    elif case == "key":
        kw["signed_key"] = os.urandom(32)            # relayed from a server with another TLS key
    elif case == "settings":
        kw["signed_settings"] = {**SETTINGS, "record_dir": "/tmp/rec"}   # shown settings are not the bound ones
    elif case == "measurement":
        kw["measurement"] = os.urandom(48)
    elif case == "debug":
        kw["policy"] = 0x30000 | sev_snp.POLICY_DEBUG
    elif case == "record_dir":
        settings["record_dir"] = "/tmp/rec"
    elif case == "origin":
        settings["tls_key_origin"] = "file"
    else:
        rules = policy(chain, mode="dlora")
    with pytest.raises(AttestationFailed) as failed:
        evidence.check(reply(chain, NONCE, KEY, settings, **kw), NONCE, KEY, rules)
    assert failed.value.check == check, failed.value


@pytest.mark.parametrize("where, check", [(0x90, "sev-snp.report-signature"), (0x50, "sev-snp.report-signature"),
                                          (0x2A0, "sev-snp.report-signature"), (0x1A0, "sev-snp.report-signature")])
def test_tampered_report_is_refused(chain, where, check):
    blob = bytearray(chain.report(bytes(64), MEASUREMENT))
    blob[where] ^= 1
    with pytest.raises(AttestationFailed) as failed:
        sev_snp.verify_report(bytes(blob), chain.certs(), [chain.ark_pem])
    assert failed.value.check == check


def test_chain_is_checked_link_by_link(chain):
    other = SnpTestChain()
    report = chain.report(bytes(64), MEASUREMENT)
    cases = {"sev-snp.ark-pinned": ({**chain.certs()}, [other.ark_pem]),
             "sev-snp.ask-signature": ({**chain.certs(), "ask": other.certs()["ask"]}, [chain.ark_pem]),
             "sev-snp.vcek-signature": ({**chain.certs(), "vcek": other.certs()["vcek"]}, [chain.ark_pem])}
    for check, (certs, roots) in cases.items():
        with pytest.raises(AttestationFailed) as failed:
            sev_snp.verify_report(report, certs, roots)
        assert failed.value.check == check


def test_vcek_must_fit_the_report(chain):
    newer = sev_snp.TcbVersion(chain.tcb.bootloader, chain.tcb.tee, chain.tcb.snp + 1, chain.tcb.microcode)
    with pytest.raises(AttestationFailed) as failed:
        sev_snp.verify_report(chain.report(bytes(64), MEASUREMENT, tcb=newer), chain.certs(), [chain.ark_pem])
    assert failed.value.check == "sev-snp.tcb-mismatch"
    other_chip = SnpTestChain()
    certs = {**other_chip.certs()}
    with pytest.raises(AttestationFailed) as failed:
        sev_snp.verify_report(other_chip.report(bytes(64), MEASUREMENT)[:-1], certs, [other_chip.ark_pem])
    assert failed.value.check == "sev-snp.report-size"


def test_cert_table_round_trip(chain):
    assert sev_snp.parse_cert_table(chain.auxblob()) == chain.certs()


def test_min_tcb(chain):
    rules = policy(chain)
    rules = dataclasses.replace(rules, sev_snp=dataclasses.replace(
        rules.sev_snp, min_tcb=dataclasses.replace(rules.sev_snp.min_tcb, snp=chain.tcb.snp + 1)))
    with pytest.raises(AttestationFailed) as failed:
        evidence.check(reply(chain, NONCE, KEY, SETTINGS), NONCE, KEY, rules)
    assert failed.value.check == "sev-snp.tcb"


def test_gpu_required_but_absent(chain):
    rules = dataclasses.replace(policy(chain), gpu=dataclasses.replace(policy(chain).gpu, required=True))
    with pytest.raises(AttestationFailed) as failed:
        evidence.check(reply(chain, NONCE, KEY, SETTINGS), NONCE, KEY, rules)
    assert failed.value.check == "gpu.missing"


@pytest.mark.parametrize("doc, words", [
    ({"tee": "sev-snp"}, "[sev-snp] table"), ({"tee": "sgx"}, "unknown TEE kind"),
    ({"tee": "sev-snp", "sev-snp": {"measurements": ["00"]}}, "expected 48"),
    ({"tee": "sev-snp", "sev-snp": {"measurements": [bytes(48).hex()], "colour": 1}}, "unknown key"),
])
def test_bad_policies_are_named(doc, words):
    with pytest.raises((PolicyError, ValueError)) as err:
        from_dict(doc)
    assert words in str(err.value)


def test_settings_json_is_canonical():
    assert canonical_settings({"b": 1, "a": None}) == b'{"a":null,"b":1}'
    assert json.loads(canonical_settings(SETTINGS)) == SETTINGS


def test_gpu_policy_keys(tmp_path):
    base = {"tee": "sev-snp", "sev-snp": {"measurements": [bytes(48).hex()]}}
    gpu = from_dict({**base, "gpu": {"required": True, "rim-dir": "rims", "ocsp": False,
                                     "rim-service": "https://rims.example/v1/", "measurements": False}}, tmp_path).gpu
    assert (gpu.required, gpu.rim_dir, gpu.ocsp_service, gpu.rim_service, gpu.check_measurements) == \
        (True, tmp_path / "rims", None, "https://rims.example/v1/", False)
    plain = from_dict({**base, "gpu": {}}).gpu
    assert plain.ocsp_service.startswith("https://ocsp.ndis.nvidia.com")
    assert plain.rim_service and plain.check_measurements
    with pytest.raises(PolicyError, match=r"\[gpu\] ocsp"):
        from_dict({**base, "gpu": {"ocsp": "http://plain"}})


def test_gpu_evidence_is_checked_in_the_reply(chain):
    """NVIDIA's real sample GPU evidence in an otherwise good reply: verified, and refused for its nonce,
    which was made for another attestation (the edge's GPU nonce binds its nonce, TLS key and settings)."""
    from pathlib import Path

    data = Path(__file__).parents[1] / "data" / "gpu"
    good = reply(chain, NONCE, KEY, SETTINGS)
    good.gpus.add(certificate_chain=(data / "hopperCertChain.txt").read_bytes(),
                  attestation_report=bytes.fromhex((data / "hopperAttestationReport.txt").read_text().strip()),
                  arch="HOPPER")
    rules = policy(chain)
    rules = dataclasses.replace(rules, gpu=dataclasses.replace(rules.gpu, ocsp_service=None, check_measurements=False))
    with pytest.raises(AttestationFailed) as failed:
        evidence.check(good, NONCE, KEY, rules)
    assert failed.value.check == "gpu.nonce", failed.value


def test_gpu_count_is_exact(chain):
    """A policy naming a GPU count refuses a cloud that proves fewer (or more), before verifying any of them."""
    from pathlib import Path

    data = Path(__file__).parents[1] / "data" / "gpu"
    rules = policy(chain)
    two = dataclasses.replace(rules, gpu=dataclasses.replace(rules.gpu, count=2, ocsp_service=None,
                                                             check_measurements=False))
    one_gpu = reply(chain, NONCE, KEY, SETTINGS)
    one_gpu.gpus.add(certificate_chain=(data / "hopperCertChain.txt").read_bytes(),
                     attestation_report=bytes.fromhex((data / "hopperAttestationReport.txt").read_text().strip()),
                     arch="HOPPER")
    for got in (reply(chain, NONCE, KEY, SETTINGS), one_gpu):
        with pytest.raises(AttestationFailed) as failed:
            evidence.check(got, NONCE, KEY, two)
        assert failed.value.check == "gpu.count" and "exactly 2" in failed.value.detail
    with pytest.raises(PolicyError, match=r"\[gpu\] count"):
        from_dict({"tee": "sev-snp", "sev-snp": {"measurements": [bytes(48).hex()]}, "gpu": {"count": 0}})
