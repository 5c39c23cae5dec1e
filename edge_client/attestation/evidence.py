"""Checks one Attest reply against a policy: signatures, measurements, the report-data binding, settings, GPUs."""
from __future__ import annotations

import datetime as dt
import importlib
import json
from typing import Any

from common.attestation import TeeKind, gpu_nonce, key_and_settings, report_data, settings_digest
from common.wire import dlora_pb2 as pb
from edge_client.attestation.errors import AttestationFailed
from edge_client.attestation.policy import Policy, SevSnpRules, TdxRules


def check(reply: pb.AttestReply, nonce: bytes, spki_sha256: bytes, policy: Policy,
          now: dt.datetime | None = None) -> dict[str, Any]:
    """Every check of the policy, in order; the claims the evidence proves, or AttestationFailed naming the check."""
    if reply.tee != policy.tee.value:
        raise AttestationFailed("tee.kind", f"the cloud offers {reply.tee or 'nothing'} evidence; the policy "
                                            f"({policy.source}) requires {policy.tee.value}")
    settings_sha256 = settings_digest(reply.settings)
    expected = report_data(nonce, spki_sha256, settings_sha256)
    if policy.tee is TeeKind.SEV_SNP:
        assert policy.sev_snp is not None   # from_dict sets the table of the policy's TEE
        cpu = _sev_snp(reply, policy.sev_snp)
    else:
        assert policy.tdx is not None
        cpu = _tdx(reply, policy.tdx, now)
    check_binding(cpu.pop("_report_data"), expected, nonce, spki_sha256, reply)
    settings = _settings(reply.settings, policy)
    claims: dict[str, Any] = {"tee": policy.tee.value, "policy": policy.source, "cpu": cpu,
                              "tls_key_sha256": spki_sha256.hex(), "settings_sha256": settings_sha256.hex(),
                              "settings": settings, "verified_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    claims["gpus"] = _gpus(reply, gpu_nonce(nonce, spki_sha256, settings_sha256), policy)
    return claims


def check_binding(found: bytes, expected: bytes, nonce: bytes, spki_sha256: bytes, reply: pb.AttestReply) -> None:
    """The report data must be exactly what this edge expects; a mismatch is named by its likely cause."""
    if found == expected:
        return
    if found[:32] != nonce:
        raise AttestationFailed("binding.nonce", "the evidence was made for another nonce (replayed or stale "
                                                 f"evidence): found {found[:8].hex()}…, sent {nonce[:8].hex()}…")
    claimed_key = reply.tls_key_sha256
    if claimed_key != spki_sha256 or found[32:] == key_and_settings(claimed_key, settings_digest(reply.settings)):
        raise AttestationFailed("binding.tls-key", "the evidence names another TLS key than the one this edge "
                                                   f"reached ({spki_sha256[:8].hex()}…): relayed from another "
                                                   "server, or its TLS ends outside the TEE (at a load balancer?)")
    raise AttestationFailed("binding.settings", "the evidence was made under other settings than the ones the "
                                                "cloud shows (settings digest "
                                                f"{settings_digest(reply.settings)[:8].hex()}… is not bound)")


def _sev_snp(reply: pb.AttestReply, rules: SevSnpRules) -> dict[str, Any]:
    from edge_client.attestation import sev_snp

    if not reply.auxblob:
        raise AttestationFailed("sev-snp.certificates", "the cloud sent no certificate table (VCEK, ASK, ARK) "
                                                        "with its report; load it on the host (snphost import) "
                                                        "so configfs-tsm's auxblob carries it")
    report = sev_snp.verify_report(reply.report, sev_snp.parse_cert_table(reply.auxblob), rules.trusted_roots)
    _allowed("sev-snp.measurement", report.measurement, rules.measurements, "launch measurement")
    if sev_snp.debug_allowed(report) and not rules.allow_debug:
        raise AttestationFailed("sev-snp.debug", "the guest policy allows debugging (the host can read its "
                                                 "memory); the policy forbids it")
    if rules.vmpl is not None and report.vmpl != rules.vmpl:
        raise AttestationFailed("sev-snp.vmpl", f"the report comes from VMPL {report.vmpl}, expected {rules.vmpl}")
    for part in ("bootloader", "tee", "snp", "microcode"):
        have, need = getattr(report.reported_tcb, part), getattr(rules.min_tcb, part)
        if have < need:
            raise AttestationFailed("sev-snp.tcb", f"reported TCB {part} is {have}, the policy needs at least {need}")
    return {**report.claims(), "_report_data": report.report_data}


def _tdx(reply: pb.AttestReply, rules: TdxRules, now: dt.datetime | None) -> dict[str, Any]:
    tdx = _verifier("tdx", "tdx")
    if not reply.collateral:
        raise AttestationFailed("tdx.collateral", "the cloud sent no collateral with its quote "
                                                  "(cloud_server --attestation-collateral FILE)")
    verified = tdx.verify_quote(reply.report, reply.collateral, rules.trusted_root, now)
    if verified.tcb_status not in rules.tcb_statuses:
        raise AttestationFailed("tdx.tcb-status", f"the platform's TCB is {verified.tcb_status} "
                                                  f"(advisories {', '.join(verified.advisory_ids) or 'none'}); the "
                                                  f"policy accepts {', '.join(rules.tcb_statuses)}")
    quote = verified.quote
    _allowed("tdx.mrtd", quote.mrtd, rules.mrtd, "MRTD")
    for index, allowed in rules.rtmrs.items():
        _allowed(f"tdx.rtmr{index}", quote.rtmrs[index], allowed, f"RTMR{index}")
    if tdx.debug_td(quote) and not rules.allow_debug:
        raise AttestationFailed("tdx.debug", "the TD is a debug TD (the host can read its memory); the policy "
                                             "forbids it")
    return {**quote.claims(), "tcb_status": verified.tcb_status, "advisory_ids": list(verified.advisory_ids),
            "_report_data": quote.report_data}


def _verifier(module: str, check: str) -> Any:
    """The verifier module of one kind of evidence; fails closed, naming it, where this build has none."""
    try:
        return importlib.import_module(f"edge_client.attestation.{module}")
    except ModuleNotFoundError:
        raise AttestationFailed(f"{check}.verifier", f"this edge_client cannot verify {module.upper()} evidence "
                                                     "yet, so it sends nothing") from None


def _allowed(check: str, value: bytes, allowed: tuple[bytes, ...], what: str) -> None:
    if value not in allowed:
        raise AttestationFailed(check, f"{what} {value.hex()[:24]}… is not one the policy allows "
                                       f"({', '.join(a.hex()[:12] + '…' for a in allowed)})")


def _settings(raw: bytes, policy: Policy) -> dict[str, Any]:
    try:
        settings = json.loads(raw)
    except ValueError:
        raise AttestationFailed("settings.format", "the cloud's settings are not JSON") from None
    if not isinstance(settings, dict):
        raise AttestationFailed("settings.format", "the cloud's settings are not a JSON object")
    for name, want in policy.required_settings().items():
        if name not in settings:
            raise AttestationFailed(f"settings.{name}", f"the cloud does not state {name}; expected {want!r}")
        if settings[name] != want:
            raise AttestationFailed(f"settings.{name}", f"the cloud runs with {name} = {settings[name]!r}; the "
                                                        f"policy requires {want!r}")
    return settings


def _gpus(reply: pb.AttestReply, nonce: bytes, policy: Policy) -> list[dict[str, object]]:
    if policy.gpu.count is not None and len(reply.gpus) != policy.gpu.count:
        # A cloud could leave a GPU out of its evidence and still run the model on it.
        raise AttestationFailed("gpu.count", f"the cloud proves {len(reply.gpus)} GPU(s); the policy requires "
                                             f"exactly {policy.gpu.count}")
    if not reply.gpus:
        if policy.gpu.required:
            raise AttestationFailed("gpu.missing", "the policy requires attested GPUs and the cloud sent no GPU "
                                                   "evidence (a CPU-only server, or --gpu-attestation off)")
        return []
    gpu = _verifier("gpu", "gpu")
    evidence = [gpu.GpuEvidence(g.certificate_chain, g.attestation_report, g.arch or "HOPPER") for g in reply.gpus]
    rules = gpu.GpuRules(allowed_drivers=policy.gpu.drivers, allowed_vbios=policy.gpu.vbios,
                         rim_dir=policy.gpu.rim_dir, rim_service=policy.gpu.rim_service,
                         ocsp_service=policy.gpu.ocsp_service, check_measurements=policy.gpu.check_measurements)
    return gpu.verify_gpus(evidence, nonce, rules)
