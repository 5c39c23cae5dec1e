"""NVIDIA GPU evidence (Hopper, Blackwell confidential computing): NVIDIA's verifier checks it, then our policy.

The cryptography is NVIDIA's (PyPI `nv-local-gpu-verifier`, imported lazily): it parses the SPDM
GET_MEASUREMENTS request and response, verifies the certificate chain up to the NVIDIA device root shipped in
the package (the chain's own root is dropped and that one put in its place) and the leaf's FWID against the
report, the report's signature by the GPU's attestation key, the RIMs' (Reference Integrity Manifests')
schema, certificate chain up to NVIDIA's RIM root and XML signature, and compares the measurements with the
RIMs' golden values. It has no verification call for evidence made elsewhere that leaves the network
optional (`cc_admin.attest` always asks OCSP and the RIM service, and touches NVML), so `verify_gpus` makes
the calls `cc_admin.attest` makes, in its order, with the network parts explicit:

- RIMs come from `GpuRules.rim_dir` (NVIDIA's RIM file ids as file names) and else from NVIDIA's RIM
  service; neither reachable fails `gpu.rim`, naming the file to put there.
- Revocation is asked of NVIDIA's OCSP service; unreachable fails `gpu.ocsp`. A policy that sets
  `ocsp_service = None` accepts without revocation checks, and the claims say so.
- `check_measurements = False` accepts without comparing measurements (the claims say so too): the driver
  and VBIOS versions are then all the policy pins.

Nothing is left to a default that passes: every check either runs or is named off in the claims.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common.nvidia_verifier import quiet_import
from edge_client.attestation.errors import AttestationFailed

log = logging.getLogger(__name__)

VERIFIER_DIST = "nv-local-gpu-verifier"
VERIFIER_TESTED = "2.7.3"       # the release this module calls into; another one is used, with a warning
RIM_SERVICE = "https://rim.attestation.nvidia.com/v1/rim/"
OCSP_SERVICE = "https://ocsp.ndis.nvidia.com/"
NONCE_BYTES = 32
_INSTALL = "pip install 'dlora[gpu-attestation]'"
_ARCHS = {"HOPPER": "HopperSettings", "BLACKWELL": "BlackwellSettings"}


@dataclass(frozen=True)
class GpuEvidence:
    """One GPU's evidence as NVIDIA's SDK collects it (proto GpuEvidence)."""

    certificate_chain: bytes      # PEM, leaf (the attestation key) first
    attestation_report: bytes     # SPDM GET_MEASUREMENTS request (37 bytes) + signed response
    arch: str = "HOPPER"


@dataclass(frozen=True)
class GpuRules:
    """What the edge accepts of the GPUs. Versions as NVIDIA writes them: driver "550.90.07", VBIOS
    "96.00.9f.00.01"; an empty tuple accepts any version the other checks accept."""

    allowed_drivers: tuple[str, ...] = ()
    allowed_vbios: tuple[str, ...] = ()
    rim_dir: Path | None = None                 # RIM files named by NVIDIA's id (NV_GPU_DRIVER_GH100_550.90.07…)
    rim_service: str | None = RIM_SERVICE       # None: never fetch a RIM
    ocsp_service: str | None = OCSP_SERVICE     # None: no revocation check (recorded in the claims)
    check_measurements: bool = True             # False: no RIMs at all (recorded in the claims)
    timeout: float = 10.0                       # seconds for each OCSP or RIM request


def verify_gpus(evidence: Sequence[GpuEvidence], nonce: bytes, rules: GpuRules) -> list[dict[str, object]]:
    """The claims of each GPU, in order; AttestationFailed naming the first check one of them fails."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"a GPU attestation nonce has {NONCE_BYTES} bytes, got {len(nonce)}")
    if not evidence:
        return []
    nv = nvidia()
    with _LOCK:   # NVIDIA's verifier keeps its service URLs and flags in class attributes
        _configure(nv, rules)
        claims = [_verify(nv, index, gpu, nonce, rules) for index, gpu in enumerate(evidence)]
    seen: dict[object, int] = {}
    for c in claims:   # one GPU's evidence sent twice would pass for two GPUs
        if c["ueid"] in seen:
            raise AttestationFailed("gpu.duplicate", f"GPUs {seen[c['ueid']]} and {c['index']} are the same GPU "
                                                     f"(attestation certificate serial {c['ueid']})")
        seen[c["ueid"]] = int(str(c["index"]))
    return claims


