"""NVIDIA GPU evidence: NVIDIA's verifier on NVIDIA's own sample evidence, tampered copies refused by name.

The samples (tests/data/gpu/README.md) are the ones nv-local-gpu-verifier ships for its --test_no_gpu mode:
a real Hopper (GH100) attestation report made for a fixed nonce, and the GPU's certificate chain. No network
here: every OCSP or RIM-service address below is a closed local port, so the offline behaviour is what runs.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import importlib.metadata
import re
import shutil
import types
from pathlib import Path

import pytest

from cloud_server.attestation import EvidenceError
from cloud_server.gpu_evidence import NvidiaGpus
from common.wire import dlora_pb2 as pb
from edge_client.attestation import gpu
from edge_client.attestation.errors import AttestationFailed

DATA = Path(__file__).parents[1] / "data" / "gpu"
# The nonce the sample report was made for: bytes 4..36 of the report (its SPDM GET_MEASUREMENTS request).
SAMPLE_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
SAMPLE_DRIVER, SAMPLE_VBIOS = "550.90.07", "96.00.9f.00.01"
CLOSED = "http://127.0.0.1:9/"   # the discard port: nothing listens, a request fails at once
OFFLINE = dict(ocsp_service=None, check_measurements=False)


def _installed() -> bool:
    try:
        gpu.nvidia()
    except AttestationFailed:
        return False
    return True


needs_verifier = pytest.mark.skipif(not _installed(), reason="NVIDIA's verifier is not installed here "
                                                             "(pip install 'dlora[gpu-attestation]')")


def report() -> bytes:
    return bytes.fromhex((DATA / "hopperAttestationReport.txt").read_text().strip())


def chain() -> bytes:
    return (DATA / "hopperCertChain.txt").read_bytes()


def rules(**kw: object) -> gpu.GpuRules:
    base: dict[str, object] = dict(allowed_drivers=(SAMPLE_DRIVER,), allowed_vbios=(SAMPLE_VBIOS,), **OFFLINE)
    base.update(kw)
    return gpu.GpuRules(**base)


def refused(check: str, evidence: bytes | None = None, certs: bytes | None = None, nonce: bytes = SAMPLE_NONCE,
            arch: str = "HOPPER", **kw: object) -> AttestationFailed:
    ev = gpu.GpuEvidence(chain() if certs is None else certs, report() if evidence is None else evidence, arch)
    with pytest.raises(AttestationFailed) as info:
        gpu.verify_gpus([ev], nonce, rules(**kw))
    assert info.value.check == check, info.value
    return info.value


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_samples_are_nvidias_bytes() -> None:
    """Each file is still the one the README names (NVIDIA's, byte for byte)."""
    table = (DATA / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", table, re.M)
    assert {name for name, _ in rows} == {p.name for p in DATA.iterdir() if p.name != "README.md"}
    for name, digest in rows:
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


@needs_verifier
def test_real_sample_verifies() -> None:
    [claims] = gpu.verify_gpus([gpu.GpuEvidence(chain(), report(), "HOPPER")], SAMPLE_NONCE, rules())
    assert claims["driver_version"] == SAMPLE_DRIVER and claims["vbios_version"] == SAMPLE_VBIOS
    assert claims["arch"] == "HOPPER" and claims["hwmodel"] == "GH100 A01 GSP BROM"
    assert claims["nonce"] == SAMPLE_NONCE.hex()
    assert claims["verifier"] == f"nv-local-gpu-verifier {importlib.metadata.version('nv-local-gpu-verifier')}"
    # What the policy turned off is said in the claims, not left out.
    assert str(claims["revocation"]).startswith("not checked") and str(claims["measurements"]).startswith(
        "not checked")
    assert len(str(claims["fwid"])) == 96
    # Any version list is accepted as long as it names the sample's versions; VBIOS in either case.
    gpu.verify_gpus([gpu.GpuEvidence(chain(), report())], SAMPLE_NONCE,
                    rules(allowed_drivers=("535.86.10", SAMPLE_DRIVER), allowed_vbios=(SAMPLE_VBIOS.upper(),)))
    gpu.verify_gpus([gpu.GpuEvidence(chain(), report())], SAMPLE_NONCE, gpu.GpuRules(**OFFLINE))
    with pytest.raises(AttestationFailed) as info:   # the same GPU twice is not two GPUs
        gpu.verify_gpus([gpu.GpuEvidence(chain(), report())] * 2, SAMPLE_NONCE, rules())
    assert info.value.check == "gpu.duplicate"


@needs_verifier
def test_tampered_report_is_refused() -> None:
    body = report()
    assert body[4:36] == SAMPLE_NONCE
    refused("gpu.report-signature", flip(body, 200))              # a byte of a measurement
    refused("gpu.report-signature", flip(body, len(body) - 1))    # the signature itself
    refused("gpu.report-signature", body[:-96] + bytes(96))       # no signature at all
    refused("gpu.report-format", body[:30])                       # not a report
    refused("gpu.arch", arch="AMPERE")


@needs_verifier
def test_wrong_nonce_is_refused() -> None:
    err = refused("gpu.nonce", nonce=bytes(32))
    assert SAMPLE_NONCE[:8].hex() in err.detail                  # names the nonce the report was made for
    refused("gpu.nonce", flip(report(), 10))                      # the report's own nonce changed
    with pytest.raises(ValueError):
        gpu.verify_gpus([gpu.GpuEvidence(chain(), report())], SAMPLE_NONCE[:16], rules())


@needs_verifier
def test_tampered_certificate_chain_is_refused() -> None:
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", chain(), re.S)
    assert len(pems) == 5
    leaf = bytearray(pems[0])
    at = leaf.index(b"-----END") - 10                             # inside the leaf's signature
    leaf[at:at + 1] = b"A" if leaf[at:at + 1] != b"A" else b"B"
    refused("gpu.certificates", certs=bytes(leaf) + b"".join(pems[1:]))
    refused("gpu.certificates", certs=b"".join([pems[0], pems[2], pems[1], *pems[3:]]))   # order changed
    refused("gpu.certificates", certs=b"".join(pems[1:]))         # no leaf: a certificate short
    refused("gpu.certificates", certs=b"not a certificate chain")
    # Another chain's leaf (here: the intermediate in its place) is not the key that signed the report.
    refused("gpu.certificates", certs=b"".join([pems[1], *pems[1:]]))


@needs_verifier
def test_self_made_root_is_not_trusted() -> None:
    """The chain's own last certificate is dropped for the device root that NVIDIA's package pins, so a chain
    ending in any other root still has to verify up to NVIDIA's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "NVIDIA Device Identity CA")])
    now = dt.datetime.now(dt.timezone.utc)
    fake = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA384()))
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", chain(), re.S)
    swapped = b"".join(pems[:-1]) + fake.public_bytes(serialization.Encoding.PEM)
    # Still verifies: the fake root is never used, NVIDIA's pinned one is.
    gpu.verify_gpus([gpu.GpuEvidence(swapped, report())], SAMPLE_NONCE, rules())


@needs_verifier
def test_driver_and_vbios_outside_the_policy_are_refused() -> None:
    err = refused("gpu.driver", allowed_drivers=("535.104.05",))
    assert SAMPLE_DRIVER in err.detail and "535.104.05" in err.detail
    err = refused("gpu.vbios", allowed_vbios=("96.00.74.00.1a",))
    assert SAMPLE_VBIOS in err.detail


@needs_verifier
def test_offline_fails_closed_naming_the_service() -> None:
    err = refused("gpu.ocsp", ocsp_service=CLOSED)
    assert CLOSED in err.detail and "ocsp off" in err.detail
    err = refused("gpu.rim", check_measurements=True, rim_service=CLOSED)
    assert "NV_GPU_DRIVER_GH100_550.90.07" in err.detail and "put that file in" in err.detail
    err = refused("gpu.rim", check_measurements=True, rim_service=None)
    assert "NV_GPU_DRIVER_GH100_550.90.07" in err.detail


@needs_verifier
def test_local_rims_are_checked(tmp_path: Path) -> None:
    """NVIDIA ships no RIM for the sample's driver: its test driver RIM (for 545.00, signed by NVIDIA) put under
    the sample's RIM id is refused for its version, and a broken copy for being no RIM."""
    shutil.copy(DATA / "Driver_RIM_test_no_gpu.swidtag", tmp_path / "NV_GPU_DRIVER_GH100_550.90.07.swidtag")
    err = refused("gpu.rim", check_measurements=True, rim_dir=tmp_path, rim_service=None)
    assert "545.00" in err.detail and SAMPLE_DRIVER in err.detail and str(tmp_path) in err.detail
    (tmp_path / "NV_GPU_DRIVER_GH100_550.90.07.swidtag").write_text("<not a RIM")
    refused("gpu.rim", check_measurements=True, rim_dir=tmp_path, rim_service=None)


@needs_verifier
def test_nvidias_test_rims_no_longer_verify() -> None:
    """The test RIMs' signing certificates have expired (the driver one on 2025-06-26): NVIDIA's chain check,
    as this module calls it, refuses them, so a stale RIM cannot pass for a current one."""
    nv = gpu.nvidia()
    settings = nv.config.HopperSettings()
    rim = nv.rim.RIM(rim_name="driver", settings=settings, content=(DATA / "Driver_RIM_test_no_gpu.swidtag")
                     .read_text())
    certs = rim.extract_certificates()
    certs.append(nv.crypto.load_certificate(nv.crypto.FILETYPE_PEM, Path(settings.RIM_ROOT_CERT).read_bytes()))
    valid, expired, _ = nv.cc_admin_utils.CcAdminUtils.verify_certificate_chain(
        certs, settings, nv.config.BaseSettings.Certificate_Chain_Verification_Mode.DRIVER_RIM_CERT)
    assert not valid and expired


def test_no_verifier_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gpu, "_MODULES", None)
    monkeypatch.setattr(gpu.importlib.metadata, "version", missing)
    with pytest.raises(AttestationFailed) as info:
        gpu.verify_gpus([gpu.GpuEvidence(chain(), report())], SAMPLE_NONCE, rules())
    assert info.value.check == "gpu.verifier" and "dlora[gpu-attestation]" in info.value.detail


def test_evidence_check_uses_this_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """edge_client.attestation.evidence hands the reply's GPUs here: without NVIDIA's verifier, nothing passes."""
    from edge_client.attestation import evidence
    from edge_client.attestation.policy import GpuPolicy, Policy

    monkeypatch.setattr(gpu, "_MODULES", None)
    monkeypatch.setattr(gpu.importlib.metadata, "version",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    reply = pb.AttestReply(gpus=[pb.GpuEvidence(certificate_chain=chain(), attestation_report=report(),
                                                arch="HOPPER")])
    policy = Policy(tee=evidence.TeeKind.SEV_SNP, gpu=GpuPolicy(required=True, drivers=(SAMPLE_DRIVER,)))
    with pytest.raises(AttestationFailed) as info:
        evidence._gpus(reply, SAMPLE_NONCE, policy)
    assert info.value.check == "gpu.verifier"


# --- the cloud's side ---------------------------------------------------------------------------------------

class FakeNvml:
    """A stand-in for pynvml's read-only calls: what a VM with `count` GPUs in the given CC state answers."""

    NVML_CC_SYSTEM_FEATURE_ENABLED = 1
    NVML_CC_SYSTEM_DEVTOOLS_MODE_OFF = 0
    NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE = 0

    def __init__(self, count: int = 1, cc: int = 1, devtools: int = 0, init_error: Exception | None = None) -> None:
        self.count, self.cc, self.devtools, self.init_error = count, cc, devtools, init_error
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlSystemGetConfComputeState(self) -> object:
        return types.SimpleNamespace(environment=2, ccFeature=self.cc, devToolsMode=self.devtools)

    def nvmlSystemGetConfComputeGpusReadyState(self) -> int:
        return 1

    def __getattr__(self, name: str) -> object:   # any setter or other call would be a bug: fail loudly
        raise AssertionError(f"cloud_server called pynvml.{name}")


def sample_collector(real: bool) -> object:
    """NVIDIA's collector, or a stand-in returning its output shape for the sample evidence."""
    if real:
        from cloud_server import gpu_evidence

        cc_admin = gpu_evidence._load("verifier.cc_admin", "nv-local-gpu-verifier")
        # NVIDIA's own test mode: its NVML stand-in reads the samples, the rest of the path is the real one.
        return types.SimpleNamespace(collect_gpu_evidence_remote=lambda nonce, ppcie_mode: cc_admin
                                     .collect_gpu_evidence_remote(nonce, no_gpu_mode=True, ppcie_mode=ppcie_mode))
    return types.SimpleNamespace(collect_gpu_evidence_remote=lambda nonce, ppcie_mode: [
        {"certificate": base64.b64encode(chain()).decode(), "evidence": base64.b64encode(report()).decode(),
         "arch": "HOPPER"}])


def test_cloud_without_nvml_says_so() -> None:
    """On this machine (no NVIDIA driver, maybe no nvidia-ml-py) the collector refuses to start, saying why."""
    with pytest.raises(EvidenceError, match="nvidia-ml-py|NVML does not start"):
        NvidiaGpus().check()


def test_cloud_refuses_without_cc_mode() -> None:
    with pytest.raises(EvidenceError, match="confidential-computing mode is off.*never changes GPU modes"):
        NvidiaGpus(nvml=FakeNvml(cc=0), cc_admin=sample_collector(False)).check()
    with pytest.raises(EvidenceError, match="DevTools"):
        NvidiaGpus(nvml=FakeNvml(devtools=1), cc_admin=sample_collector(False)).check()
    with pytest.raises(EvidenceError, match="no NVIDIA GPU"):
        NvidiaGpus(nvml=FakeNvml(count=0), cc_admin=sample_collector(False)).check()
    with pytest.raises(EvidenceError, match="NVML does not start.*Driver Not Loaded"):
        NvidiaGpus(nvml=FakeNvml(init_error=RuntimeError("Driver Not Loaded"))).check()


def test_cloud_collector_errors_are_named() -> None:
    def broken(nonce: str, ppcie_mode: bool) -> list[dict[str, str]]:
        try:
            raise OSError("nvmlDeviceGetConfComputeGpuAttestationReport timed out")
        except OSError as exc:
            raise Exception("Error occurred while collecting GPU evidence") from exc

    with pytest.raises(EvidenceError, match="collecting GPU evidence <- OSError: nvml"):
        NvidiaGpus(nvml=FakeNvml(), cc_admin=types.SimpleNamespace(collect_gpu_evidence_remote=broken)).check()
    with pytest.raises(EvidenceError, match="no GPU"):
        NvidiaGpus(nvml=FakeNvml(), cc_admin=types.SimpleNamespace(
            collect_gpu_evidence_remote=lambda nonce, ppcie_mode: [])).check()


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=needs_verifier)])
def test_cloud_evidence_verifies_at_the_edge(real: bool) -> None:
    """What the cloud puts in AttestReply.gpus is what the edge verifies (the sample stands in for a GPU)."""
    nvml = FakeNvml()
    collector = NvidiaGpus(nvml=nvml, cc_admin=sample_collector(real))
    assert collector.check() == 1 and nvml.calls == ["init"]
    [made] = collector(SAMPLE_NONCE)
    assert isinstance(made, pb.GpuEvidence) and made.arch == "HOPPER" and made.attestation_report == report()
    if _installed():
        wire = pb.AttestReply.FromString(pb.AttestReply(gpus=[made]).SerializeToString()).gpus[0]
        [claims] = gpu.verify_gpus([gpu.GpuEvidence(wire.certificate_chain, wire.attestation_report, wire.arch)],
                                   SAMPLE_NONCE, rules())
        assert claims["driver_version"] == SAMPLE_DRIVER


def test_server_with_cuda_and_auto_checks_the_gpus(tmp_path: Path) -> None:
    """cloud_server --attestation ... on a CUDA device: no NVML here, so it refuses to start, naming NVML."""
    from cloud_server.cli import _attester, parse_args
    from common.attestation import TlsKeyOrigin

    cfg = parse_args(["--attestation", "sev-snp", "--tsm-dir", str(tmp_path)])
    with pytest.raises(RuntimeError, match="GPU attestation.*(nvidia-ml-py|NVML)"):
        _attester(cfg, None, None, TlsKeyOrigin.GENERATED, "cuda:0")