_LOCK = threading.RLock()
_MODULES: SimpleNamespace | None = None


def nvidia() -> SimpleNamespace:
    """NVIDIA's verifier modules, imported once; AttestationFailed("gpu.verifier") where they are missing
    or do not load, so an edge without them sends nothing."""
    global _MODULES
    with _LOCK:
        if _MODULES is None:
            _MODULES = _import()
        return _MODULES


def _import() -> SimpleNamespace:
    try:
        version = importlib.metadata.version(VERIFIER_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise AttestationFailed("gpu.verifier", f"NVIDIA's GPU verifier ({VERIFIER_DIST}) is not installed, so "
                                                f"this edge cannot check GPU evidence and sends nothing: "
                                                f"{_INSTALL}") from None
    try:
        quiet_import("verifier.config")   # first: importing it is what has the side effects
        names = {"config": "verifier.config", "attestation": "verifier.attestation",
                 "utils": "verifier.utils", "exceptions": "verifier.exceptions",
                 "cc_admin_utils": "verifier.cc_admin_utils", "rim": "verifier.rim",
                 "verifier": "verifier.verifier", "cert_chains": "verifier.nvml.gpu_cert_chains",
                 "test_handle": "verifier.nvml.test_handle"}
        mods = {key: importlib.import_module(name) for key, name in names.items()}
        crypto = importlib.import_module("OpenSSL.crypto")
    except Exception as exc:   # e.g. signxml 3.2 under a cryptography without binary curves
        raise AttestationFailed("gpu.verifier", f"NVIDIA's GPU verifier {version} does not load "
                                                f"({type(exc).__name__}: {exc}); it needs its own pinned "
                                                f"dependencies: {_INSTALL}") from None
    if version != VERIFIER_TESTED:
        log.warning("%s %s: this edge_client was tested with %s", VERIFIER_DIST, version, VERIFIER_TESTED)
    return SimpleNamespace(version=version, crypto=crypto, **mods)


def _configure(nv: SimpleNamespace, rules: GpuRules) -> None:
    base = nv.config.BaseSettings
    base.allow_hold_cert = False          # a certificate on hold is revoked for us
    base.OCSP_NONCE_DISABLED = False
    base.service_key = None
    base.MAX_OCSP_TIME_DELAY = base.MAX_NETWORK_TIME_DELAY = rules.timeout
    if rules.ocsp_service:
        base.set_ocsp_url(rules.ocsp_service)
    if rules.rim_service:
        base.set_rim_service_base_url(rules.rim_service)


def _verify(nv: SimpleNamespace, index: int, gpu: GpuEvidence, nonce: bytes, rules: GpuRules) -> dict[str, object]:
    arch = (gpu.arch or "HOPPER").upper()
    if arch not in _ARCHS:
        raise AttestationFailed("gpu.arch", f"GPU {index}: architecture {gpu.arch!r} is not one NVIDIA's verifier "
                                            f"checks ({', '.join(_ARCHS)})")
    settings = getattr(nv.config, _ARCHS[arch])()   # a fresh one: NVIDIA's verifier records each result in it
    exc = nv.exceptions
    try:
        report = nv.attestation.AttestationReport(bytes(gpu.attestation_report), settings)
        opaque = report.get_response_message().get_opaque_data()
        driver = opaque.get_data("OPAQUE_FIELD_ID_DRIVER_VERSION").decode().rstrip("\0")
        vbios = nv.utils.format_vbios_version(opaque.get_data("OPAQUE_FIELD_ID_VBIOS_VERSION")).lower()
        fwid = opaque.get_data("OPAQUE_FIELD_ID_FWID").hex()
    except Exception as error:
        raise AttestationFailed("gpu.report-format", f"GPU {index}: not an SPDM measurement report NVIDIA's "
                                                     f"verifier can parse ({type(error).__name__}: {error})") from None
    settings.mark_attestation_report_parsed()
    settings.mark_gpu_arch_is_correct()
    chain = _certificates(nv, index, gpu.certificate_chain, settings, fwid)
    revocation = _revocation(nv, f"GPU {index}'s attestation certificate chain", chain, settings,
                             nv.config.BaseSettings.Certificate_Chain_Verification_Mode.GPU_ATTESTATION, rules)
    try:
        nv.cc_admin_utils.CcAdminUtils.verify_attestation_report(
            attestation_report_obj=report, gpu_leaf_certificate=chain[0], nonce=nonce, driver_version=driver,
            vbios_version=vbios, settings=settings)
    except (exc.NonceMismatchError, exc.InvalidNonceError):
        found = report.get_request_message().get_nonce()
        raise AttestationFailed("gpu.nonce", f"GPU {index}'s report was made for another nonce (replayed or "
                                             f"stale evidence): found {found[:8].hex()}…, expected "
                                             f"{nonce[:8].hex()}…") from None
    except exc.SignatureVerificationError:
        raise AttestationFailed("gpu.report-signature", f"GPU {index}'s report is not signed by the attestation "
                                                        "key of its certificate chain") from None
    except Exception as error:
        raise AttestationFailed("gpu.report-format", f"GPU {index}: NVIDIA's verifier cannot check the report "
                                                     f"({type(error).__name__}: {error})") from None
    _allowed("gpu.driver", index, driver, rules.allowed_drivers, "driver")
    _allowed("gpu.vbios", index, vbios, tuple(v.lower() for v in rules.allowed_vbios), "VBIOS")
    leaf = chain[0].to_cryptography()
    claims: dict[str, object] = {
        "index": index, "arch": arch, "driver_version": driver, "vbios_version": vbios,
        "ueid": str(leaf.serial_number), "hwmodel": _common_name(chain[1]) if len(chain) > 1 else "",
        "nonce": nonce.hex(), "certificate_chain": "verified to NVIDIA's device root (pinned by the verifier)",
        "revocation": revocation, "verifier": f"{VERIFIER_DIST} {nv.version}"}
    if fwid:
        claims["fwid"] = fwid
    claims["measurements"] = (_measurements(nv, index, report, settings, driver, vbios, arch, rules)
                              if rules.check_measurements else
                              "not checked: the policy accepts any measurements (check_measurements off)")
    return claims


def _certificates(nv: SimpleNamespace, index: int, pem: bytes, settings: Any, fwid: str) -> list[Any]:
    chains, exc = nv.cert_chains.GpuCertificateChains, nv.exceptions
    try:
        # NVIDIA's own path for a chain read from the GPU: its last (root) certificate is dropped and the
        # device root shipped in the package (verifier/certs/verifier_device_root.pem) put in its place.
        chain = list(chains(nv.test_handle.TestHandle(bytes(pem))).GpuAttestationCertificateChain)
    except Exception as error:
        raise AttestationFailed("gpu.certificates", f"GPU {index}: the certificate chain is not PEM "
                                                    f"certificates ({type(error).__name__})") from None
    try:
        if len(chain) != settings.MAX_CERT_CHAIN_LENGTH:   # NVIDIA's check too, after the FWID's: said first here
            raise exc.IncorrectNumberOfCertificatesError(len(chain))
        result = nv.cc_admin_utils.CcAdminUtils.verify_gpu_certificate_chain(chain, settings, fwid)
    except (exc.NoCertificateError, exc.IncorrectNumberOfCertificatesError):
        raise AttestationFailed("gpu.certificates", f"GPU {index}: the chain has {len(chain) - 1} certificate(s) "
                                                    f"below its root, NVIDIA's verifier expects "
                                                    f"{settings.MAX_CERT_CHAIN_LENGTH - 1}") from None
    if settings.check_if_gpu_attestation_report_cert_chain_fwid_matched() is False or not isinstance(result, tuple):
        # (it answers a bare False, not its usual triple, for an FWID mismatch)
        raise AttestationFailed("gpu.certificates", f"GPU {index}: the FWID of the attestation certificate is not "
                                                    "the one in the report")
    valid, expired, expires = result
    if not valid:
        why = f"a certificate expired (the chain's earliest end is {expires})" if expired else \
            "it does not verify up to NVIDIA's device root"
        raise AttestationFailed("gpu.certificates", f"GPU {index}'s certificate chain is refused: {why}")
    settings.mark_gpu_attestation_report_cert_chain_validated()
    settings.mark_gpu_attestation_report_cert_expiration_date(expires)
    return chain


def _revocation(nv: SimpleNamespace, what: str, chain: list[Any], settings: Any, mode: Any,
                rules: GpuRules) -> str:
    if not rules.ocsp_service:
        return "not checked: the policy accepts without OCSP (ocsp off)"
    try:
        # It turns the list's items into `cryptography` certificates: it gets a copy.
        ok, _warning, status, reason = nv.cc_admin_utils.CcAdminUtils.ocsp_certificate_chain_validation(
            list(chain), settings, mode)
    except Exception as error:
        cause = error.__cause__ or error
        raise AttestationFailed("gpu.ocsp", f"cannot ask NVIDIA's OCSP service ({rules.ocsp_service}) about {what}: "
                                            f"{type(cause).__name__}: {cause}; offline, a policy may accept "
                                            "without revocation checks (ocsp off)") from None
    if not ok:
        raise AttestationFailed("gpu.ocsp", f"{what}: OCSP status {status or 'not good'}"
                                            f"{f', revoked ({reason})' if reason else ''}")
    return f"OCSP {status} ({rules.ocsp_service})"


def _allowed(check: str, index: int, value: str, allowed: tuple[str, ...], what: str) -> None:
    if allowed and value not in allowed:
        raise AttestationFailed(check, f"GPU {index} runs {what} {value}; the policy allows {', '.join(allowed)}")


def _common_name(cert: Any) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _measurements(nv: SimpleNamespace, index: int, report: Any, settings: Any, driver: str, vbios: str, arch: str,
                  rules: GpuRules) -> dict[str, object]:
    utils = nv.cc_admin_utils.CcAdminUtils
    opaque = report.get_response_message().get_opaque_data()
    try:
        chip = "GH100" if arch == "HOPPER" else opaque.get_data("OPAQUE_FIELD_ID_CHIP_INFO")
        driver_id = utils.get_driver_rim_file_id(driver, settings, chip)
        field = {k: opaque.get_data(f"OPAQUE_FIELD_ID_{k}").decode("ascii").strip().strip("\0").upper()
                 for k in ("PROJECT", "PROJECT_SKU", "CHIP_SKU")}
        vbios_id = utils.get_vbios_rim_file_id(field["PROJECT"], field["PROJECT_SKU"], field["CHIP_SKU"],
                                               vbios.replace(".", "").upper())
    except Exception as error:
        raise AttestationFailed("gpu.report-format", f"GPU {index}: the report does not name its RIMs "
                                                     f"({type(error).__name__}: {error})") from None
    modes = nv.config.BaseSettings.Certificate_Chain_Verification_Mode
    driver_rim = _rim(nv, index, "driver", driver_id, driver, settings, modes.DRIVER_RIM_CERT, rules)
    vbios_rim = _rim(nv, index, "vbios", vbios_id, vbios, settings, modes.VBIOS_RIM_CERT, rules)
    try:
        matched = nv.verifier.Verifier(report, driver_rim["rim"], vbios_rim["rim"], settings).verify(settings)
    except nv.exceptions.InvalidMeasurementIndexError as error:
        raise AttestationFailed("gpu.measurements", f"GPU {index}: {str(error).strip()}") from None
    except Exception as error:
        raise AttestationFailed("gpu.measurements", f"GPU {index}: NVIDIA's verifier cannot compare the "
                                                    f"measurements ({type(error).__name__}: {error})") from None
    if not matched:
        raise AttestationFailed("gpu.measurements", f"GPU {index}'s measurements are not the golden values of the "
                                                    f"RIMs {driver_id} and {vbios_id} (NVIDIA's verifier logs the "
                                                    "indexes that differ)")
    return {"matched": True, "driver_rim": {k: v for k, v in driver_rim.items() if k != "rim"},
            "vbios_rim": {k: v for k, v in vbios_rim.items() if k != "rim"}}


def _rim(nv: SimpleNamespace, index: int, kind: str, file_id: str, version: str, settings: Any, mode: Any,
         rules: GpuRules) -> dict[str, Any]:
    """One RIM, through the steps of NVIDIA's `RIM.verify` (schema, version, certificate chain to the RIM root
    shipped in the package, revocation, XML signature), with the revocation step under the policy."""
    content, source = _rim_content(nv, index, kind, file_id, rules)
    what = f"GPU {index}'s {kind} RIM {file_id} ({source})"
    try:
        rim = nv.rim.RIM(rim_name=kind, settings=settings, content=content)
        schema_ok = rim.validate_schema()
    except Exception as error:
        raise AttestationFailed("gpu.rim", f"{what} is not a RIM NVIDIA's verifier reads "
                                           f"({type(error).__name__}: {str(error).strip()})") from None
    if not schema_ok:
        raise AttestationFailed("gpu.rim", f"{what} fails the SWID schema")
    if rim.colloquialVersion.lower() != version.lower():
        raise AttestationFailed("gpu.rim", f"{what} is for {kind} {rim.colloquialVersion}, the GPU runs {version}")
    try:
        chain = rim.extract_certificates()
        root = Path(settings.ROOT_CERT_DIR, settings.RIM_ROOT_CERT).read_bytes()
        chain.append(nv.crypto.load_certificate(nv.crypto.FILETYPE_PEM, root))
        valid, expired, expires = nv.cc_admin_utils.CcAdminUtils.verify_certificate_chain(chain, settings, mode)
    except Exception as error:
        raise AttestationFailed("gpu.rim", f"{what}: its certificates are unreadable "
                                           f"({type(error).__name__})") from None
    if not valid:
        why = f"a certificate expired (the chain's earliest end is {expires})" if expired else \
            "it does not verify up to NVIDIA's RIM root"
        raise AttestationFailed("gpu.rim", f"{what}: its signing certificate chain is refused: {why}")
    revocation = _revocation(nv, what, chain, settings, mode, rules)
    try:
        rim.verify_signature(settings)
    except Exception:
        raise AttestationFailed("gpu.rim", f"{what}: its XML signature does not verify") from None
    return {"rim": rim, "id": file_id, "source": source, "version": rim.colloquialVersion,
            "revocation": revocation}


def _rim_content(nv: SimpleNamespace, index: int, kind: str, file_id: str, rules: GpuRules) -> tuple[str, str]:
    names = (file_id, f"{file_id}.swidtag", f"{file_id}.xml")
    if rules.rim_dir is not None:
        for name in names:
            path = rules.rim_dir / name
            if path.is_file():
                return path.read_text(encoding="utf-8"), str(path)
    where = f"{rules.rim_dir}/{file_id}[.swidtag|.xml]" if rules.rim_dir is not None else "a RIM directory"
    if not rules.rim_service:
        raise AttestationFailed("gpu.rim", f"GPU {index}: no {kind} RIM {file_id} in {where}, and the policy "
                                           "fetches none from NVIDIA's RIM service")
    utils = nv.cc_admin_utils.CcAdminUtils
    try:
        content = nv.utils.function_wrapper_with_timeout([utils.fetch_rim_file, file_id, "fetch_rim_file"],
                                                         rules.timeout)
    except Exception as error:
        cause = error.__cause__ or error
        raise AttestationFailed("gpu.rim", f"GPU {index}: cannot fetch the {kind} RIM {file_id} from NVIDIA's RIM "
                                           f"service ({rules.rim_service}): {type(cause).__name__}: {cause}; "
                                           f"offline, put that file in {where}") from None
    return str(content), f"{rules.rim_service}{file_id}"
